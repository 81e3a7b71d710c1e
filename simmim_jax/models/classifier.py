"""Classification heads on any registered encoder: fine-tuning and linear probing.

* `Classifier` (official fine-tune models): encoder "pooled" features -> linear head. For the official ViT
  the encoder is built with `use_mean_pooling=True`, so "pooled" is `fc_norm(mean of patch tokens)`; Swin's
  "pooled" is the average of its normed final map (official `avgpool`). The head is timm's trunc_normal(.02)
  scaled by `head_init_scale` (official ViT `init_scale=0.001`; weight and bias, the bias being 0).
* `LinearProbe` (MAE `main_linprobe.py` protocol on SimMIM's features): the *frozen* encoder's tokens after
  a chosen ViT block (paper: ViT-B's 8th block, average-pooled patch tokens, cls excluded; official issue
  #14) or after a chosen Swin stage, then BatchNorm without affine (eps 1e-6) and a linear head
  (trunc_normal .01). Several blocks can be probed at once: one independent BatchNorm + head per block.

Parameters: `Classifier` -> {"encoder": ..., "head": ...}; `LinearProbe` heads -> {"probe_<k>": {"head"}}
with BatchNorm statistics in the "batch_stats" collection. The encoder's parameters are passed separately
to `LinearProbe` (they are never trained).
"""

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from simmim_jax.models import layers

Dtype = Any


class Classifier(nn.Module):
  """encoder(images)["pooled"] -> Dense(num_classes) logits (float32)."""

  encoder: nn.Module
  num_classes: int
  head_init_scale: float = 0.001
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    features = self.encoder(images, train=train)["pooled"]  # [B, D]
    logits = nn.Dense(self.num_classes, kernel_init=layers.trunc_normal(0.02, scale=self.head_init_scale),
                      bias_init=nn.initializers.zeros, dtype=self.dtype, param_dtype=self.param_dtype,
                      name="head")(features)
    return logits.astype(jnp.float32)


def block_features(encoder: nn.Module, encoder_params: Any, images: jax.Array,
                   blocks: Sequence[int]) -> dict[int, jax.Array]:
  """Average-pooled tokens after each 1-based block in `blocks`: {k: [B, D_k]} (frozen, no gradient).

  ViT: the output of `blocks_{k-1}` (before any final norm), mean over patch tokens (cls excluded).
  Swin / SwinV2: k is a 1-based *stage*; its "stages" map (last block, before PatchMerging), averaged.
  """
  if hasattr(encoder, "depths"):
    stages = encoder.apply({"params": encoder_params}, images)["stages"]
    return {k: jax.lax.stop_gradient(stages[k - 1].mean(axis=(1, 2))) for k in blocks}
  names = {f"blocks_{k - 1}": k for k in blocks}
  encoder = encoder.clone(scan_blocks=False)  # scanned blocks are not modules one can capture the output of
  _, state = encoder.apply({"params": encoder_params}, images, capture_intermediates=lambda module, method: (
      method == "__call__" and module.name in names), mutable=["intermediates"])
  captured = state["intermediates"]
  return {names[name]: jax.lax.stop_gradient(captured[name]["__call__"][0][:, 1:].mean(axis=1))
          for name in names}  # [B, 1 + N, D] -> mean over the N patch tokens


class ProbeHead(nn.Module):
  """BatchNorm1d(affine=False, eps=1e-6) + Linear (trunc_normal .01), as MAE's linear probe."""

  num_classes: int

  @nn.compact
  def __call__(self, features: jax.Array, *, train: bool = False) -> jax.Array:
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-6, use_bias=False,
                     use_scale=False, name="bn")(features.astype(jnp.float32))
    return nn.Dense(self.num_classes, kernel_init=layers.trunc_normal(0.01), name="head")(x)


class LinearProbe(nn.Module):
  """One `ProbeHead` per probed block, applied to `block_features` computed outside (frozen encoder)."""

  num_classes: int
  blocks: tuple[int, ...]

  @nn.compact
  def __call__(self, features: dict[int, jax.Array], *, train: bool = False) -> dict[int, jax.Array]:
    return {k: ProbeHead(self.num_classes, name=f"probe_{k}")(features[k], train=train) for k in self.blocks}
