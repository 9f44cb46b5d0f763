"""The release metadata agree with each other: version, licence and changelog."""

import configparser
import pathlib
import re

import pyro_nf

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_citation_version_matches_package():
    text = (ROOT / "CITATION.cff").read_text()
    match = re.search(r"^version:\s*(\S+)\s*$", text, flags=re.M)
    assert match is not None, "CITATION.cff has no version line"
    assert match.group(1).strip("\"'") == pyro_nf.__version__


def test_license_file_matches_setup_cfg():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert cfg["metadata"]["license"] == "Apache-2.0"
    head = (ROOT / "LICENSE").read_text().splitlines()[:3]
    assert "Apache License" in head[0] and "Version 2.0" in head[1]


def test_changelog_has_a_section_for_this_version():
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## \[?{re.escape(pyro_nf.__version__)}\]?\b", changelog, flags=re.M), (
        f"CHANGELOG.md has no '## {pyro_nf.__version__}' section"
    )
