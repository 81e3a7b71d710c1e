"""benchmarks/gpu_check.sh: its dry run works on CPU and names every case; the demo loss check passes on CPU."""

import json
import os
import sys

import pytest

from helpers import run_process

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.sh")
CASES = ("vit_b16_224_einsum", "vit_b16_224_dot_product_attention", "swin_b_192_w6_einsum",
         "swin_b_192_w6_dot_product_attention", "demo_loss")


def test_dry_run_names_every_case_and_runs_nothing(tmp_path):
  result = run_process(["bash", SCRIPT, "--dry-run"], timeout=60, env={"OUT": str(tmp_path)})
  assert result.returncode == 0, result.stderr
  lines = [line for line in result.stdout.splitlines() if line.startswith("case ")]
  assert [line.split()[1] for line in lines] == list(CASES)
  for line in lines[:-1]:
    assert "benchmarks/train_throughput.py" in line and "--dtype bfloat16" in line
  assert all("--attention_impl dot_product_attention" in line for line in lines if "dot_product" in line.split()[1])
  assert sum("--compare torch" in line for line in lines) == 2  # the einsum cases, when torch + CUDA import
  assert "benchmarks/demo_loss_check.py --steps 50" in lines[-1]
  assert not os.listdir(tmp_path)  # nothing written


def test_unknown_argument_is_refused():
  result = run_process(["bash", SCRIPT, "--fast"], timeout=60)
  assert result.returncode == 2
  assert "--fast" in result.stderr and "--dry-run" in result.stderr


@pytest.mark.slow
def test_demo_loss_check_passes_on_cpu():
  result = run_process([sys.executable, os.path.join(REPO, "benchmarks", "demo_loss_check.py"), "--steps", "50",
                        "--dtype", "bfloat16"], timeout=900)
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads(result.stdout.splitlines()[-1])
  assert report["passed"] and report["last10_loss"] < 0.9 * report["first5_loss"]
