"""The workdir: readers never write, refused runs change nothing, one writer at a time, damaged checkpoints
fall back to the previous complete step."""

import errno
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from simmim_jax.storage import checkpoint, safe_files, visualize
import simmim_jax
from simmim_jax import cli
from simmim_jax.train import pretrain
from simmim_jax.storage import workdir as workdir_lib
from helpers import ROOT, TINY, env_one_device, one_device, run_pretrain, snapshot, tiny_config, write_folder


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory):
  """A tiny pretraining workdir with complete checkpoints at steps 2 and 4, trained once for the module."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  with pytest.MonkeyPatch.context() as monkeypatch:
    one_device(monkeypatch)
    pretrain.train_and_evaluate(tiny_config(4), str(workdir))
  return workdir


@pytest.fixture
def trained(trained_once, tmp_path, monkeypatch):
  """A copy of `trained_once` of the test's own (tests change, damage or lock it); one device."""
  one_device(monkeypatch)
  workdir = tmp_path / "run"
  shutil.copytree(trained_once, workdir, symlinks=True)
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
  public_model, public, _ = simmim_jax.load_model(str(trained))  # the public API (README)
  assert isinstance(public_model, type(model))
  jax.tree.map(np.testing.assert_array_equal, public, variables)
  assert snapshot(trained) == before  # nothing renamed, moved, created or deleted


@pytest.mark.slow  # end to end, minutes of the default suite; CI runs it (pytest -m slow)
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


@pytest.mark.slow  # a real process; test_a_second_writer_is_refused_naming_the_holder covers the lock by default
def test_a_second_cli_run_on_a_workdir_in_use_exits_2_with_one_line(tmp_path):
  workdir = tmp_path / "busy"
  workdir.mkdir()
  holder = workdir_lib.WriterLock(str(workdir), "simmim-pretrain")
  try:
    result = run_pretrain(workdir, "--config.total_steps=2")
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
def test_invalid_values_exit_2_with_one_line_before_anything_is_written(tmp_path, flag, key, capfd):
  workdir = tmp_path / "new"
  status = cli.pretrain_main([f"--workdir={workdir}", *TINY, flag, "--config.total_steps=2"])  # in process
  err = capfd.readouterr().err
  assert status == 2, err[-2000:]
  lines = [l for l in err.splitlines() if l.startswith("simmim-pretrain:")]
  assert len(lines) == 1 and key in lines[0], err[-2000:]
  assert "Traceback" not in err
  assert not workdir.exists()


def test_a_truncated_checkpoint_resumes_from_the_previous_step_with_a_warning(trained, monkeypatch, caplog):
  truncate_largest_data_file(trained / "checkpoints" / "4")
  with caplog.at_level("WARNING"):
    state = pretrain.train_and_evaluate(tiny_config(6), str(trained))
  assert "The checkpoint of step 4 cannot be read" in caplog.text
  assert int(state.step) == 6
  assert (trained / "checkpoints_set_aside" / "4.damaged").is_dir()  # set aside, not deleted
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
  assert workdir_lib.check_resumable(str(trained), pretrain.RECIPE.signature(config)) == 4
  with config.unlocked():
    config.model.mlp_ratio = 2.0
  before = snapshot(trained)
  with pytest.raises(checkpoint.SignatureMismatchError, match="another model"):
    workdir_lib.check_resumable(str(trained), pretrain.RECIPE.signature(config))
  with pytest.raises(pretrain.ConfigError, match="another model"):
    pretrain.train_and_evaluate(config, str(trained))
  assert snapshot(trained) == before


# ----------------------------------------------------------------------------------------------------
# Writes never leave the workdir (safe_files), and failures to write are one line


def digests(folder) -> dict[str, str]:
  """sha256 of every file under `folder` (links not followed): what must stay byte-identical."""
  return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
          for path in sorted(pathlib.Path(folder).rglob("*")) if path.is_file() and not path.is_symlink()}


LINKED_NAMES = ["run.lock", "run.log", "config.json", "config.json.tmp", "metrics.jsonl.tmp", "wandb_run_id.tmp",
                "reconstructions/step_2.png", "checkpoints", "dangling:metrics.jsonl"]


@pytest.mark.parametrize("name", LINKED_NAMES)
def test_a_link_at_a_name_the_run_writes_is_refused_with_exit_2_and_nothing_outside_changes(tmp_path, monkeypatch,
                                                                                           capsys, name):
  one_device(monkeypatch)
  outside = tmp_path / "outside"
  (outside / "folder").mkdir(parents=True)
  (outside / "file").write_text('{"the user\'s": "file"}\n')
  workdir = tmp_path / "run"
  (workdir / "reconstructions").mkdir(parents=True)
  dangling = name.startswith("dangling:")
  name = name.removeprefix("dangling:")
  target = outside / ("created_by_the_link" if dangling else "folder" if name == "checkpoints" else "file")
  (workdir / name).symlink_to(target)
  before = digests(outside)
  status = cli.run_program("simmim-pretrain", lambda: pretrain.train_and_evaluate(tiny_config(2), str(workdir)))
  err = capsys.readouterr().err
  assert status == 2 and err.count("\n") == 1, err
  assert err.startswith("simmim-pretrain: refused: ") and f"{name} is a symbolic link" in err, err
  assert digests(outside) == before and not (outside / "created_by_the_link").exists()
  assert sorted(os.listdir(workdir)) == sorted({"reconstructions", name.split("/")[0]})  # nothing written


@pytest.mark.slow  # trains two steps (about 20 s on a loaded machine); test_safe_files covers each write at once
def test_a_link_that_appears_mid_run_is_refused_at_its_write(tmp_path, monkeypatch):
  one_device(monkeypatch)
  outside = tmp_path / "outside.png"
  outside.write_bytes(b"the user's picture")
  original = visualize.save_png

  def link_first(grid, path, *args, **kwargs):  # another process plants a link just before the write
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.symlink(outside, path)
    return original(grid, path, *args, **kwargs)

  monkeypatch.setattr(visualize, "save_png", link_first)
  with pytest.raises(safe_files.PathRefusedError, match=r"step_2.png is a symbolic link"):
    pretrain.train_and_evaluate(tiny_config(2), str(tmp_path / "run"))
  assert outside.read_bytes() == b"the user's picture"


def test_a_run_lock_without_permission_is_exit_2_in_one_line(tmp_path, monkeypatch, capsys):
  one_device(monkeypatch)
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "run.lock").write_text("")
  if os.geteuid() == 0:  # root opens any file: refuse it as the kernel refuses a user
    original = os.open
    monkeypatch.setattr(os, "open", lambda path, flags, *a, **k: (_ for _ in ()).throw(
        PermissionError(errno.EACCES, os.strerror(errno.EACCES))) if path == "run.lock" else original(
            path, flags, *a, **k))
  else:
    (workdir / "run.lock").chmod(0o444)
  status = cli.run_program("simmim-pretrain", lambda: pretrain.train_and_evaluate(tiny_config(2), str(workdir)))
  err = capsys.readouterr().err
  assert status == 2 and err.count("\n") == 1 and "run.lock: permission denied" in err, err
  assert sorted(os.listdir(workdir)) == ["run.lock"]


def test_a_full_disk_writing_config_json_is_exit_1_in_one_line_without_a_temporary_file(tmp_path, monkeypatch,
                                                                                         capsys):
  one_device(monkeypatch)
  monkeypatch.setattr(safe_files, "_write", lambda fd, data: (_ for _ in ()).throw(
      OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
  workdir = tmp_path / "run"
  status = cli.run_program("simmim-pretrain", lambda: pretrain.train_and_evaluate(tiny_config(2), str(workdir)))
  err = capsys.readouterr().err
  assert status == 1 and err.count("\n") == 1, err
  assert "stopped: cannot write" in err and "config.json: No space left on device" in err, err
  assert sorted(os.listdir(workdir)) == ["run.lock"]  # no config.json, no config.json.tmp


def test_config_json_is_strict_json_with_null_for_a_non_finite_float(tmp_path):
  config = tiny_config(2)
  config.optimizer.weight_decay = float("nan")  # refused by the checks; written strictly if it ever got here
  workdir_lib.write_config(str(tmp_path), config, recipe="pretrain")
  text = (tmp_path / "config.json").read_text()
  assert "NaN" not in text and json.loads(text)["optimizer"]["weight_decay"] is None
  assert workdir_lib.read_config(str(tmp_path)).optimizer.weight_decay is None


@pytest.mark.slow
def test_a_cli_run_on_a_workdir_with_a_linked_run_log_exits_2_naming_it(tmp_path):
  outside = tmp_path / "outside.log"
  outside.write_text("the user's log\n")
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "run.log").symlink_to(outside)
  result = run_pretrain(workdir, "--config.total_steps=2")
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.splitlines() == [result.stderr.strip()] and "run.log is a symbolic link" in result.stderr
  assert outside.read_text() == "the user's log\n" and os.listdir(workdir) == ["run.log"]


@pytest.mark.parametrize("obstacle", ["a file", "read-only"])
def test_an_unwritable_checkpoints_folder_is_refused_before_anything_is_written(tmp_path, obstacle):
  """Found when the run starts (exit 2, one line), not at its first save after training an interval."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  if obstacle == "a file":
    (workdir / "checkpoints").write_text("not a folder")
  else:
    if os.geteuid() == 0:
      pytest.skip("root writes into read-only folders")
    (workdir / "checkpoints").mkdir(mode=0o555)
  before = snapshot(workdir)
  config = tiny_config(2)
  with pytest.raises(workdir_lib.ConfigError, match=r"checkpoints' (exists and is not a folder|is not writable): "
                                                    "the run saves its checkpoints there"):
    workdir_lib.open_for_writing(str(workdir), config, pretrain.RECIPE.signature(config), "simmim-pretrain",
                                 recipe="pretrain")
  assert snapshot(workdir) == before


# ----------------------------------------------------------------------------------------------------
# The one reader: its damaged-step policy, the recipe config.json records, and reading that never writes

SMALL_SIGNATURE = {"model": {"name": "small"}, "img_size": 8}


def small_workdir(root, steps, **meta):
  """A workdir whose checkpoint of each step holds {"params": {"w": [step] * 3}}: the reader reads any state."""
  checkpointer = checkpoint.Checkpointer(workdir_lib.checkpoint_dir(str(root)))
  for step in steps:
    checkpointer.save(step, {"params": {"w": np.full(3, step, np.float32)}}, {"signature": SMALL_SIGNATURE, **meta})
  checkpointer.close()
  return root


def small_state(sharded=True):
  """(abstract state, shardings) of `small_workdir`'s checkpoints, on one device."""
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return ({"params": {"w": jax.ShapeDtypeStruct((3,), np.float32, sharding=device if sharded else None)}},
          {"params": {"w": device}})


def test_the_reader_skips_a_damaged_latest_step_and_leaves_it_where_it_is(tmp_path):
  workdir = small_workdir(tmp_path / "run", (1, 2))
  truncate_largest_data_file(workdir / "checkpoints" / "2", every_file=True)
  before = snapshot(workdir)
  step, state, _ = workdir_lib.read_checkpoint(str(workdir), small_state()[0])
  assert step == 1 and state["params"]["w"].tolist() == [1, 1, 1]
  step, state, _ = workdir_lib.read_latest_state(str(workdir), SMALL_SIGNATURE, *small_state(sharded=False))
  assert step == 1 and state["params"]["w"].tolist() == [1, 1, 1]  # config.eval_only reads the same way
  assert snapshot(workdir) == before  # nothing renamed, moved, created or deleted


def test_a_damaged_step_asked_for_or_every_step_damaged_is_an_error_naming_it(tmp_path):
  workdir = small_workdir(tmp_path / "run", (1, 2))
  truncate_largest_data_file(workdir / "checkpoints" / "2", every_file=True)
  before = snapshot(workdir)
  with pytest.raises(checkpoint.DamagedCheckpointError, match="checkpoint of step 2 .* cannot be read"):
    workdir_lib.read_checkpoint(str(workdir), small_state()[0], step=2)
  with pytest.raises(FileNotFoundError, match="no complete checkpoint of step 3"):
    workdir_lib.read_checkpoint(str(workdir), small_state()[0], step=3)
  assert snapshot(workdir) == before
  truncate_largest_data_file(workdir / "checkpoints" / "1", every_file=True)
  before = snapshot(workdir)
  with pytest.raises(checkpoint.DamagedCheckpointError, match=r"step 2, 1 .* cannot be read"):
    workdir_lib.read_checkpoint(str(workdir), small_state()[0])
  assert snapshot(workdir) == before


def test_eval_only_reads_nothing_from_an_empty_workdir_and_refuses_another_model(tmp_path):
  assert workdir_lib.read_latest_state(str(tmp_path), SMALL_SIGNATURE, *small_state(False)) == (0, None, {})
  workdir = small_workdir(tmp_path / "run", (1,))
  before = snapshot(workdir)
  with pytest.raises(workdir_lib.ConfigError, match="another model"):
    workdir_lib.read_latest_state(str(workdir), {**SMALL_SIGNATURE, "img_size": 16}, *small_state(False))
  assert snapshot(workdir) == before


def test_converted_weights_are_read_from_step_0_only_when_converted(tmp_path):
  converted = small_workdir(tmp_path / "converted", (0,), converted_from="weights.pth")
  params = small_state()[0]["params"]
  before = snapshot(converted)
  assert workdir_lib.read_converted_params(str(converted), params)["w"].tolist() == [0, 0, 0]
  assert snapshot(converted) == before
  assert workdir_lib.read_converted_params(str(small_workdir(tmp_path / "trained", (0,))), params) is None
  assert workdir_lib.read_converted_params(str(tmp_path / "nothing"), params) is None
  truncate_largest_data_file(converted / "checkpoints" / "0", every_file=True)
  before = snapshot(converted)
  with pytest.raises(checkpoint.DamagedCheckpointError, match="checkpoint of step 0 .* cannot be read"):
    workdir_lib.read_converted_params(str(converted), params)
  assert snapshot(converted) == before


def test_config_json_records_the_recipe_and_a_legacy_config_json_still_loads(trained):
  assert json.loads((trained / "config.json").read_text())["recipe"] == "pretrain"
  model, _, config = workdir_lib.load_model(str(trained))
  assert isinstance(model, workdir_lib.models.SimMIM) and workdir_lib.recipe_of(config) == "pretrain"
  legacy = json.loads((trained / "config.json").read_text())
  del legacy["recipe"]  # config.json as runs wrote it before it recorded its recipe
  (trained / "config.json").write_text(json.dumps(legacy))
  before = snapshot(trained)
  model, _, config = workdir_lib.load_model(str(trained))
  assert isinstance(model, workdir_lib.models.SimMIM) and workdir_lib.recipe_of(config) == "pretrain"
  assert snapshot(trained) == before


@pytest.mark.parametrize("recipe, message", [("linear_probe", "simmim-linear-probe workdir \\(probe heads"),
                                             ("distill", "simmim-distill workdir")])
def test_a_workdir_of_a_recipe_without_a_model_is_refused_naming_the_recipe(tmp_path, recipe, message):
  workdir_lib.write_config(str(tmp_path), tiny_config(2), recipe=recipe)
  with pytest.raises(ValueError, match=message):
    workdir_lib.load_model(str(tmp_path))
  with pytest.raises(ValueError, match="give a simmim-pretrain / simmim-convert workdir"):
    workdir_lib.load_model(str(tmp_path), recipes=workdir_lib.SIMMIM_RECIPES)


@pytest.mark.parametrize("recipe", ["finetune", "linear_probe"])
def test_config_pretrained_naming_a_workdir_of_another_recipe_is_a_config_error(tmp_path, recipe):
  from simmim_jax.configs import finetune_config  # pylint: disable=g-import-not-at-top
  from simmim_jax.train import downstream  # pylint: disable=g-import-not-at-top
  workdir_lib.write_config(str(tmp_path), finetune_config.get_config(), recipe=recipe)
  config = finetune_config.get_config()
  config.pretrained = str(tmp_path)
  with pytest.raises(workdir_lib.ConfigError, match=rf"workdir of the recipe '{recipe}', not a simmim-pretrain"):
    downstream.resolve_config(config)


@pytest.mark.slow  # trains a tiny fine-tuning (about a minute on a loaded machine); CI runs it
def test_eval_only_evaluates_the_latest_readable_step_of_a_finetune_workdir_and_writes_nothing(trained, tmp_path):
  from simmim_jax.configs import finetune_config  # pylint: disable=g-import-not-at-top
  from simmim_jax.train import finetune  # pylint: disable=g-import-not-at-top
  config = finetune_config.get_config()
  config.update(pretrained=str(trained), img_size=32, global_batch_size=8, total_steps=4, warmup_steps=1,
                eval_every_steps=2, checkpoint_every_steps=2)
  config.data.update(source="folder", data_dir=str(write_folder(tmp_path / "folder")), eval_split="test")
  workdir = tmp_path / "finetune"
  finetune.train_and_evaluate(config, str(workdir))
  assert json.loads((workdir / "config.json").read_text())["recipe"] == "finetune"
  truncate_largest_data_file(workdir / "checkpoints" / "4", every_file=True)
  before = snapshot(workdir)
  config.eval_only = True
  outputs = finetune.train_and_evaluate(config, str(workdir))
  assert 0 <= outputs["eval_top1"] <= 100  # step 2's parameters: step 4 is skipped, not moved
  assert snapshot(workdir) == before
