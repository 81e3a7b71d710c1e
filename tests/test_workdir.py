"""The workdir: readers never write, refused runs change nothing, one writer at a time, damaged checkpoints
fall back to the previous complete step."""

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from simmim_jax import checkpoint, pretrain
from simmim_jax import workdir as workdir_lib
from snapshots import snapshot
from test_robustness import ROOT, TINY, cli, env_one_device, one_device, tiny_config


@pytest.fixture
def trained(tmp_path, monkeypatch):
  """A tiny pretraining workdir with complete checkpoints at steps 2 and 4."""
  one_device(monkeypatch)
  workdir = tmp_path / "run"
  pretrain.train_and_evaluate(tiny_config(4), str(workdir))
  return workdir


def truncate_largest_data_file(step_dir, every_file=False):
  """Cuts the step's largest data file (or every data file: which file holds the params varies) to a third."""
  files = [os.path.join(d, f) for d, _, names in os.walk(step_dir / "state") for f in names
           if os.sep + "d" + os.sep in os.path.join(d, f)]
  for path in files if every_file else [max(files, key=os.path.getsize)]:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 3)


def test_load_model_only_reads_even_beside_a_half_written_step(trained):
  (trained / "checkpoints" / "6.orbax-checkpoint-tmp-1").mkdir()  # what a live writer has in flight
  (trained / "checkpoints" / "6.orbax-checkpoint-tmp-1" / "state").write_text("half")
  before = snapshot(trained)
  model, variables, config = workdir_lib.load_model(str(trained))
  assert config.total_steps == 4 and "encoder" in variables["params"]
  _, at_step_2, _ = workdir_lib.load_model(str(trained), step=2)
  assert snapshot(trained) == before  # nothing renamed, moved, created or deleted


def test_a_reader_loop_never_disturbs_a_live_run(tmp_path):
  """load_model every few ms on the workdir of a running pretraining: the run ends with exit 0 and all its
  checkpoints; the reader sees complete checkpoints or 'no complete checkpoint (yet)', never anything else."""
  workdir = tmp_path / "live"
  steps = ["--config.total_steps=20", "--config.checkpoint_every_steps=2", "--config.keep_checkpoints=2",
           "--config.log_every_steps=1"]
  log = open(tmp_path / "live.log", "w")  # a file, not a pipe: nobody reads while the reader loops
  process = subprocess.Popen([sys.executable, "-m", "simmim_jax.main", f"--workdir={workdir}", *TINY, *steps],
                             cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env_one_device())
  loaded, not_yet = [], 0
  deadline = time.time() + 900  # generous: a loaded CI machine
  while process.poll() is None and time.time() < deadline:
    try:
      _, variables, config = workdir_lib.load_model(str(workdir))
      loaded.append(int(config.total_steps))
    except FileNotFoundError as e:
      assert "no complete checkpoint" in str(e) or "config.json does not exist" in str(e), e
      not_yet += 1
    time.sleep(0.01)
  process.wait(timeout=120)
  log.close()
  assert process.returncode == 0, (tmp_path / "live.log").read_text()[-3000:]
  assert loaded, "the reader never saw a checkpoint"
  assert checkpoint.complete_steps(str(workdir / "checkpoints")) == [18, 20]
  assert not [p for p in os.listdir(workdir / "checkpoints") if "incomplete" in p or "damaged" in p]
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert [r["step"] for r in rows] == list(range(1, 21))


def test_a_second_writer_is_refused_naming_the_holder(trained, monkeypatch):
  holder = workdir_lib.WriterLock(str(trained), "simmim-pretrain")
  try:
    before = snapshot(trained)
    with pytest.raises(workdir_lib.WorkdirBusyError, match=rf"in use by another run .*\"pid\": {os.getpid()}"):
      pretrain.train_and_evaluate(tiny_config(6), str(trained))
    assert snapshot(trained) == before
  finally:
    holder.release()
  pretrain.train_and_evaluate(tiny_config(6), str(trained))  # the lock is free again once its holder is gone
  assert checkpoint.complete_steps(str(trained / "checkpoints"))[-1] == 6


def test_a_second_cli_run_on_a_workdir_in_use_exits_2_with_one_line(tmp_path):
  workdir = tmp_path / "busy"
  workdir.mkdir()
  holder = workdir_lib.WriterLock(str(workdir), "simmim-pretrain")
  try:
    result = cli(workdir, "--config.total_steps=2")
  finally:
    holder.release()
  assert result.returncode == 2
  assert "in use by another run" in result.stderr and "Traceback" not in result.stderr
  assert sorted(os.listdir(workdir)) == ["run.lock"]


@pytest.mark.parametrize("change", [
    {"model.depth": 4},              # another model than the workdir's
    {"keep_checkpoints": 0},         # would delete every checkpoint
    {"checkpoint_every_steps": 0},   # would divide by zero after training
    {"log_every_steps": 0},
    {"model.depth": -1},
    {"data.crop_scale": (0.9, 0.1)},
], ids=lambda c: next(iter(c)))
def test_a_refused_run_leaves_the_workdir_byte_identical(trained, change):
  config = tiny_config(6)
  for key, value in change.items():
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  before = snapshot(trained)
  with pytest.raises(pretrain.ConfigError, match=rf"config\.{next(iter(change))}|another model"):
    pretrain.train_and_evaluate(config, str(trained))
  assert snapshot(trained) == before


@pytest.mark.parametrize("flag, key", [
    ("--config.keep_checkpoints=0", "config.keep_checkpoints=0"),
    ("--config.data.crop_scale=(0.9,0.1)", "config.data.crop_scale=(0.9, 0.1)"),
])
def test_invalid_values_exit_2_with_one_line_before_anything_is_written(tmp_path, flag, key):
  workdir = tmp_path / "new"
  result = cli(workdir, flag, "--config.total_steps=2")
  assert result.returncode == 2, result.stderr[-2000:]
  lines = [l for l in result.stderr.splitlines() if l.startswith("simmim-pretrain:")]
  assert len(lines) == 1 and key in lines[0], result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert not workdir.exists()


def test_a_truncated_checkpoint_resumes_from_the_previous_step_with_a_warning(trained, monkeypatch, caplog):
  truncate_largest_data_file(trained / "checkpoints" / "4")
  with caplog.at_level("WARNING"):
    state = pretrain.train_and_evaluate(tiny_config(6), str(trained))
  assert "The checkpoint of step 4 cannot be read" in caplog.text
  assert int(state.step) == 6
  assert (trained / "checkpoints" / "4.damaged").is_dir()  # set aside, not deleted
  rows = [json.loads(line) for line in open(trained / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # resumed from step 2: 3 and 4 were trained again


def test_a_reader_skips_a_damaged_latest_step_without_moving_it(trained):
  truncate_largest_data_file(trained / "checkpoints" / "4", every_file=True)
  before = snapshot(trained)
  _, latest_readable, _ = workdir_lib.load_model(str(trained))
  _, at_step_2, _ = workdir_lib.load_model(str(trained), step=2)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(latest_readable), jax.device_get(at_step_2))
  assert snapshot(trained) == before


def test_every_checkpoint_damaged_is_a_config_error_naming_the_steps(trained):
  for step in (2, 4):
    truncate_largest_data_file(trained / "checkpoints" / str(step))
  with pytest.raises(pretrain.ConfigError, match=r"step 4, 2 .* start over with another --workdir"):
    pretrain.train_and_evaluate(tiny_config(6), str(trained))


def test_a_field_set_to_its_default_resumes_and_a_changed_field_is_refused(trained):
  """Signatures compare the complete encoder fields: `--config.model.mlp_ratio=4.0` (the default, absent from
  the run's config) and a runtime field (remat) resume the same run; mlp_ratio=2 is another model."""
  config = tiny_config(4)
  assert "mlp_ratio" not in config.model and "remat" not in config.model
  with config.unlocked():
    config.model.mlp_ratio, config.model.remat = 4.0, True
  assert workdir_lib.check_resumable(str(trained), pretrain.model_signature(config)) == 4
  with config.unlocked():
    config.model.mlp_ratio = 2.0
  before = snapshot(trained)
  with pytest.raises(checkpoint.SignatureMismatchError, match="another model"):
    workdir_lib.check_resumable(str(trained), pretrain.model_signature(config))
  with pytest.raises(pretrain.ConfigError, match="another model"):
    pretrain.train_and_evaluate(config, str(trained))
  assert snapshot(trained) == before
