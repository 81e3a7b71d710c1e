"""The tf.data pretraining pipeline: sources ("demo", "folder", "tfds"), sample order, augmentation, batching.

"demo" and "folder" streams are a deterministic function of the global sample index i = step * global_batch_size
+ row: sample i shows image permutation_e[i mod N] of epoch e = i // N (a fresh permutation per epoch, seeded by
(seed, e)), augmented with randomness seeded by (seed, i). Each process computes only its own rows of every global
batch, so the global batch is the same for any process count, and `start_step` resumes exactly (the index stream
starts at the resume point; skipped images are never read).

"tfds" streams are shuffled tf.data readers (shuffled files + a shuffle buffer) over this process's share of the
split. They are seeded by (seed, start_step, process_index): reproducible for a given start, but a resumed run sees
a different (equally random) order than an uninterrupted one, not the same samples.
"""

import functools
from collections.abc import Callable, Iterator

import jax
import numpy as np

from simmim_jax.data import augment, decode, demo_images, image_files
from simmim_jax.data._tensorflow import tf

SOURCES = ("demo", "folder", "tfds", "array_record")  # array_record: Grain, simmim_jax.data.array_record
DEMO_IMAGE_SIZE = 96  # side of the stored demo images (data.demo_image_size overrides it)
_PERMUTATION_STREAM, _AUGMENTATION_STREAM = 0, 1  # separate random streams derived from the run seed


def create_pretrain_iterator(data_config, *, image_size: int, global_batch_size: int, seed: int,
                             start_step: int = 0, process_index: int | None = None,
                             process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Endless iterator of this process's batches {"image": float32 [global_batch_size // process_count,
  image_size, image_size, 3]}, ImageNet-normalized, starting at step `start_step`. See `simmim_jax.data`."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  _validate(data_config, image_size=image_size, global_batch_size=global_batch_size, start_step=start_step,
            process_index=process_index, process_count=process_count)
  local_batch_size = global_batch_size // process_count
  transform = functools.partial(
      augment.pretrain_transform, image_size=image_size, crop_scale=tuple(data_config.crop_scale),
      crop_ratio=tuple(data_config.crop_ratio), horizontal_flip=bool(data_config.horizontal_flip))

  if data_config.source == "array_record":
    raise ValueError("data.source='array_record' is read by Grain: call simmim_jax.data.create_pretrain_iterator")
  skips = decode.SkipCounter()  # this iterator's own (Batches.skipped_images)
  if data_config.source == "tfds":
    samples = _tfds_samples(data_config, transform, seed=seed, start_step=start_step,
                            process_index=process_index, process_count=process_count, skips=skips)
  else:
    if data_config.source == "demo":
      images = demo_images.make_demo_images(data_config.num_demo_images,
                                            data_config.get("demo_image_size", DEMO_IMAGE_SIZE))
      num_images, load_image = len(images), _gather_from(images)
    else:
      files = image_files.list_image_files(data_config.data_dir)
      strict = bool(data_config.get("strict", False))
      max_pixels = decode.max_image_pixels(image_size, data_config.get("max_image_pixels", 0))
      decode.first_readable(files, data_config.data_dir, strict=strict, max_pixels=max_pixels, skips=skips)
      num_images, load_image = len(files), _read_from(files, min_side=4 * image_size, strict=strict,
                                                      max_pixels=max_pixels, skips=skips)
    indices = sample_index_stream(num_images, seed=seed, start_step=start_step, global_batch_size=global_batch_size,
                                  process_index=process_index, process_count=process_count)
    augmentation_key = tf.constant([seed, _AUGMENTATION_STREAM], tf.int64)

    def load_and_transform(sample_index, image_index):
      sample_seed = tf.random.experimental.stateless_fold_in(augmentation_key, sample_index)
      image, error = load_image(image_index)
      return {"image": transform(image, sample_seed), "error": error}

    samples = indices.map(load_and_transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  batches = samples.batch(local_batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.deterministic = True
  options.threading.max_intra_op_parallelism = 1  # parallelism comes from the parallel map (flax imagenet example)
  return Batches(_raise_data_errors(batches.with_options(options).as_numpy_iterator()), skips)


class Batches:
  """An input iterator: its host batches, and the undecodable images it skipped (`skipped_images`: this run's
  own count, not the process's). Skips made in other processes (Grain workers) arrive with the samples, as
  their "skipped" entry (`decode.skip_note`), and are counted and logged here."""

  def __init__(self, batches: Iterator[dict], skips: decode.SkipCounter):
    self._batches, self._skips = batches, skips

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = next(self._batches)
    self._skips.record_carried(batch.pop("skipped", ()))
    return batch

  @property
  def skipped_images(self) -> int:
    return self._skips.count


def _raise_data_errors(iterator):
  """Yields the batches without their "error" entry; raises DataError with the first error a sample carries
  (strict mode), and re-raises TF's wrapped errors from inside the pipeline as DataError with the original
  message.

  A strict-mode refusal travels as data (a sample's "error" string), not as an exception inside
  `tf.numpy_function`: TensorFlow logs such an exception, with both Python tracebacks, from every parallel call
  that raises it (158 lines before the one that matters)."""
  while True:
    try:
      batch = next(iterator)
    except StopIteration:  # a finite stream (fine-tuning's eval pass) ends
      return
    except tf.errors.OpError as e:
      marker = "UndecodableImageError: "
      message = e.message.split(marker, 1)[1].splitlines()[0] if marker in e.message else e.message
      raise decode.DataError(message) from None
    errors = [e for e in batch.pop("error", ()) if e]
    if errors:
      raise decode.DataError(errors[0].decode(errors="replace"))
    yield batch


def _validate(data_config, *, image_size, global_batch_size, start_step, process_index, process_count) -> None:
  if data_config.source not in SOURCES:
    raise ValueError(f"data.source must be one of {SOURCES}, got {data_config.source!r}")
  if image_size < 1:
    raise ValueError(f"image_size must be positive, got {image_size}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, process_count={process_count}), got {process_index}")
  if global_batch_size < process_count or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of the process count "
                     f"process_count={process_count} (every process loads global_batch_size // process_count rows)")
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  scale, ratio = tuple(data_config.crop_scale), tuple(data_config.crop_ratio)
  if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
    raise ValueError(f"data.crop_scale must be (min, max) area fractions with 0 < min <= max <= 1, got {scale}")
  if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
    raise ValueError(f"data.crop_ratio must be (min, max) aspect ratios with 0 < min <= max, got {ratio}")
  if data_config.source == "demo" and data_config.num_demo_images < 1:
    raise ValueError(f"data.num_demo_images must be positive, got {data_config.num_demo_images}")


def sample_index_stream(num_images: int, *, seed: int, start_step: int, global_batch_size: int, process_index: int,
                        process_count: int) -> tf.data.Dataset:
  """(sample_index, image_index) int64 pairs of this process's rows, global batch by global batch, from
  `start_step` on: rows [process_index * L, (process_index + 1) * L) of each global batch, L = global batch /
  process count. Global sample i shows image permutation(seed, i // num_images)[i % num_images]."""
  local_batch_size = global_batch_size // process_count
  first_sample = start_step * global_batch_size
  first_epoch, first_offset = divmod(first_sample, num_images)

  def epoch_images(epoch):  # the image order of one epoch, from first_offset on in the first epoch
    permutation = epoch_permutation(num_images, seed=seed, epoch=epoch)
    start = tf.where(epoch == first_epoch, tf.constant(first_offset, tf.int64), 0)
    return tf.data.Dataset.from_tensor_slices(permutation[start:])

  image_index = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).flat_map(epoch_images)
  sample_index = tf.data.Dataset.range(first_sample, np.iinfo(np.int64).max)
  rows = slice(process_index * local_batch_size, (process_index + 1) * local_batch_size)
  # One element per global batch, cut to this process's rows: the cheap index stream is walked in full on every
  # process, images are loaded only for its own rows.
  return (tf.data.Dataset.zip(sample_index, image_index)
          .batch(global_batch_size)
          .map(lambda samples, images: (samples[rows], images[rows]))
          .unbatch())


def epoch_permutation(num_images: int, *, seed: int, epoch) -> tf.Tensor:
  """The image order of epoch `epoch` (an int or an int64 tensor): int64 [num_images], seeded by (seed, epoch).
  The folder and ArrayRecord sources share it (`array_record` calls it eagerly in its workers)."""
  key = tf.random.experimental.stateless_fold_in(tf.constant([seed, _PERMUTATION_STREAM], tf.int64),
                                                tf.convert_to_tensor(epoch, tf.int64))
  return tf.random.experimental.stateless_shuffle(tf.range(num_images, dtype=tf.int64), seed=key)


def _gather_from(images: np.ndarray) -> Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]:
  images = tf.constant(images)  # [N, S, S, 3] uint8, held in memory (2048 x 96 x 96 x 3 = 57 MB)
  return lambda index: (tf.gather(images, index), tf.constant(b""))  # (image, no error)


def _read_from(files: list[str], *, min_side: int, strict: bool, skips: decode.SkipCounter,
               max_pixels: int = decode.MIN_DEFAULT_MAX_PIXELS) -> Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]:
  """image index -> (uint8 [H, W, 3], error: tf.string, empty when the image was read), decoded by Pillow
  (every mode becomes RGB; only regular files of a bounded size are read; see `decode`).

  An undecodable file (a FIFO, a device, an oversized file, or one declaring more than `max_pixels` pixels) is
  skipped (counted, logged once) and the next file of the sorted list takes its place, so every sample index
  still yields an image and the global batches stay the same for any process count; with `strict` the sample
  carries the error naming the file, and `_raise_data_errors` stops the run at its batch.
  """

  def load(index: np.ndarray) -> tuple[np.ndarray, bytes]:
    for offset in range(len(files)):
      path = files[(int(index) + offset) % len(files)]
      try:
        return decode.load_image_file(path, min_side, max_pixels), b""
      except decode.DECODE_ERRORS as e:
        try:
          skips.record(path, f"{type(e).__name__}: {e}", strict)
        except decode.UndecodableImageError as error:
          return np.zeros((1, 1, 3), np.uint8), str(error).encode()
    return np.zeros((1, 1, 3), np.uint8), b"no file of the image folder can be decoded"

  def read(index):
    image, error = tf.numpy_function(load, [index], (tf.uint8, tf.string), stateful=False)
    return tf.ensure_shape(image, [None, None, 3]), tf.ensure_shape(error, [])

  return read


def _tfds_samples(data_config, transform, *, seed: int, start_step: int, process_index: int,
                  process_count: int, skips: decode.SkipCounter) -> tf.data.Dataset:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = tfds.builder(data_config.name, data_dir=data_config.data_dir or None)
  if "image" not in builder.info.features:
    raise ValueError(f"tfds dataset {data_config.name!r} has no 'image' feature (it has "
                     f"{sorted(builder.info.features)}); data.source='tfds' reads images from the key 'image'")
  split = tfds.split_for_jax_process(data_config.split, process_index=process_index, process_count=process_count,
                                     drop_remainder=True)
  files_seed, buffer_seed, augmentation_seed = (
      int(s) for s in np.random.SeedSequence([seed, start_step, process_index]).generate_state(3))
  dataset = builder.as_dataset(split=split, shuffle_files=True,
                               read_config=tfds.ReadConfig(shuffle_seed=files_seed),
                               decoders={"image": tfds.decode.SkipDecoding()})  # decode after shuffling
  augmentation_key = tf.constant([augmentation_seed, _AUGMENTATION_STREAM], tf.int64)
  strict = bool(data_config.get("strict", False))
  image_size = transform.keywords["image_size"]
  min_side, max_pixels = 4 * image_size, decode.max_image_pixels(image_size, data_config.get("max_image_pixels", 0))
  has_file_name = "file_name" in builder.info.features

  def load(encoded: bytes, file_name: bytes):
    """Pillow decode; an undecodable example is counted and dropped (or, when strict, kept carrying the error
    that stops the run: `_raise_data_errors`)."""
    try:
      return decode.decode_rgb(encoded, min_side, max_pixels), True, b""
    except decode.DECODE_ERRORS as e:
      name = f"{data_config.name}/{data_config.split}:{file_name.decode(errors='replace') or '?'}"
      try:
        skips.record(name, f"{type(e).__name__}: {e}", strict)
      except decode.UndecodableImageError as error:
        return np.zeros((1, 1, 3), np.uint8), False, str(error).encode()
      return np.zeros((1, 1, 3), np.uint8), False, b""

  def decode_example(example):
    file_name = example["file_name"] if has_file_name else tf.constant("")
    image, ok, error = tf.numpy_function(load, [example["image"], file_name], (tf.uint8, tf.bool, tf.string),
                                         stateful=False)
    return tf.ensure_shape(image, [None, None, 3]), ok, tf.ensure_shape(error, [])

  def transform_example(counter, decoded):
    image, _, error = decoded
    sample_seed = tf.random.experimental.stateless_fold_in(augmentation_key, counter)
    return {"image": transform(image, sample_seed), "error": error}

  keys = ("image", "file_name") if has_file_name else ("image",)
  return (dataset.map(lambda example: {k: example[k] for k in keys})
          .repeat()
          .shuffle(data_config.shuffle_buffer_size, seed=buffer_seed)
          .map(decode_example, num_parallel_calls=tf.data.AUTOTUNE)
          .filter(lambda image, ok, error: tf.logical_or(ok, tf.strings.length(error) > 0))
          .enumerate()
          .map(transform_example, num_parallel_calls=tf.data.AUTOTUNE))
