"""Sphinx configuration of the pyro_nf documentation.

Build (from the repository root, warnings as errors)::

    pip install -e ".[docs]"
    sphinx-build -W -b html docs docs/_build/html

Nothing is downloaded at build time (no intersphinx) and no example is executed: the pages show
the examples' code and the numbers their runs wrote to ``benchmarks/results/``.
"""

import os
import sys

# The package of this checkout, whatever else is installed.
sys.path.insert(0, os.path.abspath(".."))

import pyro_nf  # noqa: E402

project = "pyro_nf"
author = "the pyro_nf developers"
copyright = "the pyro_nf developers, Apache-2.0"
release = pyro_nf.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "generated/*.rst.new"]
templates_path = ["_templates"]

# API reference: one page per public name, generated from the docstrings (Google style).
autosummary_generate = True
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # dataclass "Attributes:" as fields, not duplicate attribute entries
napoleon_use_rtype = False

# The results files in benchmarks/results/ are Markdown, included as they are.
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"pyro_nf {release}"
pygments_style = "sphinx"
