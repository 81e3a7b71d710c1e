"""Robustness: bad images, bad configs, NaNs, kills and disk faults never lose work or fail silently."""

import io
import json
import logging
import pathlib
import random
import shutil
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from simmim_jax.storage import checkpoint
from simmim_jax import cli, data
from simmim_jax.configs import default_config
from simmim_jax.train import pretrain, run
from simmim_jax.storage import workdir as workdir_lib
from simmim_jax.data import decode
from helpers import (PRETRAIN, ROOT, TINY, env_one_device, inject_nan_batches, one_device, run_pretrain, run_process,
                     tiny_config)


def photo(height=48, width=64, seed=0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:height, 0:width]
  base = np.stack([yy * 255 // max(height - 1, 1), xx * 255 // max(width - 1, 1),
                   np.full_like(yy, 128)], -1)
  return np.clip(base + rng.integers(-10, 10, base.shape), 0, 255).astype(np.uint8)


def encode(image: Image.Image, fmt: str) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, fmt)
  return buffer.getvalue()


def write_bad_folder(root: pathlib.Path) -> dict[str, str]:
  """A folder with every kind of image a real dataset holds; returns {name: 'ok' | 'bad'}."""
  root.mkdir(parents=True)
  rgb = Image.fromarray(photo())
  good_jpeg = encode(rgb, "JPEG")
  files = {
      "a_good.jpg": (good_jpeg, "ok"),
      "gray.png": (encode(rgb.convert("L"), "PNG"), "ok"),
      "rgba.png": (encode(rgb.convert("RGBA"), "PNG"), "ok"),
      "palette.png": (encode(rgb.convert("P"), "PNG"), "ok"),
      "sixteen_bit.png": (encode(Image.fromarray((photo()[..., 0].astype(np.uint16) * 257)), "PNG"), "ok"),
      "cmyk.jpg": (encode(rgb.convert("CMYK"), "JPEG"), "ok"),
      "tiny.png": (encode(Image.fromarray(photo(3, 2)), "PNG"), "ok"),
      "huge.jpg": (encode(Image.fromarray(photo(3000, 4000)), "JPEG"), "ok"),
      "truncated.jpg": (good_jpeg[: len(good_jpeg) // 2], "bad"),
      "corrupt.png": (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "bad"),
      "zero_bytes.jpg": (b"", "bad"),
      "not_an_image.jpg": (b"this is a text file with an image name\n", "bad"),
  }
  for name, (content, _) in files.items():
    (root / name).write_bytes(content)
  (root / "notes.txt").write_text("not an image, ignored by extension")
  return {name: kind for name, (_, kind) in files.items()}


def test_every_decodable_mode_becomes_rgb_and_broken_files_raise(tmp_path):
  kinds = write_bad_folder(tmp_path / "imgs")
  for name, kind in kinds.items():
    content = (tmp_path / "imgs" / name).read_bytes()
    if kind == "bad":
      with pytest.raises(decode.DECODE_ERRORS):
        decode.decode_rgb(content)
      continue
    image = decode.decode_rgb(content, min_side=128)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, name
  sixteen = decode.decode_rgb((tmp_path / "imgs" / "sixteen_bit.png").read_bytes())
  np.testing.assert_array_equal(sixteen[..., 0], photo()[..., 0])  # 16-bit scaled back to 8 bits
  huge = decode.decode_rgb((tmp_path / "imgs" / "huge.jpg").read_bytes(), min_side=128)
  assert 128 <= min(huge.shape[:2]) < 3000  # decoded at a reduced JPEG scale


def folder_config(folder, strict=False):
  config = default_config.get_config().data
  config.source, config.data_dir, config.strict = "folder", str(folder), strict
  return config


def test_folder_with_bad_files_skips_counts_and_logs_each_once(tmp_path, caplog):
  kinds = write_bad_folder(tmp_path / "imgs")
  bad = sorted(str(tmp_path / "imgs" / n) for n, k in kinds.items() if k == "bad")
  with caplog.at_level(logging.WARNING):
    batches = data.create_pretrain_iterator(folder_config(tmp_path / "imgs"), image_size=16,
                                            global_batch_size=12, seed=0)
    for _ in range(5):  # 5 epochs of the 12 files
      batch = next(batches)
      assert batch["image"].shape == (12, 16, 16, 3) and np.isfinite(batch["image"]).all()
  assert batches.skipped_images == len(bad) == 4  # the iterator's own count (the run's, not the process's)
  for path in bad:
    assert sum(path in r.getMessage() for r in caplog.records) == 1, path  # logged once


def test_strict_mode_stops_naming_the_file(tmp_path):
  write_bad_folder(tmp_path / "imgs")
  batches = data.create_pretrain_iterator(folder_config(tmp_path / "imgs", strict=True), image_size=16,
                                          global_batch_size=12, seed=0)
  with pytest.raises(data.DataError, match=r"cannot decode image .*(truncated|corrupt|zero_bytes|not_an_image)"):
    for _ in range(3):
      next(batches)


def test_folder_without_readable_images_fails_at_start(tmp_path):
  (tmp_path / "broken").mkdir()
  (tmp_path / "broken" / "x.jpg").write_bytes(b"nope")
  (tmp_path / "empty").mkdir()
  for folder, message in (("broken", "none can be decoded"), ("empty", "holds no images")):
    config = default_config.get_config()
    config.data = folder_config(tmp_path / folder)
    with pytest.raises(pretrain.ConfigError, match=message):
      pretrain.validate_config(config)


@pytest.mark.parametrize("args, message", [
    (["--config.unknown_key=3"], "unknown config key --config.unknown_key"),
    (["--config.mask_ratio=abc"], "could not convert string to float"),
    (["--config.img_size=30"], "img_size"),
    (["--config.global_batch_size=0"], "global_batch_size=0"),
    (["--config.model.name=vit_enormous"], "vit_enormous"),
    (["--config.data.source=tfds", "--config.data.name=no_such_dataset_xyz"], "no_such_dataset_xyz"),
    (["--config.data.source=folder", "--config.data.data_dir=/nonexistent/images"], "/nonexistent/images"),
])
def test_invalid_configs_exit_2_with_a_message_and_no_traceback(tmp_path, args, message, capfd):
  """In process (the exit status of a real process: test_missing_config_file_and_unwritable_workdir)."""
  status = cli.pretrain_main([f"--workdir={tmp_path / 'w'}", *TINY, *args])
  err = capfd.readouterr().err
  assert status == 2, err[-2000:]
  assert message in err and "Traceback" not in err and not (tmp_path / "w").exists()


def test_missing_config_file_and_unwritable_workdir(tmp_path):
  result = run_process([*PRETRAIN, "--config=nope", f"--workdir={tmp_path}"], timeout=120)
  assert result.returncode == 2 and "--config=nope" in result.stderr and "Traceback" not in result.stderr
  (tmp_path / "a_file").write_text("x")
  result = run_pretrain(tmp_path / "a_file" / "workdir")  # a workdir below a regular file cannot be created
  assert result.returncode == 2 and "a_file/workdir" in result.stderr


@pytest.mark.slow  # end to end, minutes of the default suite; CI runs it (pytest -m slow)
def test_workdir_of_another_model_is_refused_and_left_intact(tmp_path):
  workdir = tmp_path / "w"
  assert run_pretrain(workdir, "--config.total_steps=1").returncode == 0
  before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
  result = run_pretrain(workdir, "--config.total_steps=2", "--config.model.embed_dim=64")
  assert result.returncode == 2 and "another model" in result.stderr and "Traceback" not in result.stderr
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before


def _tiny_state_and_target():
  state = {"w": jnp.ones((3,), jnp.float32)}
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return state, jax.eval_shape(lambda: state), jax.tree.map(lambda _: device, state)


def test_restore_latest_resumes_a_checkpoint_of_the_same_signature_and_skips_step_zero(tmp_path):
  state, abstract, shardings = _tiny_state_and_target()
  checkpointer = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
  assert checkpoint.restore_latest(checkpointer, {"model": "a"}, abstract, shardings) == (0, None, {})
  checkpointer.save(0, state, {"signature": {"model": "a"}})
  checkpointer.wait()
  # Step 0 alone (a simmim-convert workdir's weights) is not resumed: the recipe's init reads it.
  assert checkpoint.restore_latest(checkpointer, {"model": "a"}, abstract, shardings) == (0, None, {})
  checkpointer.save(2, {"w": state["w"] + 1}, {"signature": {"model": "a"}, "best_top1": 5.0})
  checkpointer.wait()
  step, restored, meta = checkpoint.restore_latest(checkpointer, {"model": "a"}, abstract, shardings)
  assert step == 2 and meta["best_top1"] == 5.0
  np.testing.assert_array_equal(restored["w"], [2.0, 2.0, 2.0])
  assert restored["w"].sharding == shardings["w"]
  checkpointer.close()


def test_restore_latest_refuses_another_signature_before_reading_the_state_and_closes(tmp_path, monkeypatch):
  state, abstract, shardings = _tiny_state_and_target()
  checkpointer = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
  checkpointer.save(1, state, {"signature": {"model": "a"}})
  checkpointer.wait()
  calls = []
  monkeypatch.setattr(checkpoint.Checkpointer, "restore", lambda self, *args: calls.append("restore"))
  original_close = checkpoint.Checkpointer.close
  monkeypatch.setattr(checkpoint.Checkpointer, "close", lambda self: (calls.append("close"), original_close(self)))
  with pytest.raises(checkpoint.SignatureMismatchError,
                     match=r"checkpoints holds checkpoints of another model \(\{'model': 'a'\}\), not of this "
                           r"config's \{'model': 'b'\}"):
    checkpoint.restore_latest(checkpointer, {"model": "b"}, abstract, shardings)
  assert calls == ["close"]


def test_repeated_interruptions_of_the_same_step_are_all_set_aside(tmp_path):
  """Two kills while step 24 was being written leave two leftovers of one name: the second must not stop
  the restart (found by the kill -9 test)."""
  root = tmp_path / "checkpoints"

  def half_written(name):
    (root / name).mkdir(parents=True)
    (root / name / "state").write_text(name)

  half_written("24.orbax-checkpoint-tmp-1")
  assert checkpoint.set_aside_incomplete(str(root)) == [str(root / "24.orbax-checkpoint-tmp-1")]
  half_written("24.orbax-checkpoint-tmp-1")  # the next run was killed at the same point
  half_written("24")  # and a step directory that never got its commit marker
  assert len(checkpoint.set_aside_incomplete(str(root))) == 2
  assert list(root.iterdir()) == []
  assert sorted(p.name for p in (tmp_path / "checkpoints_set_aside").iterdir()) == [
      "24.incomplete", "24.orbax-checkpoint-tmp-1.incomplete", "24.orbax-checkpoint-tmp-1.incomplete.1"]
  assert checkpoint.set_aside_incomplete(str(root)) == []  # what was set aside stays aside


@pytest.mark.slow  # the core's skip: test_recipe_contract and the NaN-step unit test run by default
def test_a_nan_batch_is_skipped_and_parameters_stay_finite(tmp_path, monkeypatch):
  one_device(monkeypatch)
  inject_nan_batches(monkeypatch, {3})
  state = pretrain.train_and_evaluate(tiny_config(4), str(tmp_path))
  assert int(state.step) == 4 and int(state.nonfinite_streak) == 0
  assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(state.params))
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert rows[2]["loss"] is None and rows[2]["skipped_steps"] == 1 and rows[3]["skipped_steps"] == 1  # NaN: null
  _, variables, _ = workdir_lib.load_model(str(tmp_path))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(variables)))


def test_a_nan_step_leaves_params_and_optimizer_state_untouched(monkeypatch):
  config = tiny_config(4)
  model = pretrain.build_model(config)
  from simmim_jax.train import optim
  tx, schedule = optim.create_optimizer(config)
  state = pretrain.init_train_state(model, tx, jax.random.key(0))
  step = jax.jit(pretrain.make_train_step(config, model, tx, schedule))
  images = jnp.full((16, 32, 32, 3), jnp.nan)
  new_state, metrics = step(state, images, jax.random.key(1))
  jax.tree.map(np.testing.assert_array_equal, (new_state.params, new_state.opt_state),
               (state.params, state.opt_state))
  assert int(new_state.step) == 1 and int(new_state.nonfinite_streak) == 1
  assert int(metrics["nonfinite_streak"]) == 1


def test_repeated_nans_stop_the_run_cleanly_without_a_bad_checkpoint(tmp_path, monkeypatch):
  one_device(monkeypatch)
  inject_nan_batches(monkeypatch, set(range(3, 100)))
  with pytest.raises(run.NonFiniteError, match="3 consecutive steps"):
    pretrain.train_and_evaluate(tiny_config(20), str(tmp_path))
  # Stopped at step 5 (the third NaN step in a row); the checkpoint of step 4, taken during the NaN
  # steps, holds exactly the parameters of step 2: no non-finite update ever reached them.
  checkpointer = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
  assert checkpointer.all_steps() == [2, 4]
  checkpointer.close()
  _, at_step_4, _ = workdir_lib.load_model(str(tmp_path), step=4)
  _, at_step_2, _ = workdir_lib.load_model(str(tmp_path), step=2)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(at_step_4), jax.device_get(at_step_2))


def test_a_failing_checkpoint_write_stops_training_with_a_clear_error(tmp_path, monkeypatch):
  one_device(monkeypatch)
  original = checkpoint.Checkpointer.save
  calls = {"n": 0}

  def save_then_lose_the_directory(self, step, state, meta, **kwargs):
    calls["n"] += 1
    if calls["n"] == 2:  # the directory vanishes and a file takes its place (lost mount, permissions)
      self.wait()
      shutil.rmtree(self.directory)
      pathlib.Path(self.directory).write_text("not a directory")
    return original(self, step, state, meta, **kwargs)

  monkeypatch.setattr(checkpoint.Checkpointer, "save", save_then_lose_the_directory)
  with pytest.raises(checkpoint.CheckpointWriteError, match="checkpoints"):
    pretrain.train_and_evaluate(tiny_config(8), str(tmp_path))


@pytest.mark.slow
def test_kill_9_at_random_moments_always_resumes_to_the_uninterrupted_result(tmp_path):
  """Four runs killed with SIGKILL at a random moment of training (between steps, inside a step, during an
  asynchronous checkpoint write), then the same command to the end: the final parameters equal those of an
  uninterrupted run and metrics.jsonl has every step exactly once."""
  steps = ["--config.total_steps=24", "--config.checkpoint_every_steps=4", "--config.log_every_steps=1"]
  straight = tmp_path / "straight"
  assert run_pretrain(straight, *steps).returncode == 0
  workdir = tmp_path / "killed"
  rng = random.Random(0)
  for _ in range(4):
    process = subprocess.Popen([*PRETRAIN, f"--workdir={workdir}", *TINY, *steps],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env=env_one_device())
    for line in process.stdout:  # wait until this run trains, so every kill lands in training
      if line.startswith("step "):
        break
    time.sleep(rng.uniform(0.0, 3.0))
    process.send_signal(signal.SIGKILL)
    process.stdout.close()
    process.wait(timeout=60)
  result = run_pretrain(workdir, *steps)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]  # every line is valid JSON
  assert [r["step"] for r in rows] == list(range(1, 25))  # no duplicated or missing steps
  _, final, _ = workdir_lib.load_model(str(workdir))
  _, expected, _ = workdir_lib.load_model(str(straight))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(final), jax.device_get(expected))
