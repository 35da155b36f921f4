"""bench/gpu_check.py on a machine without CUDA: one clear line and exit 2, no traceback, nothing run."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parents[2] / "bench" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run for real")
def test_without_cuda_the_gpu_check_refuses_in_one_line(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "gpu.json")], capture_output=True,
                         text=True, timeout=300, env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 2, out.stderr
    assert out.stdout == "" and out.stderr.count("\n") == 1 and "no CUDA device here" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "gpu.json").exists()
