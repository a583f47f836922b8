"""The house's rules that code review alone would let slip: the pure core and the offline
linter load no I/O libraries."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import ROOT

IO_LIBRARIES = ("aiohttp", "redis", "docker")


def loaded_after(code: str) -> set[str]:
    """Top-level packages loaded by a fresh interpreter after running `code`."""
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sys.modules))"],
        capture_output=True, text=True, check=True, cwd=ROOT)
    return {name.split(".")[0] for name in out.stdout.split()}


@pytest.mark.parametrize("module", ["edgeproxy.routes.model", "edgeproxy.routes.labels",
                                    "edgeproxy.routes.table", "edgeproxy.core.paths",
                                    "edgeproxy.routes.transform", "edgeproxy.control.watcher",
                                    "edgeproxy.ops.check", "edgeproxy.ops.migrate"])
def test_pure_modules_load_no_io_library(module: str) -> None:
    assert loaded_after(f"import {module}") & set(IO_LIBRARIES) == set()


def test_edgeproxy_check_loads_no_io_library(tmp_path: object) -> None:
    code = ("import sys, tempfile, pathlib\n"
            "from edgeproxy.cli import main\n"
            "p = pathlib.Path(tempfile.mkdtemp()) / 'compose.yml'\n"
            "p.write_text('services: {a: {image: x, labels: {gateway.path: /a}}}')\n"
            "try:\n    main(['check', str(p)])\nexcept SystemExit:\n    pass")
    assert loaded_after(code) & set(IO_LIBRARIES) == set()
