"""Swin Transformer (V1) encoder, as the official `models/swin_transformer.py` + `SwinTransformerForSimMIM`.

Forward pass (official order: microsoft/SimMIM `models/simmim.py`:28-50, `SwinTransformerForSimMIM.forward`):
  1. `patch_embed`: Conv(k = stride = patch_size, NHWC) then LayerNorm when `patch_norm`;
  2. with a mask `[B, H/p, W/p]` (1 = masked) the learnable `mask_token` is blended in *after* that norm:
     x = x * (1 - w) + mask_token * w (the `mask_token` parameter exists only when a mask is passed, as in
     the official SimMIM subclass);
  3. the absolute position embedding when `ape` (False in every official config), then dropout;
  4. stages `layers_{l}`: `depths[l]` blocks of (shifted) window attention at width embed_dim * 2**l, then
     PatchMerging (all stages but the last);
  5. the final LayerNorm `norm`.

Window attention details (microsoft/SimMIM `models/swin_transformer.py`:164-290, 375): even blocks use regular
windows, odd blocks windows shifted by window_size // 2
(a cyclic roll by -shift before the partition and +shift after, with an additive -100.0 mask between
tokens of different regions); a stage whose resolution is <= window_size uses one unshifted window of the
whole map (official: window_size = min(resolution), shift_size = 0). Every block has its own
`relative_position_bias_table` [(2w-1)**2, heads]. LayerNorm eps is PyTorch's 1e-5 everywhere.

Parameter names mirror the official state dict (`layers.{l}.blocks.{j}.attn.qkv.weight` ->
`layers_{l}/blocks_{j}/attn/qkv/kernel`), so a checkpoint converter is a mechanical rename + transpose.

Output (the encoder contract, see `models/__init__.py`): a dict with
  "feature_map": [B, H/output_stride, W/output_stride, num_features] tokens after the final norm (what the
                 SimMIM head reads; output_stride = patch_size * 2**(num_stages-1) = 32 for the official
                 4-stage models);
  "pooled":      [B, num_features] the average of those normed tokens (official `avgpool`);
  "stages":      one NHWC map per stage, the output of its last block before PatchMerging
                 ([B, H/(4*2**l), W/(4*2**l), embed_dim*2**l]), for detection / segmentation heads.
"""

from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from simmim_jax.models import layers

Dtype = Any

LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, the official norm_layer


def window_partition(x: jax.Array, window_size: int) -> jax.Array:
  """[B, H, W, C] -> [B * nW, w, w, C]; windows ordered (batch, window row, window column).

  Works on numpy and JAX arrays alike (the attention mask is built with it in numpy).
  """
  batch, height, width, channels = x.shape
  x = x.reshape(batch, height // window_size, window_size, width // window_size, window_size, channels)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, channels)


def window_reverse(windows: jax.Array, window_size: int, height: int, width: int) -> jax.Array:
  """Inverse of `window_partition`: [B * nW, w, w, C] -> [B, H, W, C]."""
  channels = windows.shape[-1]
  x = windows.reshape(-1, height // window_size, width // window_size, window_size, window_size, channels)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, height, width, channels)


def effective_window(resolution: int, window_size: int, shift_size: int) -> tuple[int, int]:
  """(window, shift) a block really uses: one unshifted window when resolution <= window_size (official)."""
  if resolution <= window_size:
    return resolution, 0
  return window_size, shift_size


def shifted_window_attention_mask(height: int, width: int, window_size: int,
                                  shift_size: int) -> np.ndarray | None:
  """The official SW-MSA mask: float32 [nW, w*w, w*w], -100.0 between tokens of different regions.

  The rolled map is split into 3 x 3 regions by the slices (0:-w, -w:-s, -s:) along each axis; tokens of a
  window may attend to each other only if they come from the same region (0.0), else -100.0. None when the
  block is not shifted (the official `attn_mask` buffer is None then).
  """
  if shift_size == 0:
    return None
  img_mask = np.zeros((1, height, width, 1), np.float32)
  slices = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
  region = 0
  for h in slices:
    for w in slices:
      img_mask[:, h, w, :] = region
      region += 1
  mask_windows = window_partition(img_mask, window_size).reshape(-1, window_size * window_size)
  difference = mask_windows[:, None, :] - mask_windows[:, :, None]  # [nW, N, N]
  return np.where(difference != 0, -100.0, 0.0).astype(np.float32)


def windows_attention_bias(relative_bias: jax.Array, attn_mask: np.ndarray | None,
                           num_windows_total: int) -> jax.Array:
  """Relative bias [heads, N, N] (+ shift mask [nW, N, N]) -> a bias for `jax.nn.dot_product_attention`.

  Windows are ordered (batch, window), so the mask repeats every nW windows, as the official
  `attn.view(B_ // nW, nW, heads, N, N) + mask.unsqueeze(1).unsqueeze(0)`.
  Returns [1, heads, N, N] without a mask, else [B * nW, heads, N, N].
  """
  if attn_mask is None:
    return relative_bias[None]
  num_windows = attn_mask.shape[0]
  bias = relative_bias[None, None] + jnp.asarray(attn_mask, relative_bias.dtype)[None, :, None]
  bias = jnp.broadcast_to(bias, (num_windows_total // num_windows,) + bias.shape[1:])
  return bias.reshape((num_windows_total,) + relative_bias.shape)


def merge_patches(x: jax.Array) -> jax.Array:
  """PatchMerging's 2x2 gather: [B, H, W, C] -> [B, H/2, W/2, 4C] in the official order.

  x0 = x[0::2, 0::2], x1 = x[1::2, 0::2], x2 = x[0::2, 1::2], x3 = x[1::2, 1::2] (the row offset changes
  first), concatenated on channels; converted `reduction` weights depend on this order.
  """
  return jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)


def shifted_window_apply(x: jax.Array, window_size: int, shift_size: int, attention) -> jax.Array:
  """Runs `attention(windows [B*nW, w*w, C], attn_mask)` over (shifted) windows of x [B, H, W, C]."""
  _, height, width, channels = x.shape
  if shift_size:
    x = jnp.roll(x, (-shift_size, -shift_size), axis=(1, 2))
  windows = window_partition(x, window_size).reshape(-1, window_size * window_size, channels)
  attn_mask = shifted_window_attention_mask(height, width, window_size, shift_size)
  windows = attention(windows, attn_mask)
  x = window_reverse(windows.reshape(-1, window_size, window_size, channels), window_size, height, width)
  if shift_size:
    x = jnp.roll(x, (shift_size, shift_size), axis=(1, 2))
  return x


def layer_norm(name: str, dtype: Dtype, param_dtype: Dtype, **kwargs) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=dtype, param_dtype=param_dtype, name=name, **kwargs)


class WindowAttention(layers.FusedQkvAttention, kw_only=True):
  """W-MSA / SW-MSA with a learned relative position bias (official `WindowAttention`); the fields of
  `layers.FusedQkvAttention` plus `window_size`.

  `qkv` is one Dense(3C, bias) whose output is ordered [q; k; v], each [head, head_dim], as the official
  `qkv.weight` rows; logits are q k^T * head_dim**-0.5 + table[relative_position_index] (+ shift mask).
  SwinV2's `WindowAttentionV2` overrides `qkv_bias_layout`, `scaled_queries_keys` and `relative_position_bias`.
  """

  window_size: int
  qkv_bias_layout: ClassVar[str] = "qkv"  # layers.FusedQkvAttention.project_qkv

  def scaled_queries_keys(self, q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array, float]:
    """(q, k, the logits' scale): dot-product attention, scale head_dim**-0.5."""
    return q, k, q.shape[-1] ** -0.5

  def relative_position_bias(self) -> jax.Array:
    """[heads, N, N], N = window_size**2: the learned `relative_position_bias_table` [(2w-1)**2, heads]."""
    table = self.param("relative_position_bias_table", layers.trunc_normal(),
                       ((2 * self.window_size - 1) ** 2, self.num_heads), self.param_dtype)
    return layers.gather_relative_bias(table, layers.relative_position_index(self.window_size, self.window_size))

  @nn.compact
  def __call__(self, x: jax.Array, attn_mask: np.ndarray | None = None,
               deterministic: bool = True) -> jax.Array:
    q, k, v = self.project_qkv(x, self.qkv_bias_layout)  # x [B * nW, w * w, C]; each [B * nW, N, heads, head_dim]
    q, k, scale = self.scaled_queries_keys(q, k)
    bias = windows_attention_bias(self.relative_position_bias().astype(q.dtype), attn_mask, x.shape[0])
    return self.attend_and_project(q, k, v, bias, scale, deterministic)


class SwinTransformerBlock(nn.Module):
  """Pre-norm Swin block: x += dp(SW-MSA(norm1(x))); x += dp(mlp(norm2(x))). Input/output [B, H, W, C].

  `window_size` / `shift_size` are the configured values; the block clips them as the official code
  (`effective_window`). SwinV2's block overrides `attention_class`, `attention_fields` and `residual_branch`.
  """

  num_heads: int
  input_resolution: int
  window_size: int = 7
  shift_size: int = 0
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = "einsum"

  def attention_class(self) -> type[WindowAttention]:
    return WindowAttention

  def attention_fields(self) -> dict[str, Any]:
    """Fields of this family's attention beyond the common ones (none for V1)."""
    return {}

  def residual_branch(self, norm_name: str, branch: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    """What a residual adds before drop path: pre-norm, branch(norm(x))."""
    return branch(layer_norm(norm_name, self.dtype, self.param_dtype)(x))

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    window, shift = effective_window(self.input_resolution, self.window_size, self.shift_size)
    drop_path = layers.DropPath(self.drop_path_rate)
    attention = self.attention_class()(
        num_heads=self.num_heads, window_size=window, qkv_bias=self.qkv_bias, attn_drop_rate=self.attn_drop_rate,
        proj_drop_rate=self.drop_rate, dtype=self.dtype, param_dtype=self.param_dtype,
        attention_impl=self.attention_impl, name="attn", **self.attention_fields())
    mlp = layers.Mlp(int(x.shape[-1] * self.mlp_ratio), self.drop_rate, layers.trunc_normal(), dtype=self.dtype,
                     param_dtype=self.param_dtype, name="mlp")  # timm Mlp: drops after fc1 too

    windowed = lambda y: shifted_window_apply(y, window, shift, lambda w, m: attention(w, m, deterministic))
    x = x + drop_path(self.residual_branch("norm1", windowed, x), deterministic)
    return x + drop_path(self.residual_branch("norm2", lambda y: mlp(y, deterministic), x), deterministic)


class PatchMerging(nn.Module):
  """[B, H, W, C] -> [B, H/2, W/2, 2C]: `merge_patches`, then `norm` LayerNorm(4C), then `reduction`
  Dense(2C, no bias) (official V1 order)."""

  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    x = layer_norm("norm", self.dtype, self.param_dtype)(merge_patches(x))
    return layers.apply_to_rows(nn.Dense(2 * dim, use_bias=False, kernel_init=layers.trunc_normal(),
                                         dtype=self.dtype, param_dtype=self.param_dtype, name="reduction"), x)


class PatchEmbed(nn.Module):
  """`proj` Conv(embed_dim, k = stride = patch_size) on NHWC images, then `norm` when `patch_norm`.

  The conv keeps PyTorch's default init (Swin's `_init_weights` only touches Linear and LayerNorm).
  """

  patch_size: int
  embed_dim: int
  patch_norm: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    fan_in = images.shape[-1] * self.patch_size ** 2
    x = nn.Conv(self.embed_dim, (self.patch_size, self.patch_size), strides=self.patch_size,
                padding="VALID", kernel_init=layers.torch_default_uniform((0, 1, 2)),
                bias_init=layers.torch_default_bias(fan_in), dtype=self.dtype,
                param_dtype=self.param_dtype, name="proj")(images.astype(self.dtype))
    if self.patch_norm:
      x = layer_norm("norm", self.dtype, self.param_dtype)(x)
    return x  # [B, H/p, W/p, embed_dim]


class BasicLayer(nn.Module):
  """One stage (official `BasicLayer`): `blocks_{j}` alternating shift 0 / window_size // 2, then the
  optional `downsample`. Returns (stage output [B, H, W, C], input of the next stage)."""

  depth: int
  num_heads: int
  input_resolution: int
  window_size: int
  drop_path_rates: tuple[float, ...]
  downsample: bool
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  remat: bool = False
  scan_blocks: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = "einsum"

  def block_class(self) -> type[nn.Module]:
    return SwinTransformerBlock

  def merging_class(self) -> type[nn.Module]:
    return PatchMerging

  def block_fields(self) -> dict[str, Any]:
    """Fields of this family's block beyond the common ones (none for V1)."""
    return {}

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
    block_fields = [dict(
        num_heads=self.num_heads, input_resolution=self.input_resolution, window_size=self.window_size,
        shift_size=0 if j % 2 == 0 else self.window_size // 2, mlp_ratio=self.mlp_ratio,
        qkv_bias=self.qkv_bias, drop_rate=self.drop_rate, attn_drop_rate=self.attn_drop_rate,
        drop_path_rate=self.drop_path_rates[j], dtype=self.dtype, param_dtype=self.param_dtype,
        attention_impl=self.attention_impl, **self.block_fields()) for j in range(self.depth)]
    names = [f"blocks_{j}" for j in range(self.depth)]
    if self.scan_blocks and not self.is_initializing():  # init runs unrolled: the same parameters
      # Scanned in pairs (unshifted, shifted windows): the shift changes the computation, not just values.
      needs_rng = max(self.drop_rate, self.attn_drop_rate, *self.drop_path_rates, 0.0) > 0
      x = layers.scan_blocks(self, self.block_class(), block_fields, names, x, group_size=2, remat=self.remat,
                             deterministic=deterministic, needs_rng=needs_rng)
    else:
      block_cls = self.block_class()
      if self.remat:  # static_argnums counts `self`: (x, deterministic) -> deterministic is 2.
        block_cls = nn.remat(block_cls, static_argnums=(2,))
      for fields, name in zip(block_fields, names):
        x = block_cls(**fields, name=name)(x, deterministic)
    if not self.downsample:
      return x, x
    return x, self.merging_class()(dtype=self.dtype, param_dtype=self.param_dtype, name="downsample")(x)


class SwinTransformer(nn.Module):
  """Swin V1 encoder (see the module docstring). Field names follow timm / the official constructor."""

  img_size: int = 224
  patch_size: int = 4
  in_chans: int = 3
  embed_dim: int = 96
  depths: tuple[int, ...] = (2, 2, 6, 2)
  num_heads: tuple[int, ...] = (3, 6, 12, 24)
  window_size: int = 7
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  ape: bool = False         # official APE (False in every config)
  patch_norm: bool = True   # official PATCH_NORM
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  remat: bool = False       # rematerialize each block in the backward pass (official use_checkpoint)
  # Run each stage's blocks as one jax.lax.scan over (unshifted, shifted) pairs (layers.scan_blocks; MaxText's
  # scan_layers): compile time independent of depth. A runtime field like `remat`: the parameters keep the
  # unrolled layout (layers_{l}/blocks_{j}) and are stacked at run time, so checkpoints, converters and
  # exporters see one layout and a run resumes across the setting; the cost is one transient stacked copy of
  # the block parameters per step.
  scan_blocks: bool = False
  attention_impl: str = "einsum"  # "einsum" or "dot_product_attention" (layers.ATTENTION_IMPLS)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def num_stages(self) -> int:
    return len(self.depths)

  @property
  def output_stride(self) -> int:
    """Total downsampling of `feature_map` relative to the input (the SimMIM `encoder_stride`)."""
    return self.patch_size * 2 ** (self.num_stages - 1)

  @property
  def num_features(self) -> int:
    return self.embed_dim * 2 ** (self.num_stages - 1)

  def stage_class(self) -> type[BasicLayer]:
    return BasicLayer

  def stage_fields(self, stage: int) -> dict[str, Any]:
    """Fields of this family's stage beyond the common ones (none for V1)."""
    del stage
    return {}

  def _validate(self) -> None:
    name = type(self).__name__
    layers.check_attention_impl(self.attention_impl, name)
    if len(self.depths) != len(self.num_heads) or not self.depths:
      raise ValueError(f"{name}: depths={tuple(self.depths)} and num_heads={tuple(self.num_heads)} must "
                       f"be non-empty and of the same length (one entry per stage)")
    if self.img_size % self.patch_size:
      raise ValueError(f"{name}: img_size={self.img_size} is not divisible by patch_size={self.patch_size}")
    grid = self.img_size // self.patch_size
    if grid % 2 ** (self.num_stages - 1):
      raise ValueError(
          f"{name}: img_size/patch_size = {grid} must be divisible by 2**(num_stages-1) = "
          f"{2 ** (self.num_stages - 1)} for the {self.num_stages - 1} PatchMerging steps; "
          f"choose img_size as a multiple of {self.output_stride}")
    for stage in range(self.num_stages):
      dim, heads = self.embed_dim * 2 ** stage, self.num_heads[stage]
      if dim % heads:
        raise ValueError(f"{name}: stage {stage} width embed_dim*2**{stage} = {dim} is not divisible by "
                         f"num_heads[{stage}] = {heads}")
      resolution = grid // 2 ** stage
      if resolution > self.window_size and resolution % self.window_size:
        raise ValueError(
            f"{name}: stage {stage} resolution {resolution}x{resolution} (img_size={self.img_size}, "
            f"patch_size={self.patch_size}) is not divisible by window_size={self.window_size}; choose "
            f"img_size / window_size as in the official configs (192/6, 224/7, 192/12, 224/14)")

  @nn.compact
  def __call__(self, images: jax.Array, mask: jax.Array | None = None, *,
               train: bool = False) -> dict[str, Any]:
    self._validate()
    layers.check_image_size(images, self.img_size, type(self).__name__)
    deterministic = not train
    grid = self.img_size // self.patch_size

    x = PatchEmbed(self.patch_size, self.embed_dim, self.patch_norm, self.dtype, self.param_dtype,
                   name="patch_embed")(images)  # [B, grid, grid, C]
    batch = x.shape[0]
    if mask is not None:  # SimMIM: blend the mask token in after the patch-embed norm.
      if mask.shape != (batch, grid, grid):
        raise ValueError(f"mask must have shape [B, img_size/patch_size, img_size/patch_size] = "
                         f"{(batch, grid, grid)}; got {tuple(mask.shape)}")
      mask_token = self.param("mask_token", layers.trunc_normal(), (1, 1, self.embed_dim), self.param_dtype)
      w = mask[..., None].astype(x.dtype)  # [B, grid, grid, 1]
      x = x * (1 - w) + mask_token.reshape(1, 1, 1, self.embed_dim).astype(x.dtype) * w
    if self.ape:
      pos_embed = self.param("absolute_pos_embed", layers.trunc_normal(), (1, grid * grid, self.embed_dim),
                             self.param_dtype)
      x = x + pos_embed.reshape(1, grid, grid, self.embed_dim).astype(x.dtype)
    x = nn.Dropout(self.drop_rate)(x, deterministic=deterministic)

    rates = layers.drop_path_rates(self.drop_path_rate, sum(self.depths))
    stages = []
    for stage, depth in enumerate(self.depths):
      first = sum(self.depths[:stage])
      stage_out, x = self.stage_class()(
          depth=depth, num_heads=self.num_heads[stage], input_resolution=grid // 2 ** stage,
          window_size=self.window_size, drop_path_rates=tuple(rates[first:first + depth]),
          downsample=stage < self.num_stages - 1, mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias,
          drop_rate=self.drop_rate, attn_drop_rate=self.attn_drop_rate, remat=self.remat,
          scan_blocks=self.scan_blocks,
          dtype=self.dtype, param_dtype=self.param_dtype, attention_impl=self.attention_impl,
          name=f"layers_{stage}", **self.stage_fields(stage))(x, deterministic)
      stages.append(stage_out)

    x = layer_norm("norm", self.dtype, self.param_dtype)(x)  # [B, H/stride, W/stride, num_features]
    return {"feature_map": x, "pooled": x.mean(axis=(1, 2)), "stages": stages}


# name: (embed_dim, depths, num_heads), as the official configs / timm.
SIZES = {
    "tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "small": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "base": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "large": (192, (2, 2, 18, 2), (6, 12, 24, 48)),
}
_IMG_SIZE_FOR_WINDOW = {6: 192, 7: 224, 12: 192, 14: 224}  # SimMIM pretrain 192/w6, 192/w12; fine-tune 224
# 32 px, three stages: stage 0 (8x8, window 4) has shifted windows, stage 1 (4x4) is one unshifted
# window of the configured size, stage 2 (2x2) one window clipped to 2x2.
TEST_TINY = dict(img_size=32, patch_size=4, embed_dim=16, depths=(2, 2, 2), num_heads=(1, 2, 4), window_size=4)


def variants(family: str, encoder_cls: type, sizes: dict[str, tuple[int, tuple[int, ...], tuple[int, ...]]],
             img_size_for_window: dict[int, int]) -> dict[str, tuple[type, dict]]:
  """Registry entries {name: (encoder_cls, fields)}: `{family}_{size}_patch4_window{w}` for every size and
  window (img_size by window), then `{family}_test_tiny` (`TEST_TINY`)."""
  entries = {f"{family}_{size}_patch4_window{window}": (encoder_cls, dict(
      img_size=img_size, patch_size=4, embed_dim=dim, depths=depths, num_heads=heads, window_size=window))
      for size, (dim, depths, heads) in sizes.items() for window, img_size in img_size_for_window.items()}
  entries[f"{family}_test_tiny"] = (encoder_cls, dict(TEST_TINY))
  return entries


VARIANTS = variants("swin", SwinTransformer, SIZES, _IMG_SIZE_FOR_WINDOW)
