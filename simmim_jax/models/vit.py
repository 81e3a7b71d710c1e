"""Vision Transformer encoder: the official SimMIM (BEiT-style) ViT and a plain (HF-style) ViT.

One module covers both, chosen by fields:
  * SimMIM / BEiT style (official `models/vision_transformer.py`): no absolute position embedding, a
    relative position bias shared by all blocks (pretraining) or one per block (fine-tuning), layer scale
    (init 0.1), q and v biases with a zero k bias, LayerNorm eps 1e-6, exact GELU.
  * plain ViT (HF `ViTModel`): learned absolute position embedding (cls included), q/k/v biases, no layer
    scale, no relative position bias.

The encoder takes an optional mask `[B, H/p, W/p]` (1 = masked): the learnable `mask_token` then replaces
the masked patch embeddings *before* the cls token and any position information, as the official
`VisionTransformerForSimMIM`: x = x * (1 - w) + mask_token * w. The `mask_token` parameter exists only
when the module is initialized with a mask (SimMIM pretraining), as in the official subclass.

Output (the encoder contract shared with Swin): a dict with
  "feature_map": [B, H/p, W/p, D] patch tokens after the final norm (cls dropped); with
                 `use_mean_pooling` the final norm is the identity, as the official fine-tune model;
  "pooled":      [B, D] the normed cls token, or with `use_mean_pooling` `fc_norm(mean(patch tokens))`.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from simmim_jax.models import layers

Dtype = Any

# Initialization styles: "simmim" = the pretraining ViT's N(0, .02) truncated at ±1σ (microsoft/SimMIM
# models/simmim.py:66-67); "timm" = timm's trunc_normal(.02) with absolute bounds ±2 (the fine-tune ViT,
# models/vision_transformer.py:270-271; HF ViT).
INIT_STYLES = ("simmim", "timm")


def _weight_init(init_style: str, scale: float = 1.0) -> layers.Initializer:
  if init_style == "simmim":
    return layers.trunc_normal(std=0.02, lower=-0.02, upper=0.02, scale=scale)
  if init_style == "timm":
    return layers.trunc_normal(std=0.02, lower=-2.0, upper=2.0, scale=scale)
  raise ValueError(f"init_style={init_style!r} is not one of {INIT_STYLES}")


def relative_position_index_with_cls(height: int, width: int) -> np.ndarray:
  """BEiT relative position index with a cls token: int32 [N+1, N+1], N = height * width.

  Patch-to-patch entries follow `layers.relative_position_index`; the three extra table rows are
  cls-to-token (row 0), token-to-cls (column 0) and cls-to-cls ([0, 0]).
  """
  num_relative_distance = (2 * height - 1) * (2 * width - 1) + 3
  n = height * width
  index = np.zeros((n + 1, n + 1), np.int32)
  index[1:, 1:] = layers.relative_position_index(height, width)
  index[0, :] = num_relative_distance - 3
  index[:, 0] = num_relative_distance - 2
  index[0, 0] = num_relative_distance - 1
  return index


class RelativePositionBias(nn.Module):
  """A learned relative position bias table (zero-initialized, as BEiT) -> [heads, N+1, N+1]."""

  grid_size: tuple[int, int]
  num_heads: int
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self) -> jax.Array:
    height, width = self.grid_size
    num_relative_distance = (2 * height - 1) * (2 * width - 1) + 3
    table = self.param("relative_position_bias_table", nn.initializers.zeros,
                       (num_relative_distance, self.num_heads), self.param_dtype)
    return layers.gather_relative_bias(table, relative_position_index_with_cls(height, width))


class Attention(layers.FusedQkvAttention, kw_only=True):
  """Multi-head self-attention with a fused `qkv` projection (`layers.FusedQkvAttention`, its fields too).

  `qkv_bias_layout="qv"`: the official BEiT layout (no bias on `qkv`, separate `q_bias` / `v_bias`
  params, k bias fixed at zero); `"qkv"`: an ordinary bias on the fused projection (plain ViT).
  The fused output is ordered [q; k; v], each [head, head_dim], as the official `qkv.weight` rows.
  """

  qkv_bias_layout: str = "qv"
  grid_size: tuple[int, int] | None = None  # a per-block relative position bias table when set

  @nn.compact
  def __call__(self, x: jax.Array, shared_rel_pos_bias: jax.Array | None = None,
               deterministic: bool = True) -> jax.Array:
    q, k, v = self.project_qkv(x, self.qkv_bias_layout)  # each [B, N, heads, head_dim]
    bias = None
    if self.grid_size is not None:
      bias = RelativePositionBias(self.grid_size, self.num_heads, self.param_dtype,
                                  name="relative_position_bias")()
    if shared_rel_pos_bias is not None:
      bias = shared_rel_pos_bias if bias is None else bias + shared_rel_pos_bias
    if bias is not None:
      bias = bias[None].astype(q.dtype)  # [1, heads, N, N]
    return self.attend_and_project(q, k, v, bias, q.shape[-1] ** -0.5, deterministic)


class Block(nn.Module):
  """Pre-norm transformer block: x += dp(gamma_1 * attn(norm1(x))); x += dp(gamma_2 * mlp(norm2(x)))."""

  num_heads: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  qkv_bias_layout: str = "qv"
  layer_scale_init: float | None = 0.1
  grid_size: tuple[int, int] | None = None
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  layer_norm_eps: float = 1e-6
  kernel_init: layers.Initializer = layers.trunc_normal()
  residual_kernel_init: layers.Initializer | None = None  # attn.proj and mlp.fc2 (fix_init_weight)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  approximate_gelu: bool = False
  attention_impl: str = "einsum"

  @nn.compact
  def __call__(self, x: jax.Array, shared_rel_pos_bias: jax.Array | None = None,
               deterministic: bool = True) -> jax.Array:
    dim = x.shape[-1]
    norm = lambda name: nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype,
                                     param_dtype=self.param_dtype, name=name)
    drop_path = layers.DropPath(self.drop_path_rate)

    y = norm("norm1")(x)
    y = Attention(num_heads=self.num_heads, qkv_bias=self.qkv_bias, qkv_bias_layout=self.qkv_bias_layout,
                  grid_size=self.grid_size, attn_drop_rate=self.attn_drop_rate, proj_drop_rate=self.drop_rate,
                  kernel_init=self.kernel_init, proj_kernel_init=self.residual_kernel_init, dtype=self.dtype,
                  param_dtype=self.param_dtype, attention_impl=self.attention_impl,
                  name="attn")(y, shared_rel_pos_bias, deterministic)
    if self.layer_scale_init is not None:
      y = y * self.param("gamma_1", layers.constant(self.layer_scale_init), (dim,),
                         self.param_dtype).astype(y.dtype)
    x = x + drop_path(y, deterministic)

    y = norm("norm2")(x)
    # Dropout after fc2 only: the official SimMIM / BEiT ViT `Mlp` (and HF's ViT), unlike timm's.
    y = layers.Mlp(int(dim * self.mlp_ratio), self.drop_rate, self.kernel_init,
                   self.residual_kernel_init, self.dtype, self.param_dtype, self.approximate_gelu,
                   dropout_after_fc1=False, name="mlp")(y, deterministic)
    if self.layer_scale_init is not None:
      y = y * self.param("gamma_2", layers.constant(self.layer_scale_init), (dim,),
                         self.param_dtype).astype(y.dtype)
    return x + drop_path(y, deterministic)


class VisionTransformer(nn.Module):
  """ViT encoder (see the module docstring). Field names follow timm so overrides read the same."""

  img_size: int = 224
  patch_size: int = 16
  in_chans: int = 3
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  qkv_bias_layout: str = "qv"           # "qv" (BEiT / official SimMIM) or "qkv" (plain ViT)
  layer_scale_init: float | None = 0.1  # official VIT.INIT_VALUES; None disables layer scale
  use_abs_pos_emb: bool = False         # official USE_APE
  use_rel_pos_bias: bool = False        # per-block tables (official fine-tune USE_RPB)
  use_shared_rel_pos_bias: bool = True  # one table for all blocks (official pretrain USE_SHARED_RPB)
  use_mean_pooling: bool = False        # fine-tune: final norm = identity, fc_norm on mean of patches
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  layer_norm_eps: float = 1e-6
  init_style: str = "simmim"            # see INIT_STYLES
  remat: bool = False                   # rematerialize each block in the backward pass (nn.remat)
  # Run the blocks as one jax.lax.scan (layers.scan_blocks; MaxText's scan_layers): compile time independent
  # of depth. A runtime field like `remat`: the parameters keep the unrolled layout (blocks_0, blocks_1, ...)
  # and are stacked at run time, so checkpoints, converters and exporters see one layout and a run resumes
  # across the setting; the cost is one transient stacked copy of the block parameters per step.
  scan_blocks: bool = False
  approximate_gelu: bool = False        # opt-in tanh GELU (faster on XLA:CPU); official: exact erf GELU
  attention_impl: str = "einsum"        # "einsum" or "dot_product_attention" (layers.ATTENTION_IMPLS)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def output_stride(self) -> int:
    """Total downsampling of `feature_map` relative to the input (the SimMIM `encoder_stride`)."""
    return self.patch_size

  @property
  def num_features(self) -> int:
    return self.embed_dim

  def _validate(self) -> None:
    if self.img_size % self.patch_size:
      raise ValueError(f"img_size={self.img_size} is not divisible by patch_size={self.patch_size}")
    if self.embed_dim % self.num_heads:
      raise ValueError(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
    if self.qkv_bias_layout not in ("qv", "qkv"):
      raise ValueError(f"qkv_bias_layout={self.qkv_bias_layout!r} must be 'qv' or 'qkv'")
    if self.init_style not in INIT_STYLES:
      raise ValueError(f"init_style={self.init_style!r} is not one of {INIT_STYLES}")
    layers.check_attention_impl(self.attention_impl, type(self).__name__)

  @nn.compact
  def __call__(self, images: jax.Array, mask: jax.Array | None = None, *,
               train: bool = False) -> dict[str, jax.Array]:
    self._validate()
    layers.check_image_size(images, self.img_size, type(self).__name__)
    deterministic = not train
    grid = self.img_size // self.patch_size
    weight_init = _weight_init(self.init_style)

    # Patch embedding: conv kernel = stride = patch_size, NHWC. [B, grid, grid, D]
    x = nn.Conv(self.embed_dim, (self.patch_size, self.patch_size), strides=self.patch_size,
                padding="VALID", kernel_init=weight_init, dtype=self.dtype, param_dtype=self.param_dtype,
                name="patch_embed")(images.astype(self.dtype))
    batch = x.shape[0]
    x = x.reshape(batch, grid * grid, self.embed_dim)  # [B, N, D]

    if mask is not None:
      if mask.shape != (batch, grid, grid):
        raise ValueError(f"mask must have shape [B, img_size/patch_size, img_size/patch_size] = "
                         f"{(batch, grid, grid)}; got {tuple(mask.shape)}")
      mask_token = self.param("mask_token", weight_init, (1, 1, self.embed_dim), self.param_dtype)
      w = mask.reshape(batch, grid * grid, 1).astype(x.dtype)
      x = x * (1 - w) + mask_token.astype(x.dtype) * w

    cls_token = self.param("cls_token", weight_init, (1, 1, self.embed_dim), self.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls_token.astype(x.dtype), (batch, 1, self.embed_dim)), x], 1)
    if self.use_abs_pos_emb:
      pos_embed = self.param("pos_embed", weight_init, (1, grid * grid + 1, self.embed_dim),
                             self.param_dtype)
      x = x + pos_embed.astype(x.dtype)
    x = nn.Dropout(self.drop_rate)(x, deterministic=deterministic)

    shared_bias = None
    if self.use_shared_rel_pos_bias:
      shared_bias = RelativePositionBias((grid, grid), self.num_heads, self.param_dtype,
                                         name="rel_pos_bias")()

    block_fields = [dict(
        num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias,
        qkv_bias_layout=self.qkv_bias_layout, layer_scale_init=self.layer_scale_init,
        grid_size=(grid, grid) if self.use_rel_pos_bias else None, drop_rate=self.drop_rate,
        attn_drop_rate=self.attn_drop_rate, drop_path_rate=rate, layer_norm_eps=self.layer_norm_eps,
        # fix_init_weight: attn.proj and mlp.fc2 of block l (1-indexed) are divided by sqrt(2 l).
        kernel_init=weight_init, residual_kernel_init=_weight_init(self.init_style, 1.0 / math.sqrt(2.0 * (i + 1))),
        dtype=self.dtype, param_dtype=self.param_dtype, approximate_gelu=self.approximate_gelu,
        attention_impl=self.attention_impl)
        for i, rate in enumerate(layers.drop_path_rates(self.drop_path_rate, self.depth))]
    names = [f"blocks_{i}" for i in range(self.depth)]
    if self.scan_blocks and not self.is_initializing():  # init runs unrolled: the same parameters
      x = layers.scan_blocks(self, Block, block_fields, names, x, (shared_bias,), remat=self.remat,
                             deterministic=deterministic,
                             needs_rng=max(self.drop_rate, self.attn_drop_rate, self.drop_path_rate) > 0)
    else:
      block_cls = nn.remat(Block, static_argnums=(3,)) if self.remat else Block
      for fields, name in zip(block_fields, names):
        x = block_cls(**fields, name=name)(x, shared_bias, deterministic)

    norm = lambda name: nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype,
                                     param_dtype=self.param_dtype, name=name)
    if self.use_mean_pooling:
      patch_tokens = x[:, 1:]
      pooled = norm("fc_norm")(patch_tokens.mean(axis=1))
    else:
      x = norm("norm")(x)
      patch_tokens = x[:, 1:]
      pooled = x[:, 0]
    return {"feature_map": patch_tokens.reshape(batch, grid, grid, self.embed_dim), "pooled": pooled}


_SIZES = {  # name: (embed_dim, depth, num_heads), as timm / BEiT
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}
# The HF ViTModel / ViTForMaskedImageModeling layout (learned absolute positions, q/k/v biases, no layer
# scale, LayerNorm eps 1e-12 as `ViTConfig.layer_norm_eps`).
PLAIN = dict(qkv_bias_layout="qkv", layer_scale_init=None, use_abs_pos_emb=True, use_rel_pos_bias=False,
             use_shared_rel_pos_bias=False, layer_norm_eps=1e-12, init_style="timm")
_TEST_TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2)

# Registry entries: name -> (module class, default fields). The official SimMIM ViT is the default layout.
VARIANTS: dict[str, tuple[type, dict]] = {}
for _size, (_dim, _depth, _heads) in _SIZES.items():
  _patch = 14 if _size == "huge" else 16
  _fields = dict(patch_size=_patch, embed_dim=_dim, depth=_depth, num_heads=_heads)
  VARIANTS[f"vit_{_size}_patch{_patch}"] = (VisionTransformer, _fields)
  VARIANTS[f"vit_{_size}_patch{_patch}_plain"] = (VisionTransformer, {**_fields, **PLAIN})
VARIANTS["vit_test_tiny"] = (VisionTransformer, dict(_TEST_TINY))
VARIANTS["vit_test_tiny_plain"] = (VisionTransformer, {**_TEST_TINY, **PLAIN})
