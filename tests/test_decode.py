"""Bounded image decoding: a tiny file declaring a huge image is refused before decoding (skipped and counted, or
an error naming it in strict mode), and file names are logged escaped."""

import io
import json
import logging
import os
import pathlib
import sys
import tracemalloc

import numpy as np
import pytest
from PIL import Image, ImageFile

from simmim_jax.configs import default_config
from simmim_jax.data import decode

from helpers import PRETRAIN, png_bomb, run_process


def test_the_default_bound_is_64_output_areas_and_at_least_40_megapixels():
  assert decode.max_image_pixels(192) == decode.max_image_pixels(224) == 40_000_000
  assert decode.max_image_pixels(1024) == 64 * 1024 ** 2
  assert decode.max_image_pixels(224, 1234) == 1234
  with pytest.raises(ValueError, match="max_image_pixels must be >= 0"):
    decode.max_image_pixels(224, -1)


def test_a_huge_declared_size_is_refused_before_decoding(monkeypatch, tmp_path):
  tiny = png_bomb(10000, 10000)
  assert len(tiny) < 100
  with pytest.raises(decode.ImageTooLargeError, match="10000x10000"):
    decode.decode_rgb(tiny)
  # Refused before any pixel is decoded: load() must not run.
  ok = png_bomb(300, 200, complete=True)
  assert decode.decode_rgb(ok, max_pixels=60_000).shape == (200, 300, 3)

  def no_load(self):
    raise AssertionError("load() ran")

  monkeypatch.setattr(ImageFile.ImageFile, "load", no_load)
  with pytest.raises(decode.ImageTooLargeError):
    decode.decode_rgb(ok, max_pixels=59_999)
  (tmp_path / "ok.png").write_bytes(ok)  # the fine-tuning folder source's reader: header only, TF decodes
  with pytest.raises(decode.ImageTooLargeError):
    decode.read_image_file(str(tmp_path / "ok.png"), 59_999)
  assert decode.read_image_file(str(tmp_path / "ok.png"), 60_000) == ok
  (tmp_path / "text.png").write_bytes(b"not an image")
  with pytest.raises(decode.DECODE_ERRORS, match="not an image format Pillow reads"):
    decode.read_image_file(str(tmp_path / "text.png"), 1)


def test_pillows_own_bomb_limit_is_not_raised_globally_and_is_a_decode_error(tmp_path):
  assert Image.MAX_IMAGE_PIXELS == 89478485  # Pillow's default, not changed by importing decode
  bomb = png_bomb(20000, 20000)  # 400 M pixels: Pillow itself refuses it at open
  with pytest.raises(decode.DECODE_ERRORS):
    decode.decode_rgb(bomb, max_pixels=10 ** 9)
  (tmp_path / "bomb.png").write_bytes(bomb)
  with pytest.raises(decode.ImageTooLargeError):
    decode.read_image_file(str(tmp_path / "bomb.png"), 10 ** 9)


def test_a_jpeg_is_judged_at_its_draft_size():
  buffer = io.BytesIO()
  Image.fromarray(np.full((3000, 4000, 3), 128, np.uint8)).save(buffer, "JPEG")
  image = decode.decode_rgb(buffer.getvalue(), min_side=128, max_pixels=1_000_000)  # decoded at 1/8: 375 x 500
  assert image.shape == (375, 500, 3)
  with pytest.raises(decode.ImageTooLargeError):
    decode.decode_rgb(buffer.getvalue(), max_pixels=1_000_000)  # no draft: 12 M pixels


def test_names_are_logged_and_raised_escaped(caplog):
  name = "/data/evil\nWARNING forged line.jpg"
  with caplog.at_level(logging.WARNING):
    decode.SkipCounter().record(name, "OSError: bad\nsecond line", strict=False)
  messages = [r.getMessage() for r in caplog.records if "evil" in r.getMessage()]
  assert len(messages) == 1 and "\n" not in messages[0] and repr(name) in messages[0]
  assert "bad\\nsecond line" in messages[0]
  with pytest.raises(decode.UndecodableImageError) as error:
    decode.SkipCounter().record(name, "OSError: bad", strict=True)
  assert "\n" not in str(error.value) and repr(name) in str(error.value)


def test_a_file_name_with_a_newline_in_a_folder_is_logged_on_one_line(tmp_path, caplog):
  bad = tmp_path / "a\nWARNING forged.jpg"
  bad.write_bytes(b"not an image")
  Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
  with caplog.at_level(logging.WARNING):
    assert decode.first_readable([str(bad), str(tmp_path / "b.png")], str(tmp_path)) == 1
  lines = [r.getMessage() for r in caplog.records if "forged" in r.getMessage()]
  assert len(lines) == 1 and "\n" not in lines[0] and repr(str(bad)) in lines[0]


def write_folder(folder: pathlib.Path, with_bombs: bool) -> list[str]:
  folder.mkdir()
  rng = np.random.default_rng(0)
  for i in range(6):
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), np.uint8)).save(folder / f"img_{i}.png")
  if not with_bombs:
    return []
  (folder / "zz_bomb_tiny.png").write_bytes(png_bomb(10000, 10000))  # sorted last: found by the pipeline
  (folder / "zz_bomb_full.png").write_bytes(png_bomb(10000, 10000, complete=True))
  return [str(folder / "zz_bomb_full.png"), str(folder / "zz_bomb_tiny.png")]


def folder_config(folder, strict=False):
  config = default_config.get_config().data
  config.source, config.data_dir, config.strict = "folder", str(folder), strict
  return config


def test_bombs_in_a_training_folder_are_skipped_and_counted_or_stop_a_strict_run(tmp_path):
  from simmim_jax import data  # pylint: disable=g-import-not-at-top  (TensorFlow)
  bombs = write_folder(tmp_path / "imgs", with_bombs=True)
  batches = data.create_pretrain_iterator(folder_config(tmp_path / "imgs"), image_size=16, global_batch_size=8,
                                          seed=0)
  for _ in range(3):  # 3 epochs of the 8 files
    assert np.isfinite(next(batches)["image"]).all()
  assert batches.skipped_images == len(bombs) == 2
  batches = data.create_pretrain_iterator(folder_config(tmp_path / "imgs", strict=True), image_size=16,
                                          global_batch_size=8, seed=0)
  with pytest.raises(data.DataError, match=r"cannot decode image '.*zz_bomb_(full|tiny)\.png'.*10000x10000"):
    for _ in range(3):
      next(batches)
  (tmp_path / "first").mkdir()  # a bomb sorted first is found by the check at start
  (tmp_path / "first" / "a_bomb.png").write_bytes(png_bomb(10000, 10000))
  Image.new("RGB", (20, 20)).save(tmp_path / "first" / "b.png")
  with pytest.raises(data.UndecodableImageError, match=r"cannot decode image '.*a_bomb\.png'.*10000x10000"):
    data.create_pretrain_iterator(folder_config(tmp_path / "first", strict=True), image_size=16, global_batch_size=8,
                                  seed=0)


def test_a_bomb_in_a_finetune_folder_stops_the_run_naming_it(tmp_path):
  from simmim_jax.configs import finetune_config  # pylint: disable=g-import-not-at-top
  from simmim_jax.data import finetune_pipeline  # pylint: disable=g-import-not-at-top
  for split in ("train", "test"):
    (tmp_path / split / "c0").mkdir(parents=True)
    Image.new("RGB", (20, 20)).save(tmp_path / split / "c0" / "ok.png")
  (tmp_path / "test" / "c0" / "zz_bomb.png").write_bytes(png_bomb(10000, 10000, complete=True))
  config = finetune_config.get_config().data
  config.update(source="folder", data_dir=str(tmp_path), eval_split="test")
  batches = finetune_pipeline.create_eval_iterator(config, image_size=16, global_batch_size=2, process_index=0,
                                                   process_count=1)
  with pytest.raises(decode.DataError, match=r"cannot decode image '.*zz_bomb\.png'.*10000x10000"):
    list(batches)
  config.max_image_pixels = 400  # the good 20 x 20 image still passes; the train split has no bomb
  batches = finetune_pipeline.create_train_iterator(config, image_size=16, global_batch_size=2, seed=0,
                                                    process_index=0, process_count=1)
  assert next(batches)["image"].shape == (2, 16, 16, 3)


_CHILD = """
import json, os, resource, sys
from simmim_jax import data
from simmim_jax.configs import default_config
config = default_config.get_config().data
config.source, config.data_dir = "folder", sys.argv[1]
batches = data.create_pretrain_iterator(config, image_size=16, global_batch_size=8, seed=0)
for _ in range(4):
  next(batches)
print(json.dumps({"max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "skipped": batches.skipped_images}), flush=True)
os._exit(0)  # TF's interpreter shutdown with a live numpy_function pipeline sometimes hangs
"""


def peak_rss_of_folder_run(folder) -> dict:
  result = run_process([sys.executable, "-c", _CHILD, folder], timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # a child process per folder; the special-files test bounds memory by default
def test_peak_memory_of_a_folder_run_with_bombs_stays_within_300_mb_of_one_without(tmp_path):
  write_folder(tmp_path / "clean", with_bombs=False)
  write_folder(tmp_path / "bombs", with_bombs=True)
  clean, bombs = peak_rss_of_folder_run(tmp_path / "clean"), peak_rss_of_folder_run(tmp_path / "bombs")
  assert clean["skipped"] == 0 and bombs["skipped"] == 2
  assert bombs["max_rss_kb"] - clean["max_rss_kb"] < 300 * 1024, (clean, bombs)


_MEASURE = "import resource, subprocess, sys; subprocess.run(sys.argv[1:]); " \
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"


def pretrain_peak_rss_kb(folder, workdir) -> int:
  """Peak RSS (KB) of a short `simmim-pretrain` demo run on `folder`; checks it ends with exit 0."""
  command = [*PRETRAIN, "--config=demo", f"--workdir={workdir}",
             "--config.data.source=folder", f"--config.data.data_dir={folder}", "--config.model.embed_dim=32",
             "--config.model.depth=2", "--config.model.num_heads=2", "--config.global_batch_size=8",
             "--config.num_train_images=8", "--config.total_steps=3", "--config.warmup_steps=1",
             "--config.log_every_steps=1", "--config.checkpoint_every_steps=3",
             "--config.reconstruction_every_steps=0"]
  result = run_process([sys.executable, "-c", _MEASURE, *command])
  assert result.returncode == 0, result.stderr[-3000:]
  return int(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_pretraining_run_on_a_folder_with_bombs_skips_them_within_300_mb_of_a_clean_run(tmp_path):
  write_folder(tmp_path / "clean", with_bombs=False)
  write_folder(tmp_path / "bombs", with_bombs=True)
  clean = pretrain_peak_rss_kb(tmp_path / "clean", tmp_path / "run_clean")
  bombs = pretrain_peak_rss_kb(tmp_path / "bombs", tmp_path / "run_bombs")
  with open(tmp_path / "run_bombs" / "metrics.jsonl") as f:
    skipped = [json.loads(line).get("skipped_images") for line in f]
  assert skipped[-1] == 2, skipped
  assert bombs - clean < 300 * 1024, (clean, bombs)


# ----------------------------------------------------------------------------------------------------
# Special files named like images: a FIFO, a link to /dev/zero, sparse 2 GB files (issue 24, case 6)


def write_special_files(folder: pathlib.Path, prefix: str = "") -> list[str]:
  """A FIFO, a link to /dev/zero and two sparse 2 GB files, all named like images; returns their paths."""
  folder.mkdir(parents=True, exist_ok=True)
  os.mkfifo(folder / f"{prefix}h.png")  # opening it for reading blocks until a writer comes, reading too
  os.symlink("/dev/zero", folder / f"{prefix}x.png")  # endless zeros
  for name in (f"{prefix}sparse.jpg", f"{prefix}sparse.png"):
    with open(folder / name, "wb") as f:
      f.truncate(2 << 30)  # 2 GB that take no disk, and 2 GB of memory each if read whole
  return [str(folder / n) for n in (f"{prefix}h.png", f"{prefix}x.png", f"{prefix}sparse.jpg", f"{prefix}sparse.png")]


@pytest.fixture
def no_hang():
  """Fails a test that blocks for 20 s (a FIFO read) instead of hanging the suite."""
  import signal  # pylint: disable=g-import-not-at-top

  def timeout(*_):
    raise TimeoutError("blocked for 20 s")

  previous = signal.signal(signal.SIGALRM, timeout)
  signal.alarm(20)
  yield
  signal.alarm(0)
  signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("name, message", [("h.png", "is a FIFO"), ("x.png", r"is a character device \(a link to "
                                                                                r"/dev/zero\)"),
                                           ("sparse.jpg", "holds 2,147,483,648 bytes, more than the 336,")])
def test_special_and_oversized_files_are_refused_before_reading(tmp_path, no_hang, name, message):
  write_special_files(tmp_path)
  tracemalloc.start()
  with pytest.raises(decode.DECODE_ERRORS, match=message):
    decode.load_image_file(str(tmp_path / name))
  with pytest.raises(decode.DECODE_ERRORS, match=message):
    decode.read_image_file(str(tmp_path / name))  # the fine-tuning folder source's reader
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  assert peak < 1 << 20  # nothing was read


def test_a_folder_named_like_an_image_and_an_empty_file_are_refused(tmp_path):
  (tmp_path / "d.png").mkdir()
  with pytest.raises(decode.DECODE_ERRORS, match="is a folder"):
    decode.load_image_file(str(tmp_path / "d.png"))
  (tmp_path / "e.png").write_bytes(b"")
  with pytest.raises(decode.DECODE_ERRORS, match="empty file"):
    decode.load_image_file(str(tmp_path / "e.png"))
  Image.new("RGB", (8, 6)).save(tmp_path / "ok.png")
  os.symlink(tmp_path / "ok.png", tmp_path / "link.png")  # a link to a regular file is read
  assert decode.load_image_file(str(tmp_path / "link.png")).shape == (6, 8, 3)


def test_urls_are_read_through_tf_gfile_with_the_size_bound(tmp_path):
  """gs:// paths go through tf.io.gfile (object stores have no special files); file:// stands in for them."""
  Image.new("RGB", (8, 6)).save(tmp_path / "ok.png")
  assert decode.load_image_file(f"file://{tmp_path / 'ok.png'}").shape == (6, 8, 3)
  assert decode.read_image_file(f"file://{tmp_path / 'ok.png'}") == (tmp_path / "ok.png").read_bytes()
  with open(tmp_path / "sparse.png", "wb") as f:
    f.truncate(2 << 30)
  with pytest.raises(decode.DECODE_ERRORS, match="holds 2,147,483,648 bytes, more than"):
    decode.load_image_file(f"file://{tmp_path / 'sparse.png'}")


_SPECIAL_CHILD = """
import json, os, resource, sys
from simmim_jax import data
from simmim_jax.configs import default_config
for folder in sys.argv[2:]:
  config = default_config.get_config().data
  config.source, config.data_dir, config.strict = "folder", folder, sys.argv[1] == "strict"
  batches = None
  try:
    batches = data.create_pretrain_iterator(config, image_size=16, global_batch_size=8, seed=0)
    for _ in range(5):  # 40 samples: every one of the 10 files is drawn
      next(batches)
    error = None
  except data.DataError as e:
    error = str(e)
  print(json.dumps({"max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "error": error,
                    "skipped": batches.skipped_images if batches else 0}), flush=True)
os._exit(0)  # TF's interpreter shutdown with a live numpy_function pipeline sometimes hangs
"""


def run_folders(*folders, strict=False, log_level="2") -> tuple[list[dict], str]:
  """One child process runs a few batches of each folder in turn: (per folder its peak RSS so far, the DataError
  and the skips of that folder's iterator; stderr). A run that blocks (on a FIFO) fails after 120 s."""
  result = run_process([sys.executable, "-c", _SPECIAL_CHILD, "strict" if strict else "skip", *folders], timeout=120,
                       env={"TF_CPP_MIN_LOG_LEVEL": log_level})
  assert result.returncode == 0, result.stderr[-3000:]
  return [json.loads(line) for line in result.stdout.strip().splitlines()], result.stderr


def test_a_fifo_a_dev_zero_link_and_sparse_2gb_files_in_a_folder_are_skipped_in_bounded_memory(tmp_path):
  write_folder(tmp_path / "clean", with_bombs=False)
  write_folder(tmp_path / "special", with_bombs=False)
  write_special_files(tmp_path / "special")
  clean, special = run_folders(tmp_path / "clean", tmp_path / "special")[0]
  assert clean["skipped"] == 0 and special["skipped"] == 4 and special["error"] is None
  # The high-water mark after the special folder, against the one after the clean folder in the same process
  # (reading the files whole took 4 GB for the sparse files, and all memory for /dev/zero).
  assert special["max_rss_kb"] - clean["max_rss_kb"] < 300 * 1024, (clean, special)


def test_strict_mode_stops_at_a_fifo_with_one_line_and_no_tensorflow_tracebacks(tmp_path):
  write_folder(tmp_path / "imgs", with_bombs=False)
  os.mkfifo(tmp_path / "imgs" / "zz_pipe.png")  # sorted last: met by the pipeline, not by the check at start
  (result,), stderr = run_folders(tmp_path / "imgs", strict=True, log_level="0")  # every TF log line shown
  assert result["error"] == (f"cannot decode image {str(tmp_path / 'imgs' / 'zz_pipe.png')!r}: NotARegularFileError: "
                             f"image file {str(tmp_path / 'imgs' / 'zz_pipe.png')!r} is a FIFO (named pipe), not a "
                             "regular file: not read (config.data.strict=True; set it to False to skip undecodable "
                             "images)")
  assert "Traceback" not in stderr and "zz_pipe" not in stderr, stderr[-3000:]


@pytest.mark.slow
def test_a_strict_pretraining_run_stops_at_a_bad_image_with_one_line_and_exit_1(tmp_path):
  write_folder(tmp_path / "imgs", with_bombs=False)
  (tmp_path / "imgs" / "zz_bad.png").write_bytes(b"not an image")  # sorted last: met by the pipeline
  result = run_process(
      [*PRETRAIN, "--config=demo", f"--workdir={tmp_path / 'run'}",
       "--config.data.source=folder", f"--config.data.data_dir={tmp_path / 'imgs'}", "--config.data.strict=True",
       "--config.model.embed_dim=32", "--config.model.depth=2", "--config.model.num_heads=2",
       "--config.global_batch_size=8", "--config.total_steps=20", "--config.warmup_steps=1",
       "--config.reconstruction_every_steps=0"], unset=("TF_CPP_MIN_LOG_LEVEL",))  # as a user runs it
  assert result.returncode == 1, result.stderr[-3000:]
  assert "Traceback" not in result.stderr and "op_kernel" not in result.stderr, result.stderr[-3000:]
  bad = str(tmp_path / "imgs" / "zz_bad.png")
  assert [line for line in result.stderr.splitlines() if "zz_bad" in line] == [
      f"simmim-pretrain: stopped: cannot decode image {bad!r}: UnidentifiedImageError: not an image format Pillow "
      "reads (config.data.strict=True; set it to False to skip undecodable images)"], result.stderr[-3000:]


_FINETUNE_CHILD = """
import os, sys
from simmim_jax.configs import finetune_config
from simmim_jax.data import decode, finetune_pipeline
config = finetune_config.get_config().data
config.update(source="folder", data_dir=sys.argv[1], eval_split="test")
for split in ("train", "test"):
  try:
    if split == "test":
      list(finetune_pipeline.create_eval_iterator(config, image_size=16, global_batch_size=2, process_index=0,
                                                  process_count=1))
    else:
      batches = finetune_pipeline.create_train_iterator(config, image_size=16, global_batch_size=2, seed=0,
                                                        process_index=0, process_count=1)
      for _ in range(3):
        next(batches)
    print("no error", flush=True)
  except decode.DataError as e:
    print(e, flush=True)
os._exit(0)
"""


@pytest.mark.slow  # a child process; the pretraining folder's FIFO test runs by default
def test_a_fifo_or_a_non_image_in_a_finetune_folder_stops_naming_it_without_tensorflow_tracebacks(tmp_path):
  for split in ("train", "test"):
    (tmp_path / split / "c0").mkdir(parents=True)
    Image.new("RGB", (20, 20)).save(tmp_path / split / "c0" / "ok.png")
  os.mkfifo(tmp_path / "train" / "c0" / "zz_pipe.png")  # read with tf.io.read_file, it blocked the run forever
  (tmp_path / "test" / "c0" / "zz_text.png").write_text("not an image")  # TF's message did not name the file
  result = run_process([sys.executable, "-c", _FINETUNE_CHILD, tmp_path], timeout=120,
                       env={"TF_CPP_MIN_LOG_LEVEL": "0"})
  assert result.returncode == 0, result.stderr[-3000:]
  pipe, text = str(tmp_path / "train" / "c0" / "zz_pipe.png"), str(tmp_path / "test" / "c0" / "zz_text.png")
  assert result.stdout.splitlines() == [
      f"cannot decode image {pipe!r}: NotARegularFileError: image file {pipe!r} is a FIFO (named pipe), not a "
      "regular file: not read",
      f"cannot decode image {text!r}: UnidentifiedImageError: not an image format Pillow reads"]
  assert "Traceback" not in result.stderr and "zz_" not in result.stderr, result.stderr[-3000:]
