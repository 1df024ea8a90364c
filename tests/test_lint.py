"""Static checks that need no GPU: the Triton kernels and launchers only run on a GPU, so a
name that is undefined there (a deleted kernel still launched) would otherwise pass CI."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pyflakes_rules_pass_on_the_package_and_tests():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "F", "--no-cache",
                          "--output-format", "concise", "dsv4", "tests"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
