"""Swin Transformer V2 encoder, as the official microsoft/Swin-Transformer `models/swin_transformer_v2.py`
+ `SwinTransformerV2ForSimMIM` (its `models/simmim.py`:79-114).

What changes from V1 (`swin.py`, whose patch embedding, mask-token blend, windows, shift mask, window
clipping, attention projections, block wiring, stages and output dict are reused unchanged: V2's attention,
block, stage and encoder subclass V1's and override only what differs):
  * scaled cosine attention: normalize(q) normalize(k)^T * exp(min(logit_scale, log 100)), with a learned
    `logit_scale` [heads, 1, 1] initialized to log 10; `qkv` has no bias, separate `q_bias` / `v_bias`
    parameters and a zero k bias;
  * a continuous position bias: `cpb_mlp` (Dense(2 -> 512) -> ReLU -> Dense(512 -> heads, no bias)) over a
    log-spaced table of relative offsets, bias = 16 * sigmoid(cpb_mlp(table)[relative_position_index]);
  * residual post-norm: x = x + dp(norm1(attn(x))); x = x + dp(norm2(mlp(x))), with norm1 / norm2 weight
    *and* bias initialized to 0 (official `BasicLayer._init_respostnorm`), so every block starts as the
    identity;
  * PatchMerging V2: `reduction` Dense(4C -> 2C, no bias) first, then `norm` LayerNorm(2C);
  * `pretrained_window_sizes` (one per stage; 0 = the stage's own window) sets the normalization of the
    coordinate table, for fine-tuning at a larger window than in pretraining.

Initialization (official `_init_weights` then `_init_respostnorm`): every Linear (qkv, proj, mlp, cpb_mlp,
reduction) timm trunc_normal(.02) with zero bias; LayerNorm 1 / 0 except the blocks' norm1 / norm2 (0 / 0);
`q_bias` / `v_bias` 0; `logit_scale` log 10; the patch-embed conv PyTorch's default.

The `cpb_mlp` sub-layers are named `layers_0` / `layers_2`, the indices of the official `nn.Sequential`
(`cpb_mlp.0.weight`, `cpb_mlp.2.weight`). Released checkpoints name it `rpe_mlp`; the official loader
renames it to `cpb_mlp`.
"""

from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from simmim_jax.models import layers, swin

Dtype = Any

CPB_HIDDEN_DIM = 512               # official cpb_mlp width
LOGIT_SCALE_MAX = float(np.log(100.0))  # official clamp(max=log(1 / 0.01))


def relative_coords_table(window_size: int, pretrained_window_size: int = 0) -> np.ndarray:
  """The log-spaced coordinate table fed to `cpb_mlp`: float32 [(2w-1)**2, 2], rows ordered as
  `layers.relative_position_index` ((dy + w - 1) * (2w - 1) + (dx + w - 1)).

  Offsets in [-(w-1), w-1] are divided by (pretrained_window_size - 1) if it is > 0 else by (w - 1),
  times 8, then mapped to sign(x) * log2(|x| + 1) / log2(8) (official float32 arithmetic). A 1x1 window
  (w = 1) has only the offset 0, where the official 0 / 0 would give NaN; it maps to 0 here.
  """
  offsets = np.arange(-(window_size - 1), window_size, dtype=np.float32)
  table = np.stack(np.meshgrid(offsets, offsets, indexing="ij"), axis=-1)  # [2w-1, 2w-1, 2] as (dy, dx)
  divisor = (pretrained_window_size if pretrained_window_size > 0 else window_size) - 1
  table = table / np.float32(max(divisor, 1)) * np.float32(8)  # normalize to [-8, 8]
  table = np.sign(table) * np.log2(np.abs(table) + np.float32(1.0)) / np.float32(np.log2(8))
  return table.reshape(-1, 2).astype(np.float32)


class ContinuousPositionBias(nn.Module):
  """`cpb_mlp`: Dense(512, bias) -> ReLU -> Dense(heads, no bias), over the coordinate table.

  Computed in float32 whatever the encoder's `dtype`: it depends only on parameters (like a bias table) and
  its output goes through 16 * sigmoid, which a bfloat16 computation would visibly quantize.
  """

  num_heads: int
  hidden_dim: int = CPB_HIDDEN_DIM
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, coords: jax.Array) -> jax.Array:
    x = nn.Dense(self.hidden_dim, kernel_init=layers.trunc_normal(), dtype=jnp.float32,
                 param_dtype=self.param_dtype, name="layers_0")(coords)
    x = nn.relu(x)
    return nn.Dense(self.num_heads, use_bias=False, kernel_init=layers.trunc_normal(), dtype=jnp.float32,
                    param_dtype=self.param_dtype, name="layers_2")(x)


def _l2_normalize(x: jax.Array) -> jax.Array:
  """F.normalize(x, dim=-1): x / max(||x||, 1e-12), in float32."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class WindowAttentionV2(swin.WindowAttention, kw_only=True):
  """Scaled cosine window attention with a continuous position bias (official V2 `WindowAttention`): V1's
  window attention with its own query / key scaling, position bias and `q_bias` / `v_bias` layout."""

  pretrained_window_size: int = 0
  qkv_bias_layout: ClassVar[str] = "qv"

  def scaled_queries_keys(self, q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array, float]:
    """Cosine similarity times a per-head temperature, folded into q: (s q/|q|) . (k/|k|), scale 1."""
    logit_scale = self.param("logit_scale", layers.constant(float(np.log(10.0))), (self.num_heads, 1, 1),
                             self.param_dtype)
    scale = jnp.exp(jnp.minimum(logit_scale.astype(jnp.float32), LOGIT_SCALE_MAX))  # [heads, 1, 1]
    q = (_l2_normalize(q) * scale.reshape(1, 1, self.num_heads, 1)).astype(q.dtype)
    return q, _l2_normalize(k).astype(k.dtype), 1.0

  def relative_position_bias(self) -> jax.Array:
    """[heads, N, N] = 16 * sigmoid(cpb_mlp(coordinate table)[relative_position_index]), in float32."""
    coords = jnp.asarray(relative_coords_table(self.window_size, self.pretrained_window_size))
    table = ContinuousPositionBias(self.num_heads, param_dtype=self.param_dtype, name="cpb_mlp")(coords)
    index = layers.relative_position_index(self.window_size, self.window_size)  # [N, N]
    return 16.0 * jax.nn.sigmoid(layers.gather_relative_bias(table, index))


class SwinTransformerBlockV2(swin.SwinTransformerBlock):
  """Res-post-norm block: x += dp(norm1(SW-MSA(x))); x += dp(norm2(mlp(x))). Input/output [B, H, W, C].

  V1's block and fields plus `pretrained_window_size`, with V2 attention and the norms after the branches.
  """

  pretrained_window_size: int = 0

  def attention_class(self) -> type[swin.WindowAttention]:
    return WindowAttentionV2

  def attention_fields(self) -> dict[str, Any]:
    return {"pretrained_window_size": self.pretrained_window_size}

  def residual_branch(self, norm_name: str, branch: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    """Res-post-norm, norm(branch(x)); the norms start at weight 0 and bias 0 (official `_init_respostnorm`)."""
    norm = swin.layer_norm(norm_name, self.dtype, self.param_dtype, scale_init=nn.initializers.zeros,
                           bias_init=nn.initializers.zeros)
    return norm(branch(x))


class PatchMergingV2(nn.Module):
  """[B, H, W, C] -> [B, H/2, W/2, 2C]: `swin.merge_patches`, `reduction` Dense(2C, no bias), then `norm`
  LayerNorm(2C) (official V2 order)."""

  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    x = layers.apply_to_rows(nn.Dense(2 * dim, use_bias=False, kernel_init=layers.trunc_normal(),
                                      dtype=self.dtype, param_dtype=self.param_dtype, name="reduction"),
                             swin.merge_patches(x))
    return swin.layer_norm("norm", self.dtype, self.param_dtype)(x)


class BasicLayerV2(swin.BasicLayer):
  """One V2 stage: V2 blocks (with the stage's pretrained window size) and PatchMerging V2."""

  pretrained_window_size: int = 0

  def block_class(self) -> type[nn.Module]:
    return SwinTransformerBlockV2

  def merging_class(self) -> type[nn.Module]:
    return PatchMergingV2

  def block_fields(self) -> dict[str, Any]:
    return {"pretrained_window_size": self.pretrained_window_size}


class SwinTransformerV2(swin.SwinTransformer):
  """SwinV2 encoder: the V1 encoder's fields plus `pretrained_window_sizes` (None or () = 0 for every stage,
  the official default [0, 0, 0, 0]; the SwinV2-B fine-tune config uses [12, 12, 12, 6])."""

  pretrained_window_sizes: tuple[int, ...] | None = None

  def stage_class(self) -> type[swin.BasicLayer]:
    return BasicLayerV2

  def stage_fields(self, stage: int) -> dict[str, Any]:
    sizes = self.pretrained_window_sizes
    return {"pretrained_window_size": sizes[stage] if sizes else 0}

  def _validate(self) -> None:
    super()._validate()
    sizes = self.pretrained_window_sizes
    if sizes and len(sizes) != self.num_stages:  # None or () = 0 for every stage
      raise ValueError(f"SwinTransformerV2: pretrained_window_sizes={tuple(sizes)} needs one entry per "
                       f"stage ({self.num_stages} stages, depths={tuple(self.depths)})")


# name: (embed_dim, depths, num_heads), as the official SwinV2 configs: V1's sizes, then two larger ones.
_SIZES = {
    **swin.SIZES,
    "huge": (352, (2, 2, 18, 2), (11, 22, 44, 88)),
    "giant": (512, (2, 2, 42, 4), (16, 32, 64, 128)),
}
_IMG_SIZE_FOR_WINDOW = {8: 256, 12: 192, 16: 256}  # SwinV2 256/w8, 256/w16; SimMIM pretrain 192/w12

VARIANTS = swin.variants("swinv2", SwinTransformerV2, _SIZES, _IMG_SIZE_FOR_WINDOW)  # swinv2_test_tiny as V1's
