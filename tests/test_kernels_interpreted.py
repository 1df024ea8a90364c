"""The Triton kernels' logic on the CPU, through Triton's interpreter (tests/interpreted_kernels.py):
each check in its own process, since TRITON_INTERPRET must be set before dsv4 is imported."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from interpreted_kernels import CHECKS  # noqa: E402

triton = pytest.importorskip("triton", reason="Triton's interpreter needs the triton package "
                             "(.ci/run installs 3.6)")
if not triton.__version__.startswith("3.6."):
    pytest.skip(f"these checks pin Triton 3.6, the device's version (found {triton.__version__}, "
                "whose interpreter miscomputes bf16 dots)", allow_module_level=True)


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_kernel_under_triton_interpreter(check):
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, str(HERE / "interpreted_kernels.py"), check],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
