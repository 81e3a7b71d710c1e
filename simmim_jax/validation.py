"""Config checks shared by every recipe: each raises ConfigError naming the key, the value and the fix.

Everything here only reads the config (and asks JAX how many devices there are): a recipe runs all of its
checks before it writes a file or compiles a step.
"""

import numbers
from typing import Any

import jax
import ml_collections

from simmim_jax import models, optim, sharding, wandb_logging


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key, the value and the fix."""


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


def check_run(config: ml_collections.ConfigDict) -> None:
  """The checks every recipe shares: dtype, cadences, counts, optimizer values, model field values, crop
  ranges, the batch over the mesh."""
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


def check_model(build, describe: str, init=None) -> Any:
  """Builds the model with `build()` and, given `init(model)`, traces it with `jax.eval_shape` (shapes only,
  nothing computed or allocated). A failure (an unknown field, a size that does not divide) becomes one
  ConfigError line starting with `describe`. Returns the built module."""
  try:
    model = build()
    if init is not None:
      jax.eval_shape(lambda: init(model))
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


def _one_line(error: BaseException) -> str:
  return " ".join(str(error).split())
