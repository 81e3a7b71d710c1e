"""The labelled input pipeline for fine-tuning, linear probing and evaluation (tf.data).

Sources (`config.data.source`):
  * "folder": the tfds ImageFolder layout `data_dir/<split>/<label>/<image>`; class ids are the sorted label
    folder names of all splits (as `tfds.ImageFolder`). Index-addressable: sample i of the train stream is a
    function of (seed, i) as the pretraining pipeline (`pipeline.sample_index_stream`), so resume is exact.
    `data.train_examples_per_class > 0` keeps that many train images per class (a seeded choice by
    `data.subset_seed`): the few-label regime.
  * "digits": scikit-learn's handwritten digits (`simmim_jax.data.digits`), rendered in memory at the run's
    image size: the demo's labelled data, offline and with no data step. Splits "train" and `data.eval_split`
    "test" (the fixed test split) or "val" (a validation split carved from train). The same images, labels
    and order as "folder" on the folder `digits.write_digits_folder` writes, so the same batches; the same
    sample stream, subset, transforms and process sharding as "folder".
  * "array_record": `simmim-prepare` shards of class folders, or a labelled tfds dataset built with
    --file_format=array_record (`simmim_jax.data.array_record`), read by Grain in data.grain_workers processes:
    the folder source's sample stream and these transforms, so resume is exact.
  * "tfds": any labelled tfds dataset (`data.name`, keys "image" and "label"), this process's share of
    the split; shuffled readers seeded by (seed, start_step, process) as pretraining.

Train transform (official `data_finetune.py` = timm `create_transform(is_training=True)`):
RandomResizedCrop(scale 0.08-1, ratio 3/4-4/3, bicubic) + horizontal flip + RandAugment (`data.randaugment`,
official "rand-m9-mstd0.5-inc1"; "" = off) + normalize + random erasing (`data.reprob`, mode "pixel", one box).
Linear probing uses the crop and flip only (MAE). Eval: resize the shorter side to int(256 / 224 * size)
(bicubic), centre crop `size`. Mixup / CutMix run on device (`simmim_jax.train.mixup`).

Small images (size <= 32, official `resize_im = IMG_SIZE > 32`, CIFAR style): the train crop is
RandomCrop(size, padding=`data.crop_padding`, official 4) (zero padding; `data.crop_scale` / `crop_ratio`
are not used) and eval neither
resizes nor crops (images of another size are resized to size x size, where the official code would fail).
Linear probing shares both transforms.
"""

import functools
import math
import os
from collections.abc import Iterator

import jax
import numpy as np

from simmim_jax.data import array_record, augment, decode, digits, image_files, normalization, pipeline, randaugment
from simmim_jax.data._tensorflow import tf

_SUBSET_STREAM, _AUGMENTATION_STREAM = 2, 1
EVAL_RESIZE_RATIO = 256 / 224  # official: Resize(int(256 / 224 * IMG_SIZE)) then CenterCrop(IMG_SIZE)
SMALL_IMAGE_SIZE = 32  # official data_finetune.py: `resize_im = IMG_SIZE > 32`; at or below it, CIFAR transforms
SMALL_IMAGE_CROP_PADDING = 4  # official: RandomCrop(IMG_SIZE, padding=4) replaces RandomResizedCrop
INDEXED_SOURCES = ("folder", "digits")  # index-addressable: sample i is a function of (seed, i); exact resume


# ----------------------------------------------------------------------------------------------------
# Sources


def folder_split(data_dir: str, split: str, class_names: list[str]) -> tuple[list[str], np.ndarray]:
  """(sorted files, int labels) of `data_dir/split/<label>/*`."""
  split_dir = os.path.join(data_dir, split)
  files = image_files.list_image_files(split_dir)
  index = {name: i for i, name in enumerate(class_names)}
  labels = []
  for path in files:
    label = os.path.relpath(path, split_dir).split(os.sep)[0]
    if label not in index or os.path.dirname(os.path.relpath(path, split_dir)) == "":
      raise ValueError(f"{path!r}: images of a 'folder' source must sit in {split_dir!r}/<label>/ sub-folders")
    labels.append(index[label])
  return files, np.asarray(labels, np.int64)


def folder_class_names(data_dir: str) -> list[str]:
  """Sorted label-folder names over every split folder of `data_dir`."""
  if not os.path.isdir(data_dir):
    raise ValueError(f"data.data_dir={data_dir!r} is not a folder (source='folder' wants <dir>/<split>/<label>/*)")
  names = set()
  for split in os.listdir(data_dir):
    if os.path.isdir(os.path.join(data_dir, split)):
      names.update(d for d in os.listdir(os.path.join(data_dir, split))
                   if os.path.isdir(os.path.join(data_dir, split, d)))
  if not names:
    raise ValueError(f"data.data_dir={data_dir!r} has no <split>/<label>/ folders")
  return sorted(names)


def subset_per_class(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
  """Indices of `per_class` examples of each class (all of a smaller class), a seeded choice, sorted."""
  rng = np.random.default_rng([seed, _SUBSET_STREAM])
  order = rng.permutation(len(labels))
  kept, counts = [], {}
  for i in order:
    if counts.get(labels[i], 0) < per_class:
      counts[labels[i]] = counts.get(labels[i], 0) + 1
      kept.append(i)
  return np.sort(np.asarray(kept, np.int64))


def digits_holdout(data_config) -> str:
  """The digits holdout that `data.eval_split` names ("test" or "val"); ValueError for other splits."""
  if data_config.eval_split not in digits.HOLDOUTS:
    raise ValueError(f"data.eval_split={data_config.eval_split!r}: source='digits' evaluates on 'test' (the fixed "
                     "test split) or 'val' (a validation split carved from train)")
  if data_config.train_split != "train":
    raise ValueError(f"data.train_split={data_config.train_split!r}: source='digits' trains on 'train'")
  return data_config.eval_split


def dataset_info(data_config) -> dict:
  """{"num_classes", "num_train", "num_eval"} of the configured data (train count after the subset)."""
  if data_config.source in INDEXED_SOURCES:
    if data_config.source == "digits":
      holdout = digits_holdout(data_config)
      _, labels = digits.load_digits()
      num_classes = digits.NUM_CLASSES
      train_labels = labels[digits.split_indices("train", holdout)]
      num_eval = len(digits.split_indices(holdout, holdout))
    else:
      names = folder_class_names(data_config.data_dir)
      _, train_labels = folder_split(data_config.data_dir, data_config.train_split, names)
      num_classes, num_eval = len(names), len(folder_split(data_config.data_dir, data_config.eval_split, names)[0])
    num_train = len(train_labels)
    if data_config.train_examples_per_class:
      num_train = len(subset_per_class(train_labels, data_config.train_examples_per_class, data_config.subset_seed))
    return {"num_classes": num_classes, "num_train": num_train, "num_eval": num_eval}
  if data_config.source == "tfds":
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    if data_config.train_examples_per_class:
      raise ValueError("data.train_examples_per_class is implemented for source='folder' and 'digits' only")
    info = tfds.builder(data_config.name, data_dir=data_config.data_dir or None).info
    if "label" not in info.features or "image" not in info.features:
      raise ValueError(f"tfds dataset {data_config.name!r} needs 'image' and 'label' features; it has "
                       f"{sorted(info.features)}")
    return {"num_classes": info.features["label"].num_classes,
            "num_train": info.splits[data_config.train_split].num_examples,
            "num_eval": info.splits[data_config.eval_split].num_examples}
  if data_config.source == array_record.SOURCE:
    names = array_record.class_names(data_config)
    return {"num_classes": len(names),
            "num_train": len(array_record.split_records(data_config, data_config.train_split)),
            "num_eval": len(array_record.split_records(data_config, data_config.eval_split))}
  raise ValueError(f"data.source={data_config.source!r}: fine-tuning reads 'folder', 'digits', 'tfds' or "
                   "'array_record'")


def _indexed_examples(data_config, split: str, subset: bool, image_size: int):
  """(count, read) of a split of an INDEXED_SOURCES source (after the train subset if `subset`):
  read(int64 index) -> (uint8 [H, W, C] image, int64 label, error: tf.string, empty unless the file was refused).

  A refused folder file (not a regular file, too large, not an image, too many pixels) yields a 1x1 placeholder
  and the error naming it, which `pipeline._raise_data_errors` raises at its batch: the error travels as data,
  not as an exception inside `tf.numpy_function` (TensorFlow would log it with two Python tracebacks)."""
  if data_config.source == "digits":
    images, labels = digits.digits_split(split, image_size, digits_holdout(data_config))
  else:
    files, labels = folder_split(data_config.data_dir, split, folder_class_names(data_config.data_dir))
  keep = np.arange(len(labels))
  if subset and data_config.train_examples_per_class:
    keep = subset_per_class(labels, data_config.train_examples_per_class, data_config.subset_seed)
  label_table = tf.constant(labels[keep])
  if data_config.source == "digits":
    image_table = tf.constant(images[keep])  # [n, S, S, 1] grey: to_rgb in the transforms repeats it
    return len(keep), lambda index: (tf.gather(image_table, index), tf.gather(label_table, index), tf.constant(b""))
  files = [files[i] for i in keep]
  paths = tf.constant(files)
  max_pixels = decode.max_image_pixels(image_size, data_config.get("max_image_pixels", 0))

  placeholder = _placeholder_png()

  def read_checked(path: bytes) -> tuple[bytes, bytes]:  # a regular file of bounded size; header only: TF decodes
    try:
      return decode.read_image_file(path.decode(), max_pixels), b""
    except decode.DECODE_ERRORS as e:
      return placeholder, (f"cannot decode image {path.decode(errors='replace')!r}: {type(e).__name__}: "
                           f"{decode.one_line(e)}").encode()

  def read(index):
    path = tf.gather(paths, index)
    encoded, error = tf.numpy_function(read_checked, [path], (tf.string, tf.string), stateful=False)
    image = tf.io.decode_image(tf.ensure_shape(encoded, []), channels=3, expand_animations=False)
    return image, tf.gather(label_table, index), tf.ensure_shape(error, [])

  return len(files), read


# ----------------------------------------------------------------------------------------------------
# Transforms


def random_erasing(image: tf.Tensor, seed: tf.Tensor, probability: float) -> tf.Tensor:
  """timm `RandomErasing(probability, mode="pixel", max_count=1)` on a normalized [H, W, 3] image: up to
  10 attempts at a box of area U(0.02, 1/3) and log aspect ratio U(log 0.3, log 1/0.3); the first that
  fits is filled with per-pixel N(0, 1) noise."""
  apply_seed, area_seed, ratio_seed, top_seed, left_seed, noise_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 6))
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  area = tf.cast(height * width, tf.float32)
  target_area = area * tf.random.stateless_uniform([10], area_seed, 0.02, 1 / 3)
  aspect = tf.exp(tf.random.stateless_uniform([10], ratio_seed, math.log(0.3), math.log(1 / 0.3)))
  box_h = tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32)
  box_w = tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32)
  fits = (box_w < width) & (box_h < height)
  first = tf.argmax(tf.cast(fits, tf.int32))
  h, w = box_h[first], box_w[first]
  top = tf.random.stateless_uniform([], top_seed, 0, tf.maximum(height - h + 1, 1), dtype=tf.int32)
  left = tf.random.stateless_uniform([], left_seed, 0, tf.maximum(width - w + 1, 1), dtype=tf.int32)
  rows, cols = tf.range(height)[:, None], tf.range(width)[None, :]
  in_box = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
  apply = (tf.random.stateless_uniform([], apply_seed) < probability) & tf.reduce_any(fits)
  noise = tf.random.stateless_normal(tf.shape(image), noise_seed)
  return tf.where(apply & in_box[..., None], noise, image)


def _normalize(image):
  mean = tf.constant(normalization.IMAGENET_MEAN, tf.float32)
  std = tf.constant(normalization.IMAGENET_STD, tf.float32)
  return (image / 255.0 - mean) / std


def _resize_to(image: tf.Tensor, image_size: int) -> tf.Tensor:
  """float32 [H, W, 3] -> [size, size, 3]: bicubic (antialiased, as PIL) unless it already has that size."""
  same = (tf.shape(image)[0] == image_size) & (tf.shape(image)[1] == image_size)
  return tf.cond(same, lambda: image, lambda: tf.clip_by_value(
      tf.image.resize(image, [image_size, image_size], "bicubic", antialias=True), 0.0, 255.0))


def padded_random_crop(image: tf.Tensor, seed: tf.Tensor, image_size: int,
                       padding: int = SMALL_IMAGE_CROP_PADDING) -> tf.Tensor:
  """torchvision RandomCrop(size, padding) with zero fill: float32 [H, W, 3] -> [size, size, 3], a window
  of the zero-padded image at a uniform position (an image smaller than size is first resized to it)."""
  top_seed, left_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  shape = tf.shape(image)
  image = tf.cond((shape[0] < image_size) | (shape[1] < image_size), lambda: _resize_to(image, image_size),
                  lambda: image)
  padded = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
  height, width = tf.shape(padded)[0], tf.shape(padded)[1]
  top = tf.random.stateless_uniform([], top_seed, 0, height - image_size + 1, dtype=tf.int32)
  left = tf.random.stateless_uniform([], left_seed, 0, width - image_size + 1, dtype=tf.int32)
  return padded[top:top + image_size, left:left + image_size]


def train_transform(image: tf.Tensor, seed: tf.Tensor, *, image_size: int, crop_scale, crop_ratio,
                    randaugment_config: str, reprob: float, crop_padding: int = SMALL_IMAGE_CROP_PADDING
                    ) -> tf.Tensor:
  """uint8 [H, W, C] -> normalized float32 [size, size, 3] (see the module docstring)."""
  crop_seed, flip_seed, augment_seed, erase_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
  image = augment.to_rgb(image)
  if image_size <= SMALL_IMAGE_SIZE:
    image = padded_random_crop(tf.cast(image, tf.float32), crop_seed, image_size, crop_padding)
  else:
    shape = tf.shape(image)
    top, left, crop_h, crop_w = augment.sample_crop_window(crop_seed, shape[0], shape[1], tuple(crop_scale),
                                                           tuple(crop_ratio))
    crop = tf.cast(image[top:top + crop_h, left:left + crop_w], tf.float32)
    image = tf.clip_by_value(tf.round(tf.image.resize(crop, [image_size, image_size], "bicubic", antialias=True)),
                             0.0, 255.0)  # PIL bicubic, back to uint8 values
  flip = tf.random.stateless_uniform([], flip_seed) < 0.5
  image = tf.cond(flip, lambda: tf.image.flip_left_right(image), lambda: image)
  if randaugment_config:
    image = randaugment.rand_augment(image, augment_seed, randaugment_config)
  image = _normalize(image)
  if reprob > 0:
    image = random_erasing(image, erase_seed, reprob)
  return tf.ensure_shape(image, [image_size, image_size, 3])


def eval_transform(image: tf.Tensor, *, image_size: int) -> tf.Tensor:
  """Resize the shorter side to int(256/224 * size) (bicubic), centre crop, normalize; size <= 32: normalize only."""
  image = tf.cast(augment.to_rgb(image), tf.float32)
  if image_size <= SMALL_IMAGE_SIZE:  # official: no Resize / CenterCrop when IMG_SIZE <= 32
    return tf.ensure_shape(_normalize(_resize_to(image, image_size)), [image_size, image_size, 3])
  resize = int(EVAL_RESIZE_RATIO * image_size)
  height, width = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
  short = tf.minimum(height, width)
  new_h = tf.cast(tf.where(height <= width, float(resize), tf.floor(resize * height / short)), tf.int32)
  new_w = tf.cast(tf.where(width <= height, float(resize), tf.floor(resize * width / short)), tf.int32)
  image = tf.clip_by_value(tf.image.resize(image, tf.stack([new_h, new_w]), "bicubic", antialias=True), 0.0, 255.0)
  top = tf.cast(tf.round(tf.cast(new_h - image_size, tf.float32) / 2.0), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_w - image_size, tf.float32) / 2.0), tf.int32)
  image = image[top:top + image_size, left:left + image_size]
  return tf.ensure_shape(_normalize(image), [image_size, image_size, 3])


# ----------------------------------------------------------------------------------------------------
# Iterators


def _placeholder_png() -> bytes:
  """A 1x1 black PNG: what a refused file decodes to (its sample carries the error that stops the run)."""
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  buffer = io.BytesIO()
  Image.new("RGB", (1, 1)).save(buffer, "PNG")
  return buffer.getvalue()


def _finish(dataset, local_batch_size):
  options = tf.data.Options()
  options.deterministic = True
  options.threading.max_intra_op_parallelism = 1
  return dataset.batch(local_batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE).with_options(options)


def create_train_iterator(data_config, *, image_size: int, global_batch_size: int, seed: int, start_step: int = 0,
                          randaugment_config: str = "", reprob: float = 0.0, process_index: int | None = None,
                          process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Endless iterator of this process's rows {"image": float32 [b, S, S, 3], "label": int32 [b]}."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  local_batch_size = global_batch_size // process_count
  transform = lambda image, sample_seed: train_transform(
      image, sample_seed, image_size=image_size, crop_scale=data_config.crop_scale,
      crop_ratio=data_config.crop_ratio, randaugment_config=randaugment_config, reprob=reprob,
      crop_padding=data_config.get("crop_padding", SMALL_IMAGE_CROP_PADDING))
  if data_config.source == array_record.SOURCE:  # Grain, the same transform in its workers
    return array_record.create_labelled_iterator(
        data_config, functools.partial(
            train_transform, image_size=image_size, crop_scale=tuple(data_config.crop_scale),
            crop_ratio=tuple(data_config.crop_ratio), randaugment_config=randaugment_config, reprob=reprob,
            crop_padding=data_config.get("crop_padding", SMALL_IMAGE_CROP_PADDING)),
        image_size=image_size, global_batch_size=global_batch_size, seed=seed, start_step=start_step,
        process_index=process_index, process_count=process_count)
  augmentation_key = tf.constant([seed, _AUGMENTATION_STREAM], tf.int64)
  if data_config.source in INDEXED_SOURCES:
    num_images, read = _indexed_examples(data_config, data_config.train_split, subset=True, image_size=image_size)
    indices = pipeline.sample_index_stream(num_images, seed=seed, start_step=start_step,
                                           global_batch_size=global_batch_size, process_index=process_index,
                                           process_count=process_count)

    def load(sample_index, image_index):
      image, label, error = read(image_index)
      sample_seed = tf.random.experimental.stateless_fold_in(augmentation_key, sample_index)
      return {"image": transform(image, sample_seed), "label": tf.cast(label, tf.int32), "error": error}

    samples = indices.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  else:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    builder = tfds.builder(data_config.name, data_dir=data_config.data_dir or None)
    split = tfds.split_for_jax_process(data_config.train_split, process_index=process_index,
                                       process_count=process_count, drop_remainder=True)
    files_seed, buffer_seed, aug_seed = (
        int(s) for s in np.random.SeedSequence([seed, start_step, process_index]).generate_state(3))
    augmentation_key = tf.constant([aug_seed, _AUGMENTATION_STREAM], tf.int64)
    dataset = builder.as_dataset(split=split, shuffle_files=True, read_config=tfds.ReadConfig(shuffle_seed=files_seed),
                                 decoders={"image": tfds.decode.SkipDecoding()})
    decode_image = builder.info.features["image"].decode_example

    def load(counter, example):
      sample_seed = tf.random.experimental.stateless_fold_in(augmentation_key, counter)
      return {"image": transform(decode_image(example["image"]), sample_seed),
              "label": tf.cast(example["label"], tf.int32)}

    samples = (dataset.map(lambda e: {"image": e["image"], "label": e["label"]}).repeat()
               .shuffle(data_config.shuffle_buffer_size, seed=buffer_seed).enumerate()
               .map(load, num_parallel_calls=tf.data.AUTOTUNE))
  return pipeline.Batches(pipeline._raise_data_errors(  # DataError
      _finish(samples, local_batch_size).as_numpy_iterator()), decode.SkipCounter())


def create_eval_iterator(data_config, *, image_size: int, global_batch_size: int, process_index: int | None = None,
                         process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """One pass over the eval split: {"image", "label", "valid"} with every example exactly once; the last
  batches are padded (valid = 0) so that every process yields the same number of batches."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  local_batch_size = global_batch_size // process_count

  if data_config.source == array_record.SOURCE:
    return array_record.create_labelled_iterator(
        data_config, functools.partial(eval_transform, image_size=image_size), image_size=image_size,
        global_batch_size=global_batch_size, process_index=process_index, process_count=process_count,
        evaluation=True)

  def transform(image, label, valid):
    return {"image": eval_transform(image, image_size=image_size), "label": tf.cast(label, tf.int32),
            "valid": valid}

  if data_config.source in INDEXED_SOURCES:
    num_images, read = _indexed_examples(data_config, data_config.eval_split, subset=False, image_size=image_size)
    num_batches = math.ceil(num_images / global_batch_size)
    # Global example i (padded to whole global batches) belongs to the process owning its batch row.
    index = np.arange(num_batches * global_batch_size).reshape(num_batches, process_count, local_batch_size)
    mine = index[:, process_index].reshape(-1)
    def read_example(i):
      image, label, error = read(tf.minimum(i, num_images - 1))
      return {**transform(image, label, tf.cast(i < num_images, tf.float32)), "error": error}

    samples = tf.data.Dataset.from_tensor_slices(mine).map(read_example, num_parallel_calls=tf.data.AUTOTUNE,
                                                           deterministic=True)
  else:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    builder = tfds.builder(data_config.name, data_dir=data_config.data_dir or None)
    total = builder.info.splits[data_config.eval_split].num_examples
    num_local = math.ceil(math.ceil(total / process_count) / local_batch_size) * local_batch_size
    split = tfds.split_for_jax_process(data_config.eval_split, process_index=process_index,
                                       process_count=process_count, drop_remainder=False)
    real = builder.as_dataset(split=split, shuffle_files=False).map(
        lambda e: (e["image"], e["label"], tf.constant(1.0)))
    padding = real.take(1).repeat().map(lambda image, label, _: (image, label, tf.constant(0.0)))
    samples = real.concatenate(padding).take(num_local).map(transform, num_parallel_calls=tf.data.AUTOTUNE,
                                                           deterministic=True)
  return pipeline.Batches(pipeline._raise_data_errors(  # DataError
      _finish(samples, local_batch_size).as_numpy_iterator()), decode.SkipCounter())
