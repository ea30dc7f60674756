"""The docs site builds with --strict: a broken link, a missing page or an unresolved API
reference fails (CI runs this as part of make test)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_mkdocs_build_strict(tmp_path):
    mkdocs = shutil.which("mkdocs", path=os.path.dirname(sys.executable)) or shutil.which("mkdocs")
    if mkdocs is None:
        pytest.fail("mkdocs is not installed: pip install -e '.[docs]' (the test extra includes it)")
    run = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                         capture_output=True, text=True, timeout=240,
                         env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    warnings = [line for line in (run.stdout + run.stderr).splitlines() if "WARNING" in line or "ERROR" in line]
    assert run.returncode == 0, "mkdocs build --strict failed:\n" + "\n".join(warnings or [run.stderr[-3000:]])
    # every page of the nav and the API reference was rendered
    site = tmp_path / "site"
    for page in ("index.html", "trainer/index.html", "api/dist/index.html", "api/config/index.html"):
        assert (site / page).exists(), page
    api = (site / "api" / "config" / "index.html").read_text()
    assert "load_config" in api and "build_logger" in api  # docstrings made it into the reference
