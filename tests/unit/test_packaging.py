"""pyproject.toml declares the build backend beside setup.py/setup.cfg (no legacy setup.py runs)."""

from __future__ import annotations

import configparser
import tomllib

from helpers import ROOT


def test_pyproject_declares_setuptools_as_the_build_backend() -> None:
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    system = doc["build-system"]
    assert system["build-backend"] == "setuptools.build_meta"
    assert "setuptools>=64" in system["requires"]  # 64: editable installs by PEP 660
    # Metadata stays in setup.cfg alone (the Dockerfile reads its dependency list).
    assert "project" not in doc
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert cfg["metadata"]["name"] == "edgeproxy"
