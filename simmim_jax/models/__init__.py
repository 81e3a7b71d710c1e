"""simmim_jax models: encoders (ViT, Swin, SwinV2), the SimMIM wrapper and the encoder registry.

Encoder contract (what `SimMIM` and downstream heads rely on): a Linen module called as
`encoder(images, mask=None, *, train=False)` with NHWC `images` and an optional int mask at the
model-patch grid (1 = masked; the encoder's `mask_token` replaces those patch embeddings), returning a
dict with at least "feature_map" ([B, H / output_stride, W / output_stride, num_features]) and "pooled"
([B, num_features]). Encoders expose `output_stride`, `num_features`, `patch_size` and `in_chans`.
"""

import dataclasses

from flax import linen as nn

from simmim_jax.models import swin, swin_v2, vit
from simmim_jax.models.simmim import SimMIM, pixel_shuffle
from simmim_jax.models.swin import SwinTransformer
from simmim_jax.models.swin_v2 import SwinTransformerV2
from simmim_jax.models.vit import VisionTransformer

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
  return module_cls(**{**defaults, **overrides})


__all__ = ["SimMIM", "SwinTransformer", "SwinTransformerV2", "VisionTransformer", "create_encoder",
           "list_encoders", "pixel_shuffle"]
