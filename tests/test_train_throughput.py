"""benchmarks/train_throughput.py: a missing PyTorch interpreter is a one-line exit 2 naming the variable."""

import os
import sys

from helpers import run_process

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_compare_torch_without_torch_exits_2_naming_the_variable():
  result = run_process([sys.executable, os.path.join(REPO, "benchmarks", "train_throughput.py"), "--compare", "torch",
                        "--rounds", "1", "--steps", "1"], timeout=300,
                       env={"SIMMIM_TORCH_PYTHON": sys.executable})  # this venv: jax, no torch
  assert result.returncode == 2, result.stderr[-2000:]
  assert "SIMMIM_TORCH_PYTHON=" in result.stderr and "Traceback" not in result.stderr
