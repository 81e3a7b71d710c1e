"""The SimMIM pretraining input pipeline (tf.data), and TF-free helpers around it.

  iterator = data.create_pretrain_iterator(config.data, image_size=..., global_batch_size=..., seed=...)
  batch = data.make_global_batch(next(iterator), NamedSharding(mesh, P("data")))   # {"image": jax.Array}

Importing this package does not import TensorFlow: `normalization`, `demo_images`, `image_files` and
`make_global_batch` work without it, and `create_pretrain_iterator` imports TF on its first call.
"""

from collections.abc import Iterator

import numpy as np

from simmim_jax.data import normalization
from simmim_jax.data.decode import DataError, SkipCounter, UndecodableImageError
from simmim_jax.data.global_batch import make_global_batch
from simmim_jax.data.normalization import IMAGENET_MEAN, IMAGENET_STD, denormalize, normalize


def create_pretrain_iterator(data_config, *, image_size: int, global_batch_size: int, seed: int,
                             start_step: int = 0, process_index: int | None = None,
                             process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Endless iterator over this process's share of the SimMIM pretraining batches.

  Yields {"image": float32 [global_batch_size // process_count, image_size, image_size, 3]}, ImageNet-normalized,
  augmented with the official SimMIM pretraining transform (RandomResizedCrop(data.crop_scale, data.crop_ratio),
  horizontal flip if data.horizontal_flip). The first batch is the one of step `start_step`.

  data_config (config.data) fields: source ("demo" | "folder" | "tfds" | "array_record"), name, data_dir, split,
  crop_scale, crop_ratio, horizontal_flip, shuffle_buffer_size, num_demo_images; optional demo_image_size (default
  96), grain_workers (source "array_record").
  - "demo": `num_demo_images` crops of the photographs in scikit-image's wheel, built in memory (offline).
  - "folder": every .jpg/.jpeg/.png/.bmp/.gif under `data_dir` (recursive; class sub-folders or flat).
  - "tfds": `tfds.builder(name, data_dir=data_dir or None)`, this process's even share of `split`, key "image".
  - "array_record": ArrayRecord shards (simmim-prepare) or a tfds dataset built as ArrayRecord, read by Grain in
    data.grain_workers processes (`simmim_jax.data.array_record`).
  "demo", "folder" and "array_record" are a function of the global sample index: the same global batches for every
  process count, and an exact resume at `start_step`. "tfds" (tf.data over TFRecord files) is seeded by (seed,
  start_step), not sample-exact on resume.

  process_index / process_count default to jax.process_index() / jax.process_count(); global_batch_size must be a
  multiple of process_count. See `simmim_jax.data.pipeline` for the details.
  """
  if data_config.source == "array_record":  # Grain (array_record.py), after the checks every source shares
    import jax  # pylint: disable=g-import-not-at-top
    from simmim_jax.data import array_record, pipeline  # pylint: disable=g-import-not-at-top  (TensorFlow)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    pipeline._validate(data_config, image_size=image_size,  # pylint: disable=protected-access
                       global_batch_size=global_batch_size, start_step=start_step,
                       process_index=process_index, process_count=process_count)
    return array_record.create_pretrain_iterator(
        data_config, image_size=image_size, global_batch_size=global_batch_size, seed=seed, start_step=start_step,
        process_index=process_index, process_count=process_count)
  from simmim_jax.data import pipeline  # pylint: disable=g-import-not-at-top  (imports TensorFlow)
  return pipeline.create_pretrain_iterator(
      data_config, image_size=image_size, global_batch_size=global_batch_size, seed=seed, start_step=start_step,
      process_index=process_index, process_count=process_count)
