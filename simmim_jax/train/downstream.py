"""What fine-tuning and linear probing share: the resolved config (the encoder of the pretrained run, the
classes and image count of the data) with its checks, the encoder of a pretrained workdir (read-only), and the
checkpoint signature. Neither recipe imports the other; both import this.
"""

import copy
import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from simmim_jax.configs import default_config
from simmim_jax.train import mixup, optim, validation
from simmim_jax import models
from simmim_jax.storage import workdir as workdir_lib
from simmim_jax.models import classifier
from simmim_jax.train.validation import ConfigError

DTYPES = models.DTYPES
# config.model fields that belong to the fine-tuning recipe; with a pretrained workdir every other field
# (name, sizes) comes from the pretrained run. Fields the encoder class lacks are ignored (ViT vs Swin).
FINETUNE_MODEL_FIELDS = ("drop_path_rate", "drop_rate", "attn_drop_rate", "use_mean_pooling", "use_rel_pos_bias",
                         "use_shared_rel_pos_bias", "init_style", "window_size", "pretrained_window_sizes", "remat",
                         "scan_blocks", "attention_impl")
PRETRAINED_RECIPES = workdir_lib.SIMMIM_RECIPES  # what config.pretrained may name (config.json's "recipe")
DATA_SOURCES = ("tfds", "folder", "digits", "array_record")  # "digits": the demo's labelled data (data/digits.py)


def resolve_model_fields(config: ml_collections.ConfigDict) -> dict:
  """{name, field overrides} of the encoder: the pretrained run's model (if any) + this config's recipe
  fields, restricted to the fields the encoder class has."""
  own = dict(config.model.to_dict())
  if config.pretrained:
    pretrained = workdir_lib.read_config(config.pretrained).model.to_dict()
    fields = {k: v for k, v in pretrained.items() if k not in FINETUNE_MODEL_FIELDS}
    fields.update({k: v for k, v in own.items() if k in FINETUNE_MODEL_FIELDS})
  else:
    fields = own
  name = fields.pop("name")
  try:
    encoder = models.create_encoder(name)
  except ValueError as e:
    raise ConfigError(f"config.model.name: {e}") from None
  known = {f.name for f in dataclasses.fields(type(encoder))}
  fields = {k: v for k, v in models.field_overrides(fields).items() if k in known or k not in FINETUNE_MODEL_FIELDS}
  return {"name": name, **fields}


def build_encoder(model_fields: dict, img_size: int, dtype) -> Any:
  fields = {k: v for k, v in model_fields.items() if k != "name"}
  return models.create_encoder(model_fields["name"], img_size=img_size, dtype=dtype, **fields)


def load_pretrained_encoder_params(config: ml_collections.ConfigDict) -> Any:
  """The encoder parameters of the `simmim-pretrain` workdir `config.pretrained` (host arrays; read-only)."""
  _, variables, _ = workdir_lib.load_model(config.pretrained, config.pretrained_step or None,
                                           recipes=PRETRAINED_RECIPES)
  return jax.device_get(variables["params"]["encoder"])


def build_classifier(config: ml_collections.ConfigDict) -> classifier.Classifier:
  """The classifier of a *resolved* config (see `resolve_config`; a fine-tune workdir's config.json is one)."""
  return models.classifier_from_config(config)


def data_info(data_config) -> dict:
  """{"num_classes", "num_train", "num_eval"} of the configured data (finetune_pipeline.dataset_info);
  DataNotReady when it is not there yet (a tfds dataset not prepared, a missing or empty folder)."""
  from simmim_jax.data import finetune_pipeline  # pylint: disable=g-import-not-at-top

  if data_config.source == "tfds":
    validation.check_tfds_prepared(data_config)
  try:
    return finetune_pipeline.dataset_info(data_config)
  except (ValueError, FileNotFoundError, ImportError) as e:  # ImportError: source='digits' without scikit-learn
    missing = data_config.source in ("folder", "array_record") and not isinstance(e, ImportError)
    raise (validation.DataNotReady if missing else ConfigError)(f"config.data: {e}") from None


def declared_data_info(data_config) -> dict:
  """What the configured data declares before it is there, read from no data: a registered tfds dataset its
  classes (its code declares them), ImageNet-1K its 1,281,167 train images; 0 = known once the data is ready."""
  info = {"num_classes": 0, "num_train": 0}
  if data_config.source not in ("tfds", "array_record") or not data_config.get("name", ""):  # tfds-built data
    return info
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    info["num_classes"] = int(tfds.builder(data_config.name, data_dir=data_config.data_dir or None)
                              .info.features["label"].num_classes)
  except Exception:  # pylint: disable=broad-except  (no label feature, an unknown name: not declared)
    pass
  if data_config.name.split(":")[0] == "imagenet2012" and data_config.train_split == "train":
    info["num_train"] = default_config.IMAGENET_TRAIN_IMAGES
  return info


def resolve_config(config: ml_collections.ConfigDict, *, trains_encoder: bool = True,
                   declared_data: bool = False, check_memory: bool = True) -> ml_collections.ConfigDict:
  """Validates `config` and returns a copy with the encoder fields, number of classes and train image
  count filled in from the pretrained run and the data. Raises ConfigError naming the key and the fix
  (DataNotReady when the data is not there yet).
  `trains_encoder=False` (the linear probe): the memory estimate keeps no encoder activations for a backward
  pass and no optimizer state for the encoder; `check_memory=False` leaves that estimate (DoesNotFit, checked
  before the encoder is traced) to the caller (`memory_problem`, --print_config). `declared_data=True`
  (--print_config of a run whose data is not ready): the classes and train images are what the data declares (`declared_data_info`), 0 if nothing."""
  config = copy.deepcopy(config)
  validation.check_run(config)
  validation.check_at_least(config, {"eval_every_steps": 1, "num_classes": 0, "num_train_images": 0,
                                     "pretrained_step": 0, "head_init_scale": 0,
                                     "data.train_examples_per_class": 0, "data.grain_workers": 0})
  validation.check_fraction(config, ("augment.reprob", "augment.mixup_prob", "augment.mixup_switch_prob"))
  validation.check_fraction(config, ("augment.label_smoothing",), closed=False)
  validation.check_at_least(config, {"augment.mixup": 0, "augment.cutmix": 0})
  validation.check_choice(config, "data.source", DATA_SOURCES)
  if "augment" in config:  # fine-tuning (the probe has no Mixup)
    try:
      mixup.check_groups(config.augment.get("mixup_groups", 1), config.global_batch_size)
    except ValueError as e:
      raise ConfigError(" ".join(str(e).split())) from None
  if config.pretrained and not os.path.exists(os.path.join(config.pretrained, workdir_lib.CONFIG_FILENAME)):
    raise ConfigError(f"config.pretrained={config.pretrained!r} is not a simmim-pretrain workdir (no "
                      f"{workdir_lib.CONFIG_FILENAME}); give a pretraining workdir or '' for random init")
  recipe = workdir_lib.recipe_of(workdir_lib.read_config(config.pretrained)) if config.pretrained else "pretrain"
  if recipe not in PRETRAINED_RECIPES:
    raise ConfigError(f"config.pretrained={config.pretrained!r} is a workdir of the recipe {recipe!r}, not a "
                      "simmim-pretrain (or simmim-convert) workdir; give a pretraining workdir or '' for random init")
  crop_padding = config.data.get("crop_padding", 4)
  if not isinstance(crop_padding, int) or crop_padding < 0:
    raise ConfigError(f"config.data.crop_padding={crop_padding!r}: use an integer >= 0 (official 4)")
  info = declared_data_info(config.data) if declared_data else data_info(config.data)
  with config.unlocked():
    config.model = ml_collections.ConfigDict(resolve_model_fields(config))
    if not config.num_classes:
      config.num_classes = info["num_classes"]
    if not config.num_train_images:
      config.num_train_images = info["num_train"]
  if config.num_classes < info["num_classes"]:
    raise ConfigError(f"config.num_classes={config.num_classes} < the data's {info['num_classes']} classes")
  validation.check_model(
      lambda: build_encoder(config.model.to_dict(), config.img_size, DTYPES[config.dtype]),
      f"config.model ({config.model.to_dict()}) at img_size={config.img_size}",
      lambda encoder: encoder.init(jax.random.key(0), models.init_inputs(encoder)[0]),
      before_tracing=lambda encoder: validation.check_traceable(
          config, encoder, memory=_memory_arguments(config, encoder, trains_encoder) if check_memory else None))
  if optim.steps_from_config(config)[0] <= 0:
    raise ConfigError(f"config.total_steps={config.total_steps} / num_epochs={config.num_epochs} give no steps")
  return config


def memory_problem(config: ml_collections.ConfigDict, trains_encoder: bool = True) -> str | None:
  """`validation.memory_problem` of a resolved config (the encoder and a head of its classes)."""
  encoder = build_encoder(config.model.to_dict(), config.img_size, DTYPES[config.dtype])
  return validation.memory_problem(config, encoder, **_memory_arguments(config, encoder, trains_encoder))


def _memory_arguments(config: ml_collections.ConfigDict, encoder, trains_encoder: bool) -> dict:
  """The memory estimate's keyword arguments: the head holds at least embed_dim x num_classes parameters."""
  return {"head_parameters": encoder.embed_dim * config.num_classes, "trains_encoder": trains_encoder}


def signature(config: ml_collections.ConfigDict) -> dict:
  return workdir_lib.signature(config, num_classes=int(config.num_classes))


def train_batches(config: ml_collections.ConfigDict, start_step: int, images_per_step: int, **augmentation):
  """The labelled training batches of a classification recipe from step `start_step + 1` on
  (`finetune_pipeline.create_train_iterator`; `augmentation`: its RandAugment / random-erasing arguments)."""
  from simmim_jax.data import finetune_pipeline  # pylint: disable=g-import-not-at-top  (TensorFlow)
  return finetune_pipeline.create_train_iterator(config.data, image_size=config.img_size,
                                                 global_batch_size=images_per_step, seed=config.seed,
                                                 start_step=start_step, **augmentation)
