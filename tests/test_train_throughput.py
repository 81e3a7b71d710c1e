"""benchmarks/train_throughput.py: a missing PyTorch interpreter is a one-line exit 2 naming the variable."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_compare_torch_without_torch_exits_2_naming_the_variable():
  env = {**os.environ, "SIMMIM_TORCH_PYTHON": sys.executable}  # this venv: jax, no torch
  result = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "train_throughput.py"), "--compare",
                           "torch", "--rounds", "1", "--steps", "1"], capture_output=True, text=True, env=env,
                          timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "SIMMIM_TORCH_PYTHON=" in result.stderr and "Traceback" not in result.stderr
