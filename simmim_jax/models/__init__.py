"""simmim_jax models: encoders (ViT, Swin, SwinV2), the SimMIM wrapper and the encoder registry.

Encoder contract (what `SimMIM` and downstream heads rely on): a Linen module called as
`encoder(images, mask=None, *, train=False)` with NHWC `images` and an optional int mask at the
model-patch grid (1 = masked; the encoder's `mask_token` replaces those patch embeddings), returning a
dict with at least "feature_map" ([B, H / output_stride, W / output_stride, num_features]) and "pooled"
([B, num_features]). Encoders expose `output_stride`, `num_features`, `patch_size` and `in_chans`.
"""

import dataclasses
import numbers
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from simmim_jax.models import swin, swin_v2, vit
from simmim_jax.models.classifier import Classifier
from simmim_jax.models.simmim import SimMIM, pixel_shuffle, reconstruct_masked
from simmim_jax.models.swin import SwinTransformer
from simmim_jax.models.swin_v2 import SwinTransformerV2
from simmim_jax.models.vit import VisionTransformer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # compute dtypes by config name
# Encoder fields that are sizes or counts (must be > 0, each element of a tuple too) and rates in [0, 1).
_SIZE_FIELDS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "depths", "num_heads", "mlp_ratio",
                "window_size", "pretrained_window_sizes")

# Encoder fields that change how a step computes, not what the parameters are: a checkpoint resumes across them.
RUNTIME_FIELDS = ("remat", "scan_blocks", "attention_impl")

# Each family module exposes VARIANTS: {name: (module class, default fields)}.
_FAMILIES = (vit, swin, swin_v2)


def _variants() -> dict[str, tuple[type, dict]]:
  merged = {}
  for family in _FAMILIES:
    merged.update(family.VARIANTS)
  return merged


def list_encoders() -> list[str]:
  """The registered encoder names (timm-style)."""
  return sorted(_variants())


def create_encoder(name: str, /, **overrides) -> nn.Module:
  """Builds a registered encoder; `overrides` are the module's field names, as timm's kwargs.

  Example: `create_encoder("vit_base_patch16", img_size=32, patch_size=4, embed_dim=32, depth=2,
  num_heads=2)` is a tiny ViT. `name=` (keyword) is the Flax submodule name when built inside a parent.
  """
  variants = _variants()
  if name not in variants:
    raise ValueError(f"Unknown encoder {name!r}. Known encoders: {', '.join(sorted(variants))}")
  module_cls, defaults = variants[name]
  field_names = {f.name for f in dataclasses.fields(module_cls) if f.init and f.name != "parent"}
  unknown = sorted(set(overrides) - field_names)
  if unknown:
    raise ValueError(f"Unknown field(s) {unknown} for encoder {name!r} ({module_cls.__name__}). "
                     f"Valid fields: {', '.join(sorted(field_names))}")
  fields = {**defaults, **overrides}
  _check_field_values(name, fields)
  return module_cls(**fields)


def _check_field_values(name: str, fields: dict) -> None:
  """ValueError naming the field when a size is not positive or a rate is outside [0, 1)."""
  for field, value in fields.items():
    problem = field_value_problem(field, value)
    if problem:
      raise ValueError(f"{field}={value!r} of encoder {name!r}: {problem}")


# Module fields a config's `model` block cannot set: the Flax plumbing, the compute / storage dtypes (config.dtype)
# and the input size (config.img_size).
_NOT_CONFIGURABLE = ("parent", "name", "img_size", "dtype", "param_dtype")


def configurable_fields(name: str) -> dict:
  """{field: value} of every field a config's `model` block may set for the registered encoder `name`, at
  the variant's values (ValueError for an unknown name). A field whose default is None (SwinV2's
  pretrained_window_sizes: None = 0 per stage) reads as () here, since ml-collections cannot override None."""
  variants = _variants()
  if name not in variants:
    raise ValueError(f"Unknown encoder {name!r}. Known encoders: {', '.join(sorted(variants))}")
  module_cls, defaults = variants[name]
  fields = {f.name: f.default for f in dataclasses.fields(module_cls)
            if f.init and f.name not in _NOT_CONFIGURABLE and f.default is not dataclasses.MISSING}
  fields.update({k: v for k, v in defaults.items() if k not in _NOT_CONFIGURABLE})
  return {k: () if v is None else v for k, v in fields.items()}


def encoder_fields(encoder: nn.Module) -> dict:
  """{field: value} of a built encoder's configurable fields (what `configurable_fields` lists): the model as
  it will run."""
  return {f.name: getattr(encoder, f.name) for f in dataclasses.fields(encoder)
          if f.init and f.name not in _NOT_CONFIGURABLE}


def canonical_signature(signature: dict | None) -> dict | None:
  """A checkpoint signature with its "model" block completed by the encoder's defaults (tuples as lists, as
  JSON stores them), so that a field set to its default and a field left out compare equal, and old
  signatures (which hold only the config's fields) match new ones of the same model."""
  if not isinstance(signature, dict) or not isinstance(signature.get("model"), dict):
    return signature
  model = dict(signature["model"])
  try:
    defaults = configurable_fields(model.get("name"))
  except ValueError:
    return signature
  complete = {**defaults, **model}
  complete = {k: [] if v is None else list(v) if isinstance(v, (tuple, list)) else v
              for k, v in complete.items() if k not in RUNTIME_FIELDS}
  return {**signature, "model": complete}


def same_signature(saved: dict | None, expected: dict | None) -> bool:
  """Whether a checkpoint saved with signature `saved` holds the parameters of `expected`'s model: equal once
  both are completed by the encoder's defaults and stripped of RUNTIME_FIELDS (`canonical_signature`)."""
  return canonical_signature(saved) == canonical_signature(expected)


def field_value_problem(field: str, value: Any) -> str | None:
  """What is wrong with an encoder field's value (a size or count <= 0, a rate outside [0, 1)), or None."""
  values = value if isinstance(value, (tuple, list)) else (value,)
  numeric = [v for v in values if isinstance(v, numbers.Number) and not isinstance(v, bool)]
  if field == "pretrained_window_sizes":
    return "window sizes must be >= 0 (0 = none)" if any(v < 0 for v in numeric) else None
  if field in _SIZE_FIELDS and any(v <= 0 for v in numeric):
    return "sizes and counts must be > 0"
  if field.endswith("_rate") and any(not 0.0 <= v < 1.0 for v in numeric):
    return "a rate must lie in [0, 1)"
  return None


def parameter_fields(model_config: Any) -> dict:
  """A config's `model` block without RUNTIME_FIELDS: what a checkpoint's parameters depend on."""
  return {k: v for k, v in dict(model_config).items() if k not in RUNTIME_FIELDS}


def field_overrides(model_config: Any) -> dict:
  """A config's `model` block without its `name`: encoder field overrides, lists made tuples (config.json and
  ml-collections overrides give lists)."""
  return {k: tuple(v) if isinstance(v, list) else v for k, v in dict(model_config).items() if k != "name"}


def encoder_from_config(model_config: Any, img_size: int, dtype: str = "float32") -> nn.Module:
  """The encoder a config's `model` block describes: `name` plus field overrides, at `img_size`, computing
  in `dtype` (a key of DTYPES)."""
  return create_encoder(dict(model_config)["name"], img_size=img_size, dtype=DTYPES[dtype],
                        **field_overrides(model_config))


def simmim_from_config(config: Any) -> SimMIM:
  """The SimMIM module a pretraining config describes (encoder from the registry, head stride = encoder
  stride, `norm_target_window` 0 = raw normalized pixels)."""
  encoder = encoder_from_config(config.model, config.img_size, config.dtype)
  return SimMIM(encoder=encoder, encoder_stride=encoder.output_stride, in_chans=encoder.in_chans,
                norm_target_window=config.norm_target_window or None, dtype=DTYPES[config.dtype])


def classifier_from_config(config: Any) -> Classifier:
  """The Classifier a *resolved* fine-tuning config describes (its `model` block names the encoder and every
  field, as a `simmim-finetune` workdir's config.json does): the encoder at `img_size`, a head of
  `num_classes` scaled by `head_init_scale`, computing in `dtype`."""
  return Classifier(encoder=encoder_from_config(config.model, config.img_size, config.dtype),
                    num_classes=config.num_classes, head_init_scale=config.head_init_scale, dtype=DTYPES[config.dtype])


def init_inputs(encoder: nn.Module) -> tuple[jax.Array, jax.Array]:
  """Zero images [1, H, W, C] and an all-zero mask [1, H/p, W/p] (so `init` creates the mask token)."""
  grid = encoder.img_size // encoder.patch_size
  return (jnp.zeros((1, encoder.img_size, encoder.img_size, encoder.in_chans), jnp.float32),
          jnp.zeros((1, grid, grid), jnp.int32))


__all__ = ["DTYPES", "SimMIM", "SwinTransformer", "SwinTransformerV2", "VisionTransformer", "create_encoder",
           "encoder_from_config", "init_inputs", "configurable_fields", "canonical_signature",
           "encoder_fields", "field_overrides", "list_encoders", "parameter_fields", "pixel_shuffle",
           "simmim_from_config", "Classifier", "classifier_from_config", "same_signature"]
