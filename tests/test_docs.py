"""The documentation stays complete and true.

* Every public name (``__all__`` of ``pyro_nf``, ``pyro_nf.transforms``, ``pyro_nf.distributed``) is
  in the API reference
  (``docs/api.rst``), and every name listed there exists: a new public name without docs fails.
* Every public class and function has a docstring with a ``>>>`` example (the examples themselves
  run through ``--doctest-modules``, see pyproject.toml).
* The ``>>>`` examples in the doc pages (``docs/**/*.rst``) run and print what the pages say.
* Every results file in ``benchmarks/results/`` is included in the docs, and every included file
  exists.

None of this needs Sphinx; CI builds the HTML with ``sphinx-build -W`` separately.
"""

from __future__ import annotations

import doctest
import inspect
import re
from pathlib import Path

import pytest
import torch

import pyro_nf
import pyro_nf.distributed
import pyro_nf.transforms

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PUBLIC = (
    {f"pyro_nf.{name}" for name in pyro_nf.__all__}
    | {f"pyro_nf.transforms.{name}" for name in pyro_nf.transforms.__all__}
    | {f"pyro_nf.distributed.{name}" for name in pyro_nf.distributed.__all__}
)


def _documented_names(rst: str) -> set[str]:
    """Full names listed in ``autosummary`` blocks (under ``currentmodule``) or ``py:data``."""
    names, module, in_autosummary = set(), "", False
    for line in rst.splitlines():
        directive = re.match(r"\.\. ([\w:-]+)::\s*(\S*)", line)
        if directive:
            kind, arg = directive.groups()
            in_autosummary = kind == "autosummary"
            if kind in ("currentmodule", "py:currentmodule", "module", "py:module"):
                module = arg
            elif kind in ("py:data", "data", "autodata"):
                names.add(arg)
            continue
        if in_autosummary:
            if line and not line[0].isspace():
                in_autosummary = False
            elif line.strip() and not line.strip().startswith(":"):
                entry = line.strip().lstrip("~")
                names.add(entry if entry.startswith("pyro_nf") else f"{module}.{entry}")
    return names


def _resolve(full_name: str):
    module, _, attr = full_name.rpartition(".")
    return getattr(__import__(module, fromlist=[attr]), attr)


def test_every_public_name_is_in_the_api_reference():
    documented = _documented_names((DOCS / "api.rst").read_text())
    missing = sorted(PUBLIC - documented)
    assert not missing, f"public names missing from docs/api.rst: {missing}"


def test_every_name_in_the_api_reference_exists_and_is_public():
    documented = _documented_names((DOCS / "api.rst").read_text())
    for name in sorted(documented):
        _resolve(name)  # AttributeError names a stale entry
    assert not sorted(documented - PUBLIC), "docs/api.rst lists names that are not in __all__"


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_every_public_object_has_a_docstring_with_an_example(name):
    obj = _resolve(name)
    if isinstance(obj, str):  # __version__
        return
    doc = obj.__doc__ or ""
    assert doc.strip(), f"{name} has no docstring"
    if inspect.isclass(obj) or inspect.isfunction(obj):
        assert ">>>" in doc, f"{name}'s docstring has no runnable example (>>>)"


PAGES = sorted(
    p for p in DOCS.rglob("*.rst") if "_build" not in p.parts and "generated" not in p.parts
)
PAGES_WITH_EXAMPLES = [p for p in PAGES if ">>>" in p.read_text()]


def test_the_doc_pages_have_examples():
    assert len(PAGES_WITH_EXAMPLES) >= 8, [p.name for p in PAGES_WITH_EXAMPLES]


@pytest.mark.parametrize("page", PAGES_WITH_EXAMPLES, ids=lambda p: str(p.relative_to(DOCS)))
def test_doc_page_examples_run(page):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra threads only wait for each other
    try:
        failed, attempted = doctest.testfile(
            str(page),
            module_relative=False,
            globs={},
            optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
            report=True,
        )
    finally:
        torch.set_num_threads(threads)
    assert attempted > 0
    assert failed == 0, f"{failed} of {attempted} examples in {page.relative_to(ROOT)} failed"


def test_every_results_file_is_included_in_the_docs():
    included = set()
    for wrapper in (DOCS / "results").glob("*.md"):
        for path in re.findall(r"```\{include\}\s+(\S+)", wrapper.read_text()):
            target = (wrapper.parent / path).resolve()
            assert target.exists(), f"{wrapper.name} includes {path}, which does not exist"
            included.add(target)
    # smoke runs write *_quick.md, which .gitignore keeps out of the repository
    results = {
        p.resolve()
        for p in (ROOT / "benchmarks" / "results").glob("*.md")
        if not p.stem.endswith("_quick")
    }
    missing = sorted(p.name for p in results - included)
    assert not missing, f"results files not included under docs/results/: {missing}"
