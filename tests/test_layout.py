"""The repository layout keeps Python's standard ``platform`` module importable."""

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_stdlib_platform_not_shadowed_from_repo_root():
    code = "import platform; platform.system(); import ray, torch, tessera; print(platform.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert not out.stdout.strip().startswith(str(REPO_ROOT / "platform")), out.stdout


def test_platform_folder_is_not_a_package():
    assert not (REPO_ROOT / "platform" / "__init__.py").exists()
