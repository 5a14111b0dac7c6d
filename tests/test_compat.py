"""The package runs on the oldest Python that pyproject.toml admits (3.10): checked statically
with vermin, since no Python 3.10 is installed here (typing.Self, a 3.11 name, once broke the
import on 3.10)."""

import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def _vermin(*paths) -> subprocess.CompletedProcess:
    minimum = re.search(r'requires-python = ">=(\d+\.\d+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    vermin = Path(sys.executable).with_name("vermin")  # the test extra's console script
    return subprocess.run([str(vermin), f"--target={minimum}-", "--violations", "--no-tips",
                           "--no-parse-comments", *map(str, paths)], capture_output=True, text=True, check=False)


def test_the_package_parses_on_the_oldest_python_it_claims():
    result = _vermin(ROOT / "gan_dist", ROOT / "train.py", ROOT / "bench")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_check_sees_a_newer_name(tmp_path):
    """The negative control: what broke 3.10 before is found."""
    (tmp_path / "new.py").write_text("from typing import Self\n")
    result = _vermin(tmp_path / "new.py")
    assert result.returncode != 0 and "typing.Self" in result.stdout, result.stdout
