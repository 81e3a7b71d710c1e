"""End to end: the simmim-pretrain CLI writes its workdir, resumes exactly, and loads back for users."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from simmim_jax import checkpoint, pretrain
from simmim_jax import workdir as workdir_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--config.model.embed_dim=32", "--config.model.depth=2", "--config.model.num_heads=2",
        "--config.global_batch_size=16", "--config.data.num_demo_images=64", "--config.warmup_steps=1"]


def run_cli(workdir, *extra, timeout=600):
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
  env.pop("XLA_FLAGS", None)  # one CPU device, as a user's laptop
  return subprocess.run(
      [sys.executable, "-m", "simmim_jax.main", "--config=configs/demo.py", f"--workdir={workdir}", *TINY,
       *extra], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_short_cli_run_writes_every_file(tmp_path):
  workdir = tmp_path / "run"
  result = run_cli(workdir, "--config.total_steps=4", "--config.log_every_steps=2",
                   "--config.checkpoint_every_steps=2", "--config.reconstruction_every_steps=2")
  assert result.returncode == 0, result.stderr[-4000:]
  assert "step 4/4" in result.stdout and "img/s" in result.stdout and "ETA" in result.stdout
  rows = read_metrics(workdir)
  assert [r["step"] for r in rows] == [1, 2, 4]  # the first step, every log step, the last
  assert {"step", "loss", "lr", "img_per_sec", "grad_norm"} <= set(rows[-1])
  assert rows[-1]["img_per_sec"] > 0
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir / "tensorboard"))
  config = json.loads((workdir / "config.json").read_text())
  assert config["model"]["embed_dim"] == 32 and config["total_steps"] == 4
  for step in (2, 4):
    grid = np.asarray(Image.open(workdir / "reconstructions" / f"step_{step}.png"))
    assert grid.ndim == 3 and grid.shape[2] == 3 and grid.shape[1] > grid.shape[0] / 8 * 3.9 / 1.1
    assert grid.std() > 10  # real pictures, not a blank canvas


def test_interrupted_run_resumes_and_continues_exactly_like_an_uninterrupted_run(tmp_path):
  """A run that died after its step-3 checkpoint (simulated: the step-6 checkpoint and later metrics are
  removed) is resumed by rerunning the same command, and then matches the uninterrupted run bit for bit."""
  common = ["--config.total_steps=6", "--config.log_every_steps=1", "--config.checkpoint_every_steps=3",
            "--config.reconstruction_every_steps=0"]
  straight = tmp_path / "straight"
  assert run_cli(straight, *common).returncode == 0
  crashed = tmp_path / "crashed"
  shutil.copytree(straight, crashed)
  shutil.rmtree(crashed / "checkpoints" / "6")
  with open(crashed / "metrics.jsonl", "a") as f:
    f.write('{"step": 7, "loss": 0.1')  # a torn line, as a killed process may leave
  resumed = run_cli(crashed, *common)
  assert resumed.returncode == 0, resumed.stderr[-4000:]
  assert "from step 3" in resumed.stdout
  straight_rows, resumed_rows = read_metrics(straight), read_metrics(crashed)
  assert [r["step"] for r in resumed_rows] == [1, 2, 3, 4, 5, 6]  # no repeated steps, no torn line
  # Bit for bit: same params, masks from fold_in(key, step), data stream from the global sample index.
  assert [r["loss"] for r in resumed_rows] == [r["loss"] for r in straight_rows]
  _, variables_straight, _ = workdir_lib.load_model(str(straight))
  _, variables_resumed, _ = workdir_lib.load_model(str(crashed))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(variables_straight),
               jax.device_get(variables_resumed))
  # A finished run rerun as is does nothing.
  again = run_cli(crashed, *common)
  assert again.returncode == 0 and "Nothing to do" in again.stdout


@pytest.mark.slow  # end to end through subprocesses; .ci/run runs it
def test_rerun_with_more_steps_extends_the_run(tmp_path):
  workdir = tmp_path / "run"
  common = ["--config.log_every_steps=1", "--config.reconstruction_every_steps=0"]
  assert run_cli(workdir, "--config.total_steps=2", *common).returncode == 0
  longer = run_cli(workdir, "--config.total_steps=4", *common)
  assert longer.returncode == 0, longer.stderr[-4000:]
  assert "from step 2" in longer.stdout and "step 4/4" in longer.stdout
  assert [r["step"] for r in read_metrics(workdir)] == [1, 2, 3, 4]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]


def test_load_model_gives_a_usable_model(tmp_path):
  workdir = tmp_path / "run"
  assert run_cli(workdir, "--config.total_steps=2", "--config.reconstruction_every_steps=0").returncode == 0
  model, variables, config = workdir_lib.load_model(str(workdir))
  assert config.model.embed_dim == 32 and config.img_size == 32
  images = np.zeros((2, 32, 32, 3), np.float32)
  mask = np.ones((2, 8, 8), np.int32)
  out = model.apply(variables, images, mask)
  assert out["reconstruction"].shape == (2, 32, 32, 3) and np.isfinite(out["loss"])


def test_config_error_exits_with_status_2_and_a_message(tmp_path):
  result = run_cli(tmp_path / "bad", "--config.mask_ratio=1.5")
  assert result.returncode == 2
  assert "mask_ratio=1.5" in result.stderr and "Traceback" not in result.stderr


def test_a_mistyped_key_is_one_clean_line_naming_it_and_the_closest_key(tmp_path):
  result = run_cli(tmp_path / "typo", "--config.optimizer.base_l=0.1")
  assert result.returncode == 2
  errors = [line for line in result.stderr.splitlines() if "configuration error" in line]
  assert errors == ["configuration error: unknown config key --config.optimizer.base_l (did you mean "
                    "--config.optimizer.base_lr?): every --config.KEY must be a field of the config file"]
  assert "Traceback" not in result.stderr and not (tmp_path / "typo").exists()


def test_missing_workdir_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    workdir_lib.load_model(str(tmp_path / "nothing_here"))


@pytest.mark.slow  # end to end through a subprocess; .ci/run runs it
def test_swin_demo_config_trains_and_its_loss_falls(tmp_path):
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
  env.pop("XLA_FLAGS", None)
  workdir = tmp_path / "swin"
  result = subprocess.run(
      [sys.executable, "-m", "simmim_jax.main", "--config=configs/demo_swin.py", f"--workdir={workdir}",
       "--config.total_steps=40", "--config.log_every_steps=10", "--config.reconstruction_every_steps=0"],
      cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
  assert result.returncode == 0, result.stderr[-4000:]
  rows = read_metrics(workdir)
  assert [r["step"] for r in rows] == [1, 10, 20, 30, 40]
  assert rows[-1]["loss"] < 0.9 * rows[0]["loss"], rows
