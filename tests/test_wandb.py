"""Optional Weights & Biases logging: an offline run holds the metrics.jsonl rows, the config and the images,
a rerun continues the same W&B run, and a config that turns it on without wandb installed is refused."""

import glob
import json
import os
import pathlib
import struct
import sys
import time

import pytest

from simmim_jax.configs import default_config
from simmim_jax.storage import metrics, safe_files, wandb_logging
from simmim_jax.train import pretrain, run, validation
from helpers import TINY, one_device, run_process, tiny_config


def run_pretrain_cli(workdir, tmp_path, *extra, prelude=""):
  """simmim-pretrain on the tiny demo run in a fresh process, W&B offline with its folders under `tmp_path`
  (`prelude`: Python run first)."""
  entry = prelude + "import sys; from simmim_jax.cli import pretrain_main; sys.exit(pretrain_main())"
  wandb_env = {"WANDB_MODE": "offline",  # no network
               "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"), "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"),
               "WANDB_DATA_DIR": str(tmp_path / "wandb_data")}
  return run_process([sys.executable, "-c", entry, f"--workdir={workdir}", *TINY, *extra], env=wandb_env)


def wandb_records(path):
  """The protobuf records of an offline run's `.wandb` file: wandb's LevelDB-style log (a 7-byte header
  ':W&B' + magic + version, then 32 KiB blocks of records: crc32, length, type FULL/FIRST/MIDDLE/LAST)."""
  from wandb.proto import wandb_internal_pb2  # pylint: disable=g-import-not-at-top

  data = pathlib.Path(path).read_bytes()
  assert data[:4] == b":W&B", data[:7]
  block, pos, chunks = 32768, 7, []
  while pos + 7 <= len(data):
    if block - pos % block < 7:  # a block's trailer too short for a record header is padding
      pos += block - pos % block
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    if kind == 0 or pos + 7 + length > len(data):  # the end, or a record still being written
      break
    chunks.append(data[pos + 7:pos + 7 + length])
    pos += 7 + length
    if kind in (1, 4):  # FULL, LAST
      record = wandb_internal_pb2.Record()
      record.ParseFromString(b"".join(chunks))
      chunks = []
      yield record


def offline_run(folder, *, with_exit_code=False):
  """(run id, config dict, history rows[, exit code]) of one offline run folder, once wandb's service process
  has written it out (it may still be writing the file when `finish()` returns)."""
  (path,) = glob.glob(os.path.join(folder, "run-*.wandb"))
  deadline = time.monotonic() + 60
  while not any(r.WhichOneof("record_type") == "exit" for r in wandb_records(path)) and time.monotonic() < deadline:
    time.sleep(0.2)
  run_id, config, rows, exit_code = None, {}, [], None
  for record in wandb_records(path):
    kind = record.WhichOneof("record_type")
    if kind == "run":
      run_id = record.run.run_id
      config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
    elif kind == "history":
      rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                   for item in record.history.item})
    elif kind == "exit":
      exit_code = record.exit.exit_code
  return (run_id, config, rows, exit_code) if with_exit_code else (run_id, config, rows)


def metric_rows(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def offline_env(monkeypatch, tmp_path):
  monkeypatch.setenv("WANDB_MODE", "offline")  # no network: wandb's documented switch, honoured by the run
  for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
    monkeypatch.setenv(name, str(tmp_path / name.lower()))


@pytest.mark.slow  # end to end, minutes of the default suite; CI runs it (pytest -m slow)
def test_offline_run_logs_the_metrics_config_and_images_and_a_rerun_continues_it(tmp_path, monkeypatch, capfd):
  pytest.importorskip("wandb")
  offline_env(monkeypatch, tmp_path)
  one_device(monkeypatch)
  workdir = tmp_path / "run"

  def train(total_steps):
    config = tiny_config(total_steps)
    config.log_every_steps, config.reconstruction_every_steps = 2, 2
    config.wandb.update(project="simmim-test", name="tiny")
    pretrain.train_and_evaluate(config, str(workdir))

  train(4)
  out, err = capfd.readouterr()
  wandb_lines = [line for line in (out + err).splitlines() if line.startswith("wandb:")]
  assert len(wandb_lines) <= 4 and "Run summary" not in out + err, wandb_lines  # quiet: where the run is, once
  run_id = (workdir / wandb_logging.RUN_ID_FILENAME).read_text().strip()
  (folder,) = glob.glob(str(workdir / "wandb" / "offline-run-*"))
  logged_id, config, rows, exit_code = offline_run(folder, with_exit_code=True)
  assert logged_id == run_id and exit_code == 0  # train_loop ended normally
  assert config["model"]["name"] == "vit_test_tiny" and config["total_steps"] == 4
  assert config["wandb"]["name"] == "tiny"

  # Every metrics.jsonl row, at its step, with the same values.
  scalar_rows = [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows if "loss" in row]
  expected = metric_rows(workdir)
  assert [r["step"] for r in expected] == [1, 2, 4]
  assert [r["step"] for r in scalar_rows] == [1, 2, 4]
  for logged, written in zip(scalar_rows, expected):
    assert logged.keys() == written.keys()
    for key, value in written.items():
      assert logged[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key
  # The reconstruction grids, as images at their steps.
  images = [row for row in rows if "reconstructions/_type" in row]  # wandb flattens the image's fields
  assert [row["step"] for row in images] == [2, 4]
  for row, step in zip(images, (2, 4)):
    assert row["reconstructions/_type"] == "image-file"
    logged = pathlib.Path(folder, "files", row["reconstructions/path"]).read_bytes()
    assert logged == (workdir / "reconstructions" / f"step_{step}.png").read_bytes()

  # A rerun with more steps continues the same W&B run, logging only its own steps.
  train(6)
  assert (workdir / wandb_logging.RUN_ID_FILENAME).read_text().strip() == run_id
  (resumed,) = set(glob.glob(str(workdir / "wandb" / "offline-run-*"))) - {folder}
  resumed_id, _, resumed_rows = offline_run(resumed)
  assert resumed_id == run_id
  assert [row["step"] for row in resumed_rows if "loss" in row] == [5, 6]
  assert [row["step"] for row in resumed_rows if "reconstructions/_type" in row] == [6]
  assert [r["step"] for r in metric_rows(workdir)] == [1, 2, 4, 5, 6]


@pytest.mark.parametrize("exit_code", [0, 143, 1])
def test_the_wandb_run_ends_with_the_training_s_outcome(exit_code, tmp_path, monkeypatch):
  """train_loop closes the writer with how it ended (0, preempted 143, failed 1); the W&B run records it."""
  pytest.importorskip("wandb")
  offline_env(monkeypatch, tmp_path)
  config = default_config.get_config()
  config.wandb.project = "simmim-test"
  writer = metrics.MetricWriter(str(tmp_path), config=config)
  writer.write(3, {"loss": 0.5})
  writer.close(exit_code, preempted=exit_code == run.PREEMPTED_EXIT_CODE)
  (folder,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
  _, _, rows, logged_exit_code = offline_run(folder, with_exit_code=True)
  assert [(row["step"], row["loss"]) for row in rows] == [(3, 0.5)]
  assert logged_exit_code == exit_code


def test_enabled_without_wandb_installed_exits_2_before_writing_anything(tmp_path):
  workdir = tmp_path / "run"
  no_wandb = "import sys; sys.modules['wandb'] = None; "  # `import wandb` now raises ImportError
  result = run_pretrain_cli(workdir, tmp_path, "--config.total_steps=2", "--config.wandb.project=simmim-test",
                            prelude=no_wandb)
  assert result.returncode == 2, result.stderr[-4000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "pip install 'simmim_jax[wandb]'" in lines[0] and "config.wandb.project" in lines[0]
  assert not workdir.exists() and not (tmp_path / "wandb_config").exists()


def test_off_by_default_and_never_imported_by_the_package(tmp_path):
  config = default_config.get_config()
  assert config.wandb.project == "" and not wandb_logging.enabled(config)
  code = ("import sys\n"
          "from simmim_jax.configs import default_config\n"
          "from simmim_jax.storage import metrics\n"
          "from simmim_jax.train import finetune, linear_probe, pretrain, run, validation\n"
          "validation.check_wandb(default_config.get_config())\n"
          "metrics.MetricWriter(sys.argv[1], config=default_config.get_config()).close()\n"
          "assert 'wandb' not in sys.modules, 'wandb was imported'\n")
  result = run_process([sys.executable, "-c", code, tmp_path], timeout=300)
  assert result.returncode == 0, result.stderr[-4000:]
  assert not (tmp_path / wandb_logging.RUN_ID_FILENAME).exists() and not (tmp_path / "wandb").exists()


@pytest.mark.parametrize("field, value", [("mode", "onlin"), ("mode", "disabled"), ("project", 3)])
def test_bad_wandb_values_are_refused(field, value):
  config = default_config.get_config()
  with config.ignore_type():
    config.wandb[field] = value
  with pytest.raises(validation.ConfigError, match=f"config.wandb.{field}"):
    validation.check_wandb(config)


def test_the_run_id_is_written_without_following_a_link(tmp_path):
  outside = tmp_path / "outside.txt"
  outside.write_text("the user's file\n")
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / f"{wandb_logging.RUN_ID_FILENAME}.tmp").symlink_to(outside)  # stale: unlinked, never followed
  wandb_logging._write_run_id(str(workdir), "abcd1234")
  assert outside.read_text() == "the user's file\n" and wandb_logging.read_run_id(str(workdir)) == "abcd1234"
  assert os.listdir(workdir) == [wandb_logging.RUN_ID_FILENAME]
  (workdir / wandb_logging.RUN_ID_FILENAME).unlink()
  (workdir / wandb_logging.RUN_ID_FILENAME).symlink_to(outside)
  with pytest.raises(safe_files.PathRefusedError, match="wandb_run_id is a symbolic link"):
    wandb_logging._write_run_id(str(workdir), "abcd1234")
  assert outside.read_text() == "the user's file\n"


KILL_WANDB_CORE_AT_STEP_3 = """
import os, signal
from simmim_jax.storage import metrics
_write = metrics.MetricWriter.write
def write(self, step, scalars):
  if step == 3:  # wandb's service process dies mid-run
    for pid in filter(str.isdigit, os.listdir("/proc")):
      try:
        stat = open(f"/proc/{pid}/stat").read()
      except OSError:
        continue
      name, parent = stat[stat.index("(") + 1:stat.rindex(")")], int(stat[stat.rindex(")") + 2:].split()[1])
      if "wandb" in name and parent == os.getpid():
        os.kill(int(pid), signal.SIGKILL)
        print("killed wandb-core", flush=True)
  return _write(self, step, scalars)
metrics.MetricWriter.write = write
"""


@pytest.mark.slow  # end to end through a subprocess; .ci/run runs it
def test_killing_wandb_core_mid_run_is_one_warning_and_every_checkpoint_is_written(tmp_path):
  """Before: a ConnectionResetError traceback, and the step being saved left as N.orbax-checkpoint-tmp."""
  pytest.importorskip("wandb")
  workdir = tmp_path / "run"
  result = run_pretrain_cli(workdir, tmp_path, "--config.total_steps=8", "--config.checkpoint_every_steps=2",
                            "--config.log_every_steps=1", "--config.wandb.project=simmim-test",
                            "--config.reconstruction_every_steps=0", prelude=KILL_WANDB_CORE_AT_STEP_3)
  assert result.returncode == 0, result.stderr[-4000:]
  assert "killed wandb-core" in result.stdout and "step 8/8" in result.stdout
  assert "Traceback" not in result.stderr, result.stderr[-4000:]
  assert result.stderr.count("continues without W&B") == 1, result.stderr[-4000:]
  names = sorted(p.name for p in (workdir / "checkpoints").iterdir())
  assert names == ["6", "8"]  # the demo's keep_checkpoints=2, nothing half-written
  assert [r["step"] for r in metric_rows(workdir)] == list(range(1, 9))
