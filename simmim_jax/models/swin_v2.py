"""Swin Transformer V2 encoder, as the official microsoft/Swin-Transformer `models/swin_transformer_v2.py`
+ `SwinTransformerV2ForSimMIM` (its `models/simmim.py`:79-114).

What changes from V1 (`swin.py`, whose patch embedding, mask-token blend, windows, shift mask, window
clipping, stages and output dict are reused unchanged):
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

from typing import Any

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


class WindowAttentionV2(nn.Module):
  """Scaled cosine window attention with a continuous position bias (official V2 `WindowAttention`)."""

  num_heads: int
  window_size: int
  pretrained_window_size: int = 0
  qkv_bias: bool = True
  attn_drop_rate: float = 0.0
  proj_drop_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = "einsum"  # see layers.ATTENTION_IMPLS

  @nn.compact
  def __call__(self, x: jax.Array, attn_mask: np.ndarray | None = None,
               deterministic: bool = True) -> jax.Array:
    windows, tokens, dim = x.shape  # [B * nW, w * w, C]
    qkv = layers.apply_to_rows(nn.Dense(3 * dim, use_bias=False, kernel_init=layers.trunc_normal(),
                                        dtype=self.dtype, param_dtype=self.param_dtype, name="qkv"), x)
    if self.qkv_bias:
      q_bias = self.param("q_bias", nn.initializers.zeros, (dim,), self.param_dtype)
      v_bias = self.param("v_bias", nn.initializers.zeros, (dim,), self.param_dtype)
      qkv = qkv + jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias]).astype(qkv.dtype)
    q, k, v = layers.split_qkv(qkv, self.num_heads)  # each [B_, N, heads, head_dim]

    # Cosine similarity times a per-head temperature, folded into q: (s q/|q|) . (k/|k|).
    logit_scale = self.param("logit_scale", layers.constant(float(np.log(10.0))), (self.num_heads, 1, 1),
                             self.param_dtype)
    scale = jnp.exp(jnp.minimum(logit_scale.astype(jnp.float32), LOGIT_SCALE_MAX))  # [heads, 1, 1]
    q = (_l2_normalize(q) * scale.reshape(1, 1, self.num_heads, 1)).astype(v.dtype)
    k = _l2_normalize(k).astype(v.dtype)

    coords = jnp.asarray(relative_coords_table(self.window_size, self.pretrained_window_size))
    table = ContinuousPositionBias(self.num_heads, param_dtype=self.param_dtype, name="cpb_mlp")(coords)
    index = layers.relative_position_index(self.window_size, self.window_size)  # [N, N]
    relative_bias = table[index.reshape(-1)].reshape(tokens, tokens, self.num_heads)
    relative_bias = 16.0 * jax.nn.sigmoid(jnp.transpose(relative_bias, (2, 0, 1)))  # [heads, N, N]
    bias = swin.windows_attention_bias(relative_bias.astype(v.dtype), attn_mask, windows)

    out = layers.attend(q, k, v, bias, scale=1.0, attention_impl=self.attention_impl,
                        attn_dropout=nn.Dropout(self.attn_drop_rate), deterministic=deterministic)
    out = layers.apply_to_rows(nn.Dense(dim, kernel_init=layers.trunc_normal(), dtype=self.dtype,
                                        param_dtype=self.param_dtype, name="proj"),
                               out.reshape(windows, tokens, dim))
    return nn.Dropout(self.proj_drop_rate)(out, deterministic=deterministic)


class SwinTransformerBlockV2(nn.Module):
  """Res-post-norm block: x += dp(norm1(SW-MSA(x))); x += dp(norm2(mlp(x))). Input/output [B, H, W, C]."""

  num_heads: int
  input_resolution: int
  window_size: int = 7
  shift_size: int = 0
  pretrained_window_size: int = 0
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = "einsum"

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    dim = x.shape[-1]
    window, shift = swin.effective_window(self.input_resolution, self.window_size, self.shift_size)
    drop_path = layers.DropPath(self.drop_path_rate)
    # _init_respostnorm: the post-norms start at weight 0 and bias 0.
    post_norm = lambda name: swin.layer_norm(name, self.dtype, self.param_dtype,
                                             scale_init=nn.initializers.zeros,
                                             bias_init=nn.initializers.zeros)
    attention = WindowAttentionV2(self.num_heads, window, self.pretrained_window_size, self.qkv_bias,
                                  self.attn_drop_rate, self.drop_rate, self.dtype, self.param_dtype,
                                  self.attention_impl, name="attn")

    y = swin.shifted_window_apply(x, window, shift, lambda w, m: attention(w, m, deterministic))
    x = x + drop_path(post_norm("norm1")(y), deterministic)
    y = layers.Mlp(int(dim * self.mlp_ratio), self.drop_rate, layers.trunc_normal(), dtype=self.dtype,
                   param_dtype=self.param_dtype, name="mlp")(x, deterministic)
    return x + drop_path(post_norm("norm2")(y), deterministic)


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


# name: (embed_dim, depths, num_heads), as the official SwinV2 configs.
_SIZES = {
    "tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "small": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "base": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "large": (192, (2, 2, 18, 2), (6, 12, 24, 48)),
    "huge": (352, (2, 2, 18, 2), (11, 22, 44, 88)),
    "giant": (512, (2, 2, 42, 4), (16, 32, 64, 128)),
}
_IMG_SIZE_FOR_WINDOW = {8: 256, 12: 192, 16: 256}  # SwinV2 256/w8, 256/w16; SimMIM pretrain 192/w12
_TEST_TINY = dict(img_size=32, patch_size=4, embed_dim=16, depths=(2, 2, 2), num_heads=(1, 2, 4),
                  window_size=4)  # as swin_test_tiny: shifted, unshifted and clipped stages

VARIANTS: dict[str, tuple[type, dict]] = {}
for _size, (_dim, _depths, _heads) in _SIZES.items():
  for _window, _img in _IMG_SIZE_FOR_WINDOW.items():
    VARIANTS[f"swinv2_{_size}_patch4_window{_window}"] = (SwinTransformerV2, dict(
        img_size=_img, patch_size=4, embed_dim=_dim, depths=_depths, num_heads=_heads, window_size=_window))
VARIANTS["swinv2_test_tiny"] = (SwinTransformerV2, dict(_TEST_TINY))
