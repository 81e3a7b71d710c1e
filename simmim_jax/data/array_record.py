"""ArrayRecord data read with Grain (data.source="array_record"): random access, a global shuffle by index,
decoding and augmentation in worker processes, and a resume that is sample-exact at any step and process count.

Two kinds of data in data.data_dir (a local folder, or a Cloud Storage bucket mounted with gcsfuse: ArrayRecord
reads files through the local file system):
  * data.name == "": the shards `simmim-prepare` writes: `<split>.json` (the index: shard names relative to
    data.data_dir, record counts, class names) and `<split>/shard-NNNNN-of-MMMMM.array_record`; a record is the
    label as a little-endian int64 (-1: no label) followed by the image file's bytes, as they were in the folder.
  * data.name set: the tensorflow-datasets dataset prepared with
    `tfds build NAME --file_format=array_record`, read through tfds' random-access source
    (`builder.as_data_source`), keys "image" (encoded) and "label".

Sample order, augmentation and rows: those of the folder source (`simmim_jax.data.pipeline`). Global sample i
shows record `epoch_permutation(seed, i // N)[i % N]`, augmented with the seed fold_in((seed, 1), i); each process
computes only rows [p * L, (p + 1) * L) of every global batch. The stream is a function of the step alone, so
a checkpoint needs no iterator state: a run killed at any step and restarted from its last checkpoint (on any
number of processes or Grain workers) sees exactly the batches of an uninterrupted run. On the same images,
the shards give the folder source's pretraining batches.

Work: Grain (https://github.com/google/grain) runs the index -> batch function in `data.grain_workers` spawned
processes (0: in this process), each computing whole batches in turn (`MapDataset.batch` before
`mp_prefetch`), so the batches do not depend on the worker count. Reading and decoding are TensorFlow-free
(array_record, Pillow with the bounds of `decode`); the epoch permutation (TF's stateless shuffle, the folder
source's) and the transforms (`augment`, `finetune_pipeline`: TF ops in a `tf.function`) run on TensorFlow
inside the workers.

An undecodable record is skipped and counted, and the next record takes its place (as the folder source
does with files); with data.strict it stops the run, naming the shard and the record index. Bounds: the index is
read as a regular file of at most MAX_INDEX_BYTES, shards must be regular files, a record of more than
`decode.max_image_bytes` is refused undecoded (ArrayRecord hands over a record whole: it was read, not decoded),
and an image declaring more than data.max_image_pixels pixels is refused before decoding (`decode.decode_rgb`).
"""

import dataclasses
import functools
import json
import math
import os
import struct
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from simmim_jax.data import decode, input_files

SOURCE = "array_record"
RECORD_FORMAT = "simmim_jax.array_record/1"  # the "format" of a `<split>.json` index
MAX_INDEX_BYTES = 64 << 20  # an index lists shards and class names: 64 MiB is far above ImageNet-21k's
_LABEL = struct.Struct("<q")
NO_LABEL = -1
# Random access: no read-ahead, no reader threads (array_record's documented random-access options).
_READER_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"
_ENDLESS = 2 ** 62  # a stream position bound no run reaches


# ----------------------------------------------------------------------------------------------------
# Records


def encode_record(image_bytes: bytes, label: int = NO_LABEL) -> bytes:
  """One record of a `simmim-prepare` shard: int64 label (little-endian) + the encoded image."""
  return _LABEL.pack(int(label)) + bytes(image_bytes)


def decode_record(record: bytes) -> tuple[bytes, int]:
  """(encoded image, label) of a `simmim-prepare` record; ValueError if it is shorter than its label."""
  if len(record) < _LABEL.size:
    raise ValueError(f"record of {len(record)} bytes holds no label")
  return record[_LABEL.size:], _LABEL.unpack_from(record)[0]


def index_path(data_dir: str, split: str) -> str:
  return os.path.join(data_dir, f"{split}.json")


def read_index(data_dir: str, split: str) -> dict[str, Any]:
  """The `<split>.json` index of prepared shards: {"format", "shards": [{"name", "num_records"}],
  "class_names"}; ValueError naming the file and the fix if it is missing or malformed."""
  path = index_path(data_dir, split)
  try:
    index = json.loads(input_files.read_regular(path, MAX_INDEX_BYTES, "shard index"))
  except FileNotFoundError:
    raise ValueError(f"data.data_dir={data_dir!r} has no {split}.json: write the shards of split {split!r} with "
                     f"`simmim-prepare --images=FOLDER --out={data_dir} --split={split}`, or set data.name to a "
                     "tfds dataset prepared with --file_format=array_record") from None
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: cannot read the shard index ({decode.one_line(e)})") from None
  shards = index.get("shards") if isinstance(index, dict) else None
  if (index.get("format") if isinstance(index, dict) else None) != RECORD_FORMAT or not isinstance(shards, list) \
      or not all(isinstance(s, dict) and isinstance(s.get("name"), str) and _inside(s["name"])
                 and isinstance(s.get("num_records"), int) and s["num_records"] >= 0 for s in shards) \
      or not isinstance(index.get("class_names", []), list):
    raise ValueError(f"{path} is not a {RECORD_FORMAT} index (write it with simmim-prepare)")
  return index


def _inside(name: str) -> bool:
  """A shard name relative to data_dir that stays inside it ("train/shard-00000-of-00001.array_record")."""
  return bool(name) and not os.path.isabs(name) and ".." not in name.replace(os.sep, "/").split("/")


class Records:
  """Random access to the records of a split: (encoded image bytes, label) by index, and the name of a record
  for messages ("DATA_DIR/train/shard-00001-of-00004.array_record[17]"). Picklable: readers open lazily in each
  process."""

  def __init__(self, data_dir: str, split: str, name: str = ""):
    self.data_dir, self.split, self.name = data_dir, split, name
    self._source = None
    if name:
      builder = _tfds_builder(name, data_dir)  # a builder does not travel to worker processes; each reopens it
      info = builder.info
      if "image" not in info.features:
        raise ValueError(f"tfds dataset {name!r} has no 'image' feature (it has {sorted(info.features)})")
      if split not in info.splits:
        raise ValueError(f"tfds dataset {name!r} has no split {split!r} (it has {sorted(info.splits)})")
      if info.file_format.value != "array_record":
        raise ValueError(f"tfds dataset {name!r} in {builder.data_dir} is stored as {info.file_format.value}: "
                         "data.source='array_record' reads datasets built with `tfds build "
                         f"{name} --file_format=array_record`; use data.source='tfds' for this one")
      self.count = info.splits[split].num_examples
      label = info.features["label"] if "label" in info.features else None
      self.class_names = list(getattr(label, "names", None) or [])
    else:
      index = read_index(data_dir, split)
      self.shards = [(s["name"], s["num_records"]) for s in index["shards"]]
      self.class_names = [str(n) for n in index.get("class_names", [])]
      self._starts = np.cumsum([0] + [n for _, n in self.shards])
      self.count = int(self._starts[-1])
      for shard, _ in self.shards:  # only regular files: a FIFO or a link to a device is never opened
        with input_files.open_regular(os.path.join(data_dir, shard), None, "ArrayRecord shard"):
          pass
    if self.count < 1:
      raise ValueError(f"split {split!r} of {name or data_dir!r} holds no records")
    self._readers = {}

  def __getstate__(self):
    return {**self.__dict__, "_readers": {}, "_source": None}

  def __len__(self) -> int:
    return self.count

  def record_name(self, index: int) -> str:
    if self.name:
      return f"{self.name}/{self.split}[{index}]"
    shard = int(np.searchsorted(self._starts, index, side="right")) - 1
    return f"{os.path.join(self.data_dir, self.shards[shard][0])}[{index - int(self._starts[shard])}]"

  def read(self, index: int) -> tuple[bytes, int]:
    """(encoded image, label) of record `index`; raises one of decode.DECODE_ERRORS if it cannot be read."""
    if self.name:
      if self._source is None:
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
        self._source = _tfds_builder(self.name, self.data_dir).as_data_source(
            split=self.split, decoders={"image": tfds.decode.SkipDecoding()})
      example = self._source[int(index)]
      return example["image"], int(example.get("label", NO_LABEL))
    shard = int(np.searchsorted(self._starts, index, side="right")) - 1
    if shard not in self._readers:
      from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
      path = os.path.join(self.data_dir, self.shards[shard][0])
      try:
        self._readers[shard] = array_record_module.ArrayRecordReader(path, _READER_OPTIONS)
      except RuntimeError as e:
        raise OSError(f"cannot open ArrayRecord shard {path}: {decode.one_line(e)}") from None
    try:
      record = self._readers[shard].read([int(index - self._starts[shard])])[0]
    except RuntimeError as e:  # a corrupt chunk: riegeli reports it as a RuntimeError
      raise OSError(decode.one_line(e)) from None
    return decode_record(record)


def _tfds_builder(name: str, data_dir: str):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.builder(name, data_dir=data_dir or None)


# ----------------------------------------------------------------------------------------------------
# The sample stream


def global_sample_index(position: int, *, start_step: int, global_batch_size: int, process_index: int,
                        process_count: int) -> int:
  """The global sample index of this process's `position`-th row from `start_step` on (rows
  [p * L, (p + 1) * L) of each global batch, L = global batch / process count; `pipeline.sample_index_stream`)."""
  local_batch_size = global_batch_size // process_count
  step, row = divmod(position, local_batch_size)
  return (start_step + step) * global_batch_size + process_index * local_batch_size + row


@dataclasses.dataclass
class Sampler:
  """position -> one sample dict, the whole per-sample work of a Grain worker: the global sample index, its
  record (the epoch permutation, or the eval position as is), bounded decoding with the skip policy, and the
  transform (a TF function of (uint8 image, int64 [2] seed), run in a tf.function). Picklable."""
  records: Records
  transform: Callable
  seed: int
  min_side: int
  max_pixels: int
  strict: bool
  start_step: int = 0
  global_batch_size: int = 1
  process_index: int = 0
  process_count: int = 1
  labels: bool = False
  eval_positions: np.ndarray | None = None  # eval: this process's padded global positions, in order
  _cache: dict = dataclasses.field(default_factory=dict)

  def __getstate__(self):
    return {**self.__dict__, "_cache": {}}

  def __call__(self, position: int) -> dict[str, np.ndarray]:
    count = len(self.records)
    if self.eval_positions is not None:
      sample = int(self.eval_positions[position])
      image, label, error, skipped = self._load(min(sample, count - 1))
      out = {"image": self._transform_fn()(image), "valid": np.float32(sample < count)}
    else:
      sample = global_sample_index(position, start_step=self.start_step, global_batch_size=self.global_batch_size,
                                   process_index=self.process_index, process_count=self.process_count)
      epoch, offset = divmod(sample, count)
      image, label, error, skipped = self._load(int(self._permutation(epoch)[offset]))
      out = {"image": self._transform_fn()(image, np.int64(sample))}
    if self.labels or self.eval_positions is not None:
      out["label"] = np.int32(label)
    out["error"], out["skipped"] = np.bytes_(error), np.bytes_(skipped)
    return out

  def _load(self, index: int) -> tuple[np.ndarray, int, bytes, bytes]:
    """(uint8 [H, W, 3], label, b"", skipped) of record `index`, or of the next decodable one, `skipped` noting
    the records passed over (`decode.skip_note`: the main process counts and logs them, `pipeline.Batches`); in
    strict mode a 1x1 placeholder and the error naming the record (raised at its batch by
    `pipeline._raise_data_errors`)."""
    count = len(self.records)
    skipped = []
    for offset in range(count):
      current = (index + offset) % count
      try:
        encoded, label = self.records.read(current)
        if len(encoded) > decode.max_image_bytes(self.max_pixels):
          raise input_files.FileTooLargeError(f"record of {len(encoded):,} bytes, more than the bound of "
                                              f"{decode.max_image_bytes(self.max_pixels):,}")
        return decode.decode_rgb(encoded, self.min_side, self.max_pixels), label, b"", b"\n".join(skipped)
      except decode.DECODE_ERRORS as e:
        name, reason = self.records.record_name(current), f"{type(e).__name__}: {e}"
        if self.strict:
          return np.zeros((1, 1, 3), np.uint8), 0, str(decode.undecodable(name, reason)).encode(), b""
        skipped.append(decode.skip_note(name, reason))
    return np.zeros((1, 1, 3), np.uint8), 0, b"no record of the split can be decoded", b""

  def _permutation(self, epoch: int) -> np.ndarray:
    if self._cache.get("epoch") != epoch:
      from simmim_jax.data import pipeline  # pylint: disable=g-import-not-at-top  (TensorFlow)
      self._cache.update(epoch=epoch, permutation=pipeline.epoch_permutation(
          len(self.records), seed=self.seed, epoch=epoch).numpy())
    return self._cache["permutation"]

  def _transform_fn(self):
    if "transform" not in self._cache:
      self._cache["transform"] = _compiled_transform(self.transform, self.seed, self.eval_positions is not None)
    return self._cache["transform"]


def _compiled_transform(transform: Callable, seed: int, evaluation: bool):
  """The transform as a numpy -> numpy function, traced once per image shape class (tf.function)."""
  from simmim_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from simmim_jax.data._tensorflow import tf  # pylint: disable=g-import-not-at-top

  image_spec = tf.TensorSpec([None, None, 3], tf.uint8)
  if evaluation:
    function = tf.function(transform, input_signature=[image_spec], reduce_retracing=True)
    return lambda image: function(image).numpy()
  key = tf.constant([seed, pipeline._AUGMENTATION_STREAM], tf.int64)  # pylint: disable=protected-access

  @tf.function(input_signature=[image_spec, tf.TensorSpec([], tf.int64)])
  def function(image, sample_index):
    return transform(image, tf.random.experimental.stateless_fold_in(key, sample_index))

  return lambda image, sample_index: function(image, sample_index).numpy()


def _init_worker(worker_index: int, worker_count: int) -> None:
  """A Grain worker: one TF thread per op (the parallelism is the worker count), no accelerators."""
  del worker_index, worker_count
  from simmim_jax.data._tensorflow import tf  # pylint: disable=g-import-not-at-top  (hides accelerators)
  try:
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
  except RuntimeError:  # already initialized
    pass


def grain_batches(sampler: Sampler, *, num_positions: int, local_batch_size: int,
                  workers: int) -> Iterator[dict[str, np.ndarray]]:
  """Batches of `sampler` over positions [0, num_positions) (whole batches only), computed by Grain in
  `workers` processes (0: in this process); errors carried by samples are raised (`_raise_data_errors`)."""
  import grain  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from simmim_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS.is_parsed():  # Grain reads its absl flags (at their defaults) when it starts workers
    flags.FLAGS.mark_as_parsed()
  batches = grain.MapDataset.range(num_positions).map(sampler).batch(local_batch_size, drop_remainder=True)
  stream = batches.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
  if workers:
    stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2),
                                worker_init_fn=_init_worker)
  return pipeline.Batches(pipeline._raise_data_errors(iter(stream)),  # pylint: disable=protected-access
                          decode.SkipCounter())


def check_workers(data_config) -> int:
  workers = data_config.get("grain_workers", 0)
  if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
    raise ValueError(f"data.grain_workers must be an integer >= 0 (processes decoding and augmenting; 0 = this "
                     f"process), got {workers!r}")
  return workers


# ----------------------------------------------------------------------------------------------------
# Pretraining


def create_pretrain_iterator(data_config, *, image_size: int, global_batch_size: int, seed: int, start_step: int,
                             process_index: int, process_count: int) -> Iterator[dict[str, np.ndarray]]:
  """This process's pretraining batches {"image": float32 [L, S, S, 3]} from `start_step` on (module docstring);
  the transform is the folder source's (`augment.pretrain_transform`)."""
  from simmim_jax.data import augment  # pylint: disable=g-import-not-at-top  (TensorFlow)

  workers = check_workers(data_config)
  records = Records(data_config.data_dir, data_config.split, data_config.get("name", ""))
  transform = functools.partial(
      augment.pretrain_transform, image_size=image_size, crop_scale=tuple(data_config.crop_scale),
      crop_ratio=tuple(data_config.crop_ratio), horizontal_flip=bool(data_config.horizontal_flip))
  sampler = Sampler(records, transform, seed, min_side=4 * image_size,
                    max_pixels=decode.max_image_pixels(image_size, data_config.get("max_image_pixels", 0)),
                    strict=bool(data_config.get("strict", False)), start_step=start_step,
                    global_batch_size=global_batch_size, process_index=process_index, process_count=process_count)
  return grain_batches(sampler, num_positions=_ENDLESS, local_batch_size=global_batch_size // process_count,
                       workers=workers)


# ----------------------------------------------------------------------------------------------------
# Fine-tuning, linear probing and evaluation (the transforms come from `finetune_pipeline`)


def split_records(data_config, split: str) -> Records:
  if data_config.get("train_examples_per_class", 0):
    raise ValueError("data.train_examples_per_class is implemented for source='folder' and 'digits' only")
  return Records(data_config.data_dir, split, data_config.get("name", ""))


def class_names(data_config) -> list[str]:
  """The class names of the train split, which the eval split must share (labels are indices into them)."""
  train = split_records(data_config, data_config.train_split).class_names
  evaluation = split_records(data_config, data_config.eval_split).class_names
  if not train:
    raise ValueError(f"split {data_config.train_split!r} of {data_config.name or data_config.data_dir!r} has no "
                     "labels: prepare it from a folder of class sub-folders (<images>/<class>/<image>)")
  if evaluation != train:
    raise ValueError(f"splits {data_config.train_split!r} and {data_config.eval_split!r} have different class "
                     f"names ({len(train)} and {len(evaluation)}): prepare both from folders with the same class "
                     "sub-folders")
  return train


def create_labelled_iterator(data_config, transform: Callable, *, image_size: int, global_batch_size: int,
                             seed: int = 0, start_step: int = 0, process_index: int, process_count: int,
                             evaluation: bool = False) -> Iterator[dict[str, np.ndarray]]:
  """Train: the endless stream {"image", "label"} of `data.train_split` from `start_step` on, transformed by
  `transform(uint8 image, seed)`. Evaluation: one pass over `data.eval_split`, `transform(uint8 image)`, with
  every example once and the last global batches padded ({"valid": 0}), as `finetune_pipeline`'s folder source."""
  workers = check_workers(data_config)
  split = data_config.eval_split if evaluation else data_config.train_split
  records = split_records(data_config, split)
  local_batch_size = global_batch_size // process_count
  positions = None
  if evaluation:  # global example i (padded to whole global batches) belongs to the process owning its row
    num_batches = math.ceil(len(records) / global_batch_size)
    grid = np.arange(num_batches * global_batch_size).reshape(num_batches, process_count, local_batch_size)
    positions = grid[:, process_index].reshape(-1)
  sampler = Sampler(records, transform, seed, min_side=0,  # full-size decoding, as the folder source's
                    max_pixels=decode.max_image_pixels(image_size, data_config.get("max_image_pixels", 0)),
                    strict=bool(data_config.get("strict", True)), start_step=start_step,
                    global_batch_size=global_batch_size, process_index=process_index, process_count=process_count,
                    labels=True, eval_positions=positions)
  return grain_batches(sampler, num_positions=_ENDLESS if positions is None else len(positions),
                       local_batch_size=local_batch_size, workers=workers)
