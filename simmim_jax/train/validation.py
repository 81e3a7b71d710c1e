"""Config checks shared by every recipe: each raises ConfigError naming the key, the value and the fix.

Everything here only reads the config (and asks JAX how many devices there are): a recipe runs all of its
checks before it writes a file or compiles a step.
"""

import math
import numbers
from typing import Any

import jax
import ml_collections
from absl import logging

from simmim_jax.train import memory_estimate, optim, sharding
from simmim_jax import configs, models
from simmim_jax.storage import wandb_logging


ConfigError = configs.ConfigError  # every check below raises it, or one of these refinements


class DoesNotFit(ConfigError):
  """The run needs more memory than this machine has (`check_memory`): refused, and --print_config still
  describes it; the message names the value that drives the need and the ways out."""


class DataNotReady(ConfigError):
  """The data the config names is not there yet (a tfds dataset not prepared, a missing image folder): the run
  is refused, and --print_config still describes it; the message says how to prepare the data."""


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
  value = config
  for part in key.split("."):
    value = value[part]
  return value


def _is_number(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_at_least(config: ml_collections.ConfigDict, minimums: dict[str, int | float], *,
                   why: dict[str, str] | None = None) -> None:
  """Each `config.<key>` that exists is a number >= its minimum (`why[key]` says what the minimum means)."""
  for key, minimum in minimums.items():
    try:
      value = _get(config, key)
    except (KeyError, AttributeError):
      continue
    if not _is_number(value) or value < minimum:
      note = f" ({why[key]})" if why and key in why else ""
      raise ConfigError(f"config.{key}={value!r}: use a number >= {minimum}{note}")


def check_fraction(config: ml_collections.ConfigDict, keys: tuple[str, ...], *, closed: bool = True) -> None:
  """Each `config.<key>` that exists lies in [0, 1] (`closed`) or [0, 1)."""
  for key in keys:
    try:
      value = _get(config, key)
    except (KeyError, AttributeError):
      continue
    if not _is_number(value) or not (0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0):
      raise ConfigError(f"config.{key}={value!r}: use a number in [0, 1{']' if closed else ')'}")


def check_range(config: ml_collections.ConfigDict, key: str, *, low: float = 0.0, high: float | None = None) -> None:
  """`config.<key>` is an ordered pair (lo, hi) with low < lo <= hi (<= high when given)."""
  try:
    value = _get(config, key)
  except (KeyError, AttributeError):
    return
  pair = tuple(value) if isinstance(value, (tuple, list)) else None
  upper = "" if high is None else f" <= {high}"
  if (pair is None or len(pair) != 2 or not all(_is_number(v) for v in pair) or not low < pair[0] <= pair[1]
      or (high is not None and pair[1] > high)):
    raise ConfigError(f"config.{key}={value!r}: use an ordered pair (lo, hi) with {low} < lo <= hi{upper}")


def check_choice(config: ml_collections.ConfigDict, key: str, choices) -> None:
  value = _get(config, key)
  if value not in choices:
    raise ConfigError(f"config.{key}={value!r}: use one of {', '.join(repr(c) for c in choices)}")


# Cadences and counts every recipe has: 0 is never allowed where it would divide or delete everything.
RUN_MINIMUMS = {"global_batch_size": 1, "log_every_steps": 1, "checkpoint_every_steps": 1, "keep_checkpoints": 1,
                "max_nonfinite_steps": 1, "total_steps": 0, "warmup_steps": 0, "num_epochs": 0, "warmup_epochs": 0,
                "img_size": 1, "optimizer.accumulation_steps": 1, "optimizer.base_lr": 0, "optimizer.warmup_lr": 0,
                "optimizer.min_lr": 0, "optimizer.weight_decay": 0, "optimizer.clip_grad_norm": 0,
                "data.shuffle_buffer_size": 1, "data.max_image_pixels": 0}
RUN_MINIMUM_NOTES = {"keep_checkpoints": "the latest checkpoint is always kept",
                     "optimizer.clip_grad_norm": "0 disables clipping", "total_steps": "0 = from num_epochs",
                     "warmup_steps": "0 = from warmup_epochs",
                     "data.max_image_pixels": "0 = max(64 x img_size**2, 40 M pixels)"}


# Step counts and cadences live in int32 on device (the train state's step, the schedules): they must fit it.
INT32_MAX = 2 ** 31 - 1
RUN_MAXIMUMS = {key: INT32_MAX for key in (
    "total_steps", "warmup_steps", "num_epochs", "warmup_epochs", "log_every_steps", "checkpoint_every_steps",
    "reconstruction_every_steps", "eval_every_steps", "keep_checkpoints", "max_nonfinite_steps",
    "global_batch_size", "optimizer.accumulation_steps", "num_classes", "num_train_images")}
SEED_MAX = 2 ** 32 - 1  # seeds are uint32 everywhere they go (jax.random.key, numpy, tf.data)
# Encoder blocks in all: tracing the model (the shape check) takes about 12 ms per block on a CPU core, so
# this bounds the checks to seconds; the deepest published encoders have fewer than 100.
MAX_BLOCKS = 1000
# The memory estimate's verdict: refuse past twice what the machine has, warn past this share of it.
REFUSE_ABOVE, WARN_ABOVE = 2.0, 0.8


def check_run(config: ml_collections.ConfigDict) -> None:
  """The checks every recipe shares: numbers finite and in range, dtype, cadences, counts, optimizer values,
  model field values, crop ranges, the batch over the mesh."""
  check_numbers(config)
  check_choice(config, "dtype", tuple(models.DTYPES))
  check_at_least(config, RUN_MINIMUMS, why=RUN_MINIMUM_NOTES)
  for field, value in config.model.items():
    problem = models.field_value_problem(field, value)
    if problem:
      raise ConfigError(f"config.model.{field}={value!r}: {problem}")
  check_range(config, "data.crop_scale", low=0.0, high=1.0)
  check_range(config, "data.crop_ratio", low=0.0)
  try:
    optim.check_no_decay(config.optimizer.get("no_decay", "intended"))
    optim.check_warmup_prefix(optim.uses_warmup_prefix(config.optimizer), config.optimizer.get("schedule", "cosine"))
  except ValueError as e:
    raise ConfigError(_one_line(e)) from None
  check_wandb(config)
  check_batch_and_mesh(config)


def check_numbers(config: ml_collections.ConfigDict) -> None:
  """Every float of the config is finite (config.json stays JSON, and nan or inf reaches no schedule), every
  integer fits int64, step counts and cadences fit int32 (also when derived from epochs), the seed uint32."""
  seed = config.get("seed", 0)
  if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= SEED_MAX:
    raise ConfigError(f"config.seed={seed!r}: use an integer in [0, {SEED_MAX:,}] (2**32 - 1)")
  for key, value in _leaves(config):
    if isinstance(value, float) and not math.isfinite(value):
      raise ConfigError(f"config.{key}={value!r}: use a finite number")
    if isinstance(value, int) and not isinstance(value, bool) and not -2 ** 63 <= value < 2 ** 63:
      raise ConfigError(f"config.{key}={value!r}: use an integer that fits 64 bits")
  for key, maximum in RUN_MAXIMUMS.items():
    try:
      value = _get(config, key)
    except (KeyError, AttributeError):
      continue
    if _is_number(value) and value > maximum:
      raise ConfigError(f"config.{key}={value!r}: use a number <= {maximum:,} (step counts are int32)")
  try:
    total, warmup, _ = optim.steps_from_config(config)
  except (KeyError, AttributeError, TypeError, ZeroDivisionError):
    return  # a missing or mistyped field: the checks that follow name it
  if max(total, warmup) > INT32_MAX:
    raise ConfigError(f"config.num_epochs={config.num_epochs} / warmup_epochs={config.warmup_epochs} give "
                      f"{max(total, warmup):,} steps of {config.global_batch_size} images: more than int32 "
                      f"holds ({INT32_MAX:,}); use fewer epochs")


def _leaves(config: Any, prefix: str = ""):
  """(dotted key, value) of every value in a ConfigDict, tuples and lists element by element."""
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaves(value, f"{name}.")
    elif isinstance(value, (tuple, list)):
      yield from ((name, v) for v in value)
    else:
      yield name, value


def check_traceable(config: ml_collections.ConfigDict, encoder, *, memory: dict | None = None) -> None:
  """Tracing the model (the shape check, `check_model`) ends in seconds and fits the host: at most MAX_BLOCKS
  blocks, and position tables (numpy, built while tracing) within twice the host's memory. With `memory` (the
  keyword arguments of `check_memory`), the whole memory estimate is checked too, before anything is traced."""
  blocks = sum(s.blocks for s in memory_estimate.stages(encoder))
  if blocks > MAX_BLOCKS:
    raise ConfigError(f"config.model: {blocks:,} blocks (depth / depths): use at most {MAX_BLOCKS}")
  tables = {"position tables": memory_estimate.host_bytes(encoder)["position tables"]}
  available = memory_estimate.host_memory_bytes()
  if tables["position tables"] > REFUSE_ABOVE * available:
    raise DoesNotFit(_judge(config, tables, available, "of host memory", 1, encoder, 1, 0))
  if memory is not None:
    check_memory(config, encoder, **memory)


def check_memory(config: ml_collections.ConfigDict, encoder, **kwargs) -> None:
  """DoesNotFit when `memory_problem` finds one."""
  problem = memory_problem(config, encoder, **kwargs)
  if problem:
    raise DoesNotFit(problem)


def memory_problem(config: ml_collections.ConfigDict, encoder, *, head_parameters: int = 0,
                   trains_encoder: bool = True) -> str | None:
  """The run's lower-bound memory (memory_estimate.py) against this machine: what to change (naming the value
  that drives the need) when it needs more than twice what there is, else None, with a warning near the
  limit. Computes from the encoder's fields only: microseconds for any size."""
  devices = jax.local_devices()
  batch = max(config.global_batch_size // jax.device_count(), 1)
  fsdp = sharding.mesh_shape(config.mesh, jax.device_count())[1]
  per_device = memory_estimate.device_bytes(
      encoder, batch_per_device=batch, compute_bytes=2 if config.dtype == "bfloat16" else 4, fsdp=fsdp,
      head_parameters=head_parameters, trains_encoder=trains_encoder)
  data = config.get("data", {})
  demo = data.get("source") == "demo"
  host = memory_estimate.host_bytes(encoder, demo_images=data.get("num_demo_images", 0) if demo else 0,
                                    demo_image_size=data.get("demo_image_size", 0) if demo else 0)
  device_memory = memory_estimate.device_memory_bytes(devices[0])
  if device_memory is None:  # CPU devices: one memory, the host's, for all of them
    judged = [({**{k: v * len(devices) for k, v in per_device.items()}, **host},
               memory_estimate.host_memory_bytes(), "of host memory")]
  else:
    judged = [(per_device, device_memory, f"per {devices[0].platform.upper()} device"),
              (host, memory_estimate.host_memory_bytes(), "of host memory")]
  for parts, available, where in judged:
    problem = _judge(config, parts, available, where, batch, encoder, fsdp, head_parameters)
    if problem:
      return problem
  return None


def _judge(config, parts: dict[str, int], available: int, where: str, batch: int, encoder, fsdp: int,
           head_parameters: int) -> str | None:
  needed = sum(parts.values())
  if needed <= WARN_ABOVE * available:
    return None
  largest = max(parts, key=parts.get)
  counted = ", ".join(f"{k} {memory_estimate.gib(v)}" for k, v in parts.items() if v >= 2 ** 20)
  summary = (f"needs at least {memory_estimate.gib(needed)} {where} ({counted}); this machine has "
             f"{memory_estimate.gib(available)}")
  block_parameters = memory_estimate.block_parameters(encoder)
  ways_out = {
      "model state": f"config.num_classes={config.get('num_classes')} (a head of {head_parameters:,} "
                     f"parameters) with config.mesh.fsdp={fsdp}: lower it, or shard over more devices "
                     "(config.mesh.fsdp)" if head_parameters > block_parameters else
                     f"config.model.name={config.model.name!r} (about {block_parameters:,} "
                     f"parameters in its blocks) with config.mesh.fsdp={fsdp}: shard it over more devices "
                     "(config.mesh.fsdp), or use a smaller model or fewer classes",
      "activations": f"config.global_batch_size={config.global_batch_size} ({batch} images per device) at "
                     f"config.img_size={config.img_size}: lower the images per device (raise "
                     "config.optimizer.accumulation_steps to keep the images per update, or use more devices), "
                     "set config.model.remat=True, or lower config.img_size",
      "position tables": f"config.img_size={config.img_size} (attention windows of up to "
                         f"{max(s.window_tokens for s in memory_estimate.stages(encoder)):,} tokens; patch_size "
                         f"{encoder.patch_size}): lower config.img_size or the window",
      "demo dataset": f"config.data.num_demo_images={config.data.get('num_demo_images')} x demo_image_size="
                      f"{config.data.get('demo_image_size')}: lower either",
  }[largest]
  if needed > REFUSE_ABOVE * available:
    return f"{ways_out}: the run {summary}"
  logging.warning("This run %s: it may not fit. %s", summary, ways_out)
  return None


def check_wandb(config: ml_collections.ConfigDict) -> None:
  """config.wandb (when the config has the block): known mode, string fields, and wandb installed when on."""
  block = config.get("wandb")
  if block is None:
    return
  for field in ("project", "entity", "name"):
    if not isinstance(block.get(field, ""), str):
      raise ConfigError(f"config.wandb.{field}={block[field]!r}: use a string")
  check_choice(config, "wandb.mode", wandb_logging.MODES)
  if wandb_logging.enabled(config):
    try:
      wandb_logging.import_wandb()
    except ImportError:
      raise ConfigError(f"config.wandb.project={block.project!r} turns on Weights & Biases logging, but wandb is "
                        f"not installed: {wandb_logging.INSTALL_HINT} (or set config.wandb.project='')") from None


def check_batch_and_mesh(config: ml_collections.ConfigDict) -> None:
  """global_batch_size splits evenly over the devices and config.mesh fits them."""
  devices, processes = jax.device_count(), jax.process_count()
  if config.global_batch_size <= 0 or config.global_batch_size % devices:
    raise ConfigError(f"config.global_batch_size={config.global_batch_size} must be a positive multiple of "
                      f"the number of devices ({devices}, over {processes} process(es))")
  try:
    sharding.mesh_shape(config.mesh, devices)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def check_model(build, describe: str, init=None, before_tracing=None) -> Any:
  """Builds the model with `build()`, runs `before_tracing(model)` (`check_traceable`: bounds before anything
  is traced) and, given `init(model)`, traces it with `jax.eval_shape` (shapes only, nothing computed or
  allocated). A failure (an unknown field, a size that does not divide) becomes one ConfigError line starting
  with `describe`. Returns the built module."""
  try:
    model = build()
    if before_tracing is not None:
      before_tracing(model)
    if init is not None:
      jax.eval_shape(lambda: init(model))
  except ConfigError:
    raise
  except (ValueError, TypeError, KeyError, IndexError, ZeroDivisionError) as e:
    raise ConfigError(f"{describe}: {_one_line(e)}") from None
  return model


def check_tfds_prepared(data_config) -> None:
  """config.data names a tensorflow-datasets dataset that is prepared in its data_dir (imports tfds)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (imports TF lazily)

  try:
    builder = tfds.builder(data_config.name, data_dir=data_config.data_dir or None)
  except Exception as e:  # pylint: disable=broad-except  (tfds raises DatasetNotFoundError and others)
    raise ConfigError(f"config.data.name={data_config.name!r} (data_dir={data_config.data_dir!r}) is not a "
                      f"tensorflow-datasets dataset: {type(e).__name__}: {str(e).splitlines()[0]}") from None
  if not builder.is_prepared():
    raise DataNotReady(
        f"tfds dataset {data_config.name!r} is not prepared in {builder.data_dir}: prepare it once "
        f"(`tfds build {data_config.name} --data_dir=DIR`; ImageNet needs its manually downloaded archives) "
        "and set config.data.data_dir=DIR")


def check_array_record_prepared(data_config, split: str) -> None:
  """config.data (source="array_record") names ArrayRecord data that holds `split`: shards simmim-prepare wrote
  in data_dir (data.name=""), or a tfds dataset built with --file_format=array_record. DataNotReady if not."""
  from simmim_jax.data import array_record  # pylint: disable=g-import-not-at-top

  if data_config.get("name", ""):
    check_tfds_prepared(data_config)
  try:
    array_record.Records(data_config.data_dir, split, data_config.get("name", ""))
  except (ValueError, OSError) as e:
    raise DataNotReady(f"config.data (source='array_record', data_dir={data_config.data_dir!r}): "
                       f"{_one_line(e)}") from None


def _one_line(error: BaseException) -> str:
  return " ".join(str(error).split())
