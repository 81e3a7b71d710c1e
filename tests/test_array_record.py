"""data.source="array_record" (simmim_jax/data/array_record.py, Grain) and simmim-prepare (tools/prepare.py): the
folder source's batches from prepared shards, sample-exact resume at any step and process count (also after
kill -9, with Grain worker processes), corrupt and bomb records, labelled splits, and the prepare command on a
folder with bad files."""

import hashlib
import io
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest
from PIL import Image

from simmim_jax import cli, data
from simmim_jax.data import array_record, decode, demo_images, finetune_pipeline, normalization
from simmim_jax.tools import prepare
from helpers import png_bomb

ROOT = pathlib.Path(__file__).resolve().parents[1]
IMAGE_SIZE = 32


def write_images(folder: pathlib.Path, count: int = 10, classes: int = 0) -> pathlib.Path:
  """`count` JPEGs of the demo photos (64 px), flat or in `classes` class folders."""
  for i, image in enumerate(demo_images.make_demo_images(count, 64)):
    target = folder / f"class_{i % classes}" if classes else folder
    target.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(target / f"{i:03d}.jpg", quality=90)
  return folder


def data_config(source: str, data_dir, **overrides) -> ml_collections.ConfigDict:
  config = dict(source=source, name="", data_dir=str(data_dir), split="train", crop_scale=(0.67, 1.0),
                crop_ratio=(3 / 4, 4 / 3), horizontal_flip=True, shuffle_buffer_size=10, num_demo_images=1,
                strict=False, max_image_pixels=0, grain_workers=0)
  return ml_collections.ConfigDict({**config, **overrides})


def batches(config, steps: int, **kwargs) -> list[np.ndarray]:
  iterator = data.create_pretrain_iterator(config, image_size=IMAGE_SIZE, global_batch_size=kwargs.pop("batch", 4),
                                           seed=0, **kwargs)
  return [next(iterator)["image"] for _ in range(steps)]


def write_shard(path: pathlib.Path, records: list[bytes]) -> None:
  """A hand-made split: one shard of `records` and its index."""
  from array_record.python import array_record_module
  (path / "train").mkdir(parents=True)
  writer = array_record_module.ArrayRecordWriter(str(path / "train" / "shard-00000-of-00001.array_record"),
                                                 "group_size:1")
  for record in records:
    writer.write(record)
  writer.close()
  (path / "train.json").write_text(
      f'{{"format": "{array_record.RECORD_FORMAT}", "class_names": [], '
      f'"shards": [{{"name": "train/shard-00000-of-00001.array_record", "num_records": {len(records)}}}]}}')


def jpeg(size=(48, 40), colour=(200, 40, 40)) -> bytes:
  buffer = io.BytesIO()
  Image.new("RGB", size, colour).save(buffer, "JPEG")
  return buffer.getvalue()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp("array_record")
  write_images(root / "images")
  prepare.prepare(str(root / "images"), str(root / "out"), "train", num_shards=3, progress=io.StringIO())
  return root


def test_prepared_shards_give_the_folder_sources_batches(prepared):
  from_shards = batches(data_config("array_record", prepared / "out"), 4)  # 16 samples of 10 images: 2 epochs
  from_folder = batches(data_config("folder", prepared / "images"), 4)
  for a, b in zip(from_shards, from_folder):
    np.testing.assert_allclose(a, b, atol=1e-5)  # the same images, order and augmentation (graph vs tf.data)


def test_two_processes_resumed_as_one_see_the_same_global_batches(prepared):
  config = data_config("array_record", prepared / "out")
  uninterrupted = batches(config, 5)
  halves = [batches(config, 3, process_index=p, process_count=2) for p in (0, 1)]
  for step in range(3):  # steps 0-2 on 2 processes (rows 0-1 and 2-3), then resumed at step 3 on one
    np.testing.assert_array_equal(np.concatenate([halves[0][step], halves[1][step]]), uninterrupted[step])
  for step, batch in enumerate(batches(config, 2, start_step=3), start=3):
    np.testing.assert_array_equal(batch, uninterrupted[step])


def test_a_corrupt_record_is_skipped_counted_and_named_in_strict_mode(tmp_path):
  good = [array_record.encode_record(jpeg(colour=c)) for c in ((200, 40, 40), (0, 90, 200))]
  write_shard(tmp_path, [good[0], array_record.encode_record(b"not an image"), good[1], b"\x01"])
  iterator = data.create_pretrain_iterator(data_config("array_record", tmp_path), image_size=IMAGE_SIZE,
                                           global_batch_size=4, seed=0)
  first = [next(iterator)["image"] for _ in range(2)]
  assert iterator.skipped_images == 2  # both bad records, each counted once, by the run's own iterator
  assert all(np.isfinite(b).all() for b in first)
  with pytest.raises(decode.DataError, match=r"shard-00000-of-00001\.array_record\[1\]"):
    batches(data_config("array_record", tmp_path, strict=True), 2, batch=4)


def test_a_bomb_record_is_refused_before_decoding(tmp_path):
  bomb = png_bomb(7000, 7000, complete=True)  # ~140 KB stored, 147 MB once decoded; the bound is 40 M pixels
  write_shard(tmp_path, [array_record.encode_record(jpeg()), array_record.encode_record(bomb)])
  iterator = data.create_pretrain_iterator(data_config("array_record", tmp_path), image_size=IMAGE_SIZE,
                                           global_batch_size=2, seed=0)
  assert all(np.isfinite(next(iterator)["image"]).all() for _ in range(2))
  assert iterator.skipped_images == 1
  with pytest.raises(decode.DataError, match=r"\[1\]'.*declares 7000x7000 = 49,000,000 pixels"):
    batches(data_config("array_record", tmp_path, strict=True), 1, batch=2)


def test_a_split_with_no_index_names_the_prepare_command(tmp_path):
  with pytest.raises(ValueError, match="simmim-prepare --images=FOLDER"):
    array_record.Records(str(tmp_path), "train")


def test_labelled_splits_feed_finetuning_and_evaluate_every_example_once(tmp_path):
  for split, count in (("train", 9), ("val", 5)):
    write_images(tmp_path / "images" / split, count, classes=3)
    prepare.prepare(str(tmp_path / "images" / split), str(tmp_path / "out"), split, progress=io.StringIO())
  config = ml_collections.ConfigDict(dict(
      source="array_record", name="", data_dir=str(tmp_path / "out"), train_split="train", eval_split="val",
      crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), crop_padding=4, train_examples_per_class=0,
      max_image_pixels=0, grain_workers=0))
  assert finetune_pipeline.dataset_info(config) == {"num_classes": 3, "num_train": 9, "num_eval": 5}
  train = next(finetune_pipeline.create_train_iterator(config, image_size=IMAGE_SIZE, global_batch_size=4, seed=0,
                                                        randaugment_config="", reprob=0.25))
  assert train["image"].shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3) and set(train["label"]) <= {0, 1, 2}
  evaluation = list(finetune_pipeline.create_eval_iterator(config, image_size=IMAGE_SIZE, global_batch_size=4))
  labels = np.concatenate([b["label"] for b in evaluation])[np.concatenate([b["valid"] for b in evaluation]) > 0]
  assert len(evaluation) == 2 and sorted(labels) == sorted(i % 3 for i in range(5))


def test_prepare_skips_bad_files_and_ends_symlink_loops(tmp_path, capsys):
  images = write_images(tmp_path / "images", 6, classes=2)
  (images / "class_0" / "text.jpg").write_text("not an image")
  (images / "class_1" / "empty.png").write_bytes(b"")
  os.mkfifo(images / "class_1" / "fifo.jpg")  # never opened (only regular files are read)
  (images / "class_1" / "loop").symlink_to(images)  # a symlink loop ends
  assert cli.prepare_main([f"--images={images}", f"--out={tmp_path / 'out'}"]) == 0
  assert "wrote 6 images in 1 shard(s)" in capsys.readouterr().out
  records = array_record.Records(str(tmp_path / "out"), "train")
  assert len(records) == 6 and records.class_names == ["class_0", "class_1"]
  assert sorted(records.read(i)[1] for i in range(6)) == [0, 0, 0, 1, 1, 1]
  assert cli.prepare_main([f"--images={images}", f"--out={tmp_path / 'out'}"]) == 2  # nothing is overwritten
  assert "already prepared" in capsys.readouterr().err
  assert cli.prepare_main([f"--images={images}", f"--out={tmp_path / 'strict'}", "--strict"]) == 2
  assert "text.jpg" in capsys.readouterr().err and not (tmp_path / "strict" / "train").exists()


# ----------------------------------------------------------------------------------------------------
# Slow: Grain worker processes, kill -9 and resume


HASHER = """
import hashlib, sys
import ml_collections
from simmim_jax import data

def main(data_dir, start_step, steps, workers, out):
  config = ml_collections.ConfigDict(dict(
      source="array_record", name="", data_dir=data_dir, split="train", crop_scale=(0.67, 1.0),
      crop_ratio=(3 / 4, 4 / 3), horizontal_flip=True, strict=False, max_image_pixels=0, grain_workers=workers))
  iterator = data.create_pretrain_iterator(config, image_size=32, global_batch_size=4, seed=0,
                                           start_step=start_step)
  with open(out, "a") as f:
    for step in range(start_step, steps):
      f.write(f"{step} {hashlib.sha256(next(iterator)['image'].tobytes()).hexdigest()}\\n")
      f.flush()

if __name__ == "__main__":  # Grain spawns its workers: they import this file as __mp_main__
  main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
"""


def run_hasher(script, data_dir, start_step, steps, workers, out):
  return subprocess.Popen([sys.executable, str(script), str(data_dir), str(start_step), str(steps), str(workers),
                           str(out)], cwd=ROOT, stderr=subprocess.DEVNULL,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})


def read_hashes(path):
  return dict(line.split() for line in pathlib.Path(path).read_text().splitlines())


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_gives_the_uninterrupted_batches(prepared, tmp_path):
  script = tmp_path / "hasher.py"
  script.write_text(HASHER)
  steps = 12  # 48 samples of 10 images: the kill lands inside an epoch
  assert run_hasher(script, prepared / "out", 0, steps, 1, tmp_path / "reference").wait(timeout=600) == 0
  reference = read_hashes(tmp_path / "reference")
  killed = run_hasher(script, prepared / "out", 0, steps, 2, tmp_path / "resumed")  # 2 workers
  deadline = time.monotonic() + 600
  while len(read_hashes(tmp_path / "resumed") if (tmp_path / "resumed").exists() else {}) < 5:
    assert time.monotonic() < deadline and killed.poll() is None
    time.sleep(0.05)
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  done = read_hashes(tmp_path / "resumed")
  assert 5 <= len(done) < steps
  # resume as from a checkpoint of the last step written, with another worker count (0: in process)
  assert run_hasher(script, prepared / "out", len(done), steps, 0, tmp_path / "resumed").wait(timeout=600) == 0
  assert read_hashes(tmp_path / "resumed") == reference


@pytest.mark.slow
def test_grain_workers_do_not_change_the_batches(prepared):
  in_process = batches(data_config("array_record", prepared / "out"), 3)
  for batch, expected in zip(batches(data_config("array_record", prepared / "out", grain_workers=2), 3), in_process):
    np.testing.assert_array_equal(batch, expected)


@pytest.mark.slow
def test_a_tfds_dataset_built_as_array_record_is_read_by_index(tmp_path):
  import tensorflow_datasets as tfds

  class TinyPhotos(tfds.core.GeneratorBasedBuilder):  # offline: the demo photos, no download
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"image": tfds.features.Image(encoding_format="jpeg"), "label": tfds.features.ClassLabel(num_classes=2)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i, image in enumerate(demo_images.make_demo_images(6, 64)):
        yield i, {"image": image, "label": i % 2}

  TinyPhotos(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  config = data_config("array_record", tmp_path, name="tiny_photos")
  records = array_record.Records(str(tmp_path), "train", "tiny_photos")
  assert len(records) == 6 and records.read(3)[0][:2] == b"\xff\xd8"  # JPEG bytes, decoded by Pillow later
  first, again = batches(config, 2), batches(config, 1, start_step=1)
  np.testing.assert_array_equal(first[1], again[0])


def readme_small_folder_commands() -> list[list[str]]:
  """The README's "on a small folder" commands (ImageNet on Cloud TPU), as argument lists, backslashes joined."""
  text = (ROOT / "README.md").read_text().split("on a small folder, end to end on a CPU:", 1)[1]
  block = text.split("```bash\n", 1)[1].split("\n```", 1)[0].replace("\\\n", " ")
  return [line.split() for line in block.splitlines() if line.strip()]


@pytest.mark.slow
def test_the_readmes_small_folder_commands_pretrain_and_finetune_on_prepared_shards(tmp_path):
  for split, count in (("train", 24), ("val", 6)):
    write_images(tmp_path / "photos" / split, count, classes=3)
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
  env.pop("XLA_FLAGS", None)
  for program, *flags in readme_small_folder_commands():
    command = [sys.executable, "-m", "simmim_jax.cli", program.removeprefix("simmim-"), *flags]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, (program, result.stderr[-3000:])
  assert (tmp_path / "workdir" / "photos_ft" / "checkpoints" / "20").is_dir()


def assert_same_up_to_rounding(a, b):
  """Normalized images equal but for a rare pixel one grey level apart (tf.round of a bicubic value at .5, traced
  in a tf.function here and in a tf.data graph there)."""
  grey_level = 1 / 255 / min(normalization.IMAGENET_STD)
  assert np.abs(a - b).max() <= grey_level * 1.01 and np.mean(np.abs(a - b) > 1e-4) < 1e-3


@pytest.mark.slow
def test_finetune_batches_equal_the_folder_sources_with_randaugment_erasing_and_eval(tmp_path):
  from helpers import write_folder  # PNGs: lossless, so Pillow and TensorFlow decode the same pixels
  folder = write_folder(tmp_path / "folder")
  for split in ("train", "test"):
    prepare.prepare(str(folder / split), str(tmp_path / "out"), split, progress=io.StringIO())
  common = dict(name="", train_split="train", eval_split="test", crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3),
                crop_padding=4, train_examples_per_class=0, subset_seed=0, max_image_pixels=0,
                shuffle_buffer_size=10, grain_workers=0)
  shards = ml_collections.ConfigDict(dict(source="array_record", data_dir=str(tmp_path / "out"), **common))
  files = ml_collections.ConfigDict(dict(source="folder", data_dir=str(folder), **common))
  train = dict(image_size=48, global_batch_size=8, seed=0, randaugment_config="rand-m9-mstd0.5-inc1", reprob=0.25)
  pairs = zip(finetune_pipeline.create_train_iterator(shards, **train),
              finetune_pipeline.create_train_iterator(files, **train))
  for _, (a, b) in zip(range(3), pairs):
    np.testing.assert_array_equal(a["label"], b["label"])
    assert_same_up_to_rounding(a["image"], b["image"])
  evaluation = [list(finetune_pipeline.create_eval_iterator(config, image_size=48, global_batch_size=4))
                for config in (shards, files)]
  assert len(evaluation[0]) == len(evaluation[1])
  for a, b in zip(*evaluation):
    for key in ("label", "valid"):
      np.testing.assert_array_equal(a[key], b[key])
    assert_same_up_to_rounding(a["image"], b["image"])


@pytest.mark.slow
def test_two_jax_processes_then_resumed_as_one_train_on_the_same_global_batches(prepared, tmp_path):
  """simmim-pretrain on ArrayRecord shards with 2 Grain workers: 2 processes (gloo on 127.0.0.1) give the 1-process
  losses, and their step-2 checkpoint resumed in 1 process continues as the 1-process run (tests/test_distributed.py
  does the same for the demo source)."""
  from helpers import TINY, run_pretrain, run_process
  source = ["--config.data.source=array_record", "--config.data.name=", f"--config.data.data_dir={prepared / 'out'}",
            "--config.data.grain_workers=2", "--config.total_steps=4", "--config.checkpoint_every_steps=2",
            "--config.log_every_steps=1"]
  one = tmp_path / "one"
  assert run_pretrain(one, *source).returncode == 0
  two = tmp_path / "two"
  result = run_process(["launch/cpu_multiprocess.sh", "--num_processes=2", "--", f"--workdir={two}", *TINY, *source],
                       timeout=600, kill_after=10, env={"PYTHON": sys.executable})
  assert result.returncode == 0, result.stderr[-4000:]
  losses = lambda workdir: {r["step"]: r["loss"] for r in map(json.loads, (workdir / "metrics.jsonl").open())}
  np.testing.assert_allclose([losses(two)[s] for s in range(1, 5)], [losses(one)[s] for s in range(1, 5)], rtol=1e-5)
  shutil.rmtree(two / "checkpoints" / "4")  # as if the 2-process run had died after step 2
  resumed = run_pretrain(two, *source)
  assert resumed.returncode == 0 and "from step 2" in resumed.stdout, resumed.stderr[-4000:]
  np.testing.assert_allclose([losses(two)[s] for s in (3, 4)], [losses(one)[s] for s in (3, 4)], rtol=1e-5)
