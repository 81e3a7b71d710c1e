"""The SimMIM model (Xie et al. 2022, §3): encoder with mask token + one-layer linear prediction head.

The encoder replaces masked patch embeddings with its learnable mask token and sees every token. The head
is a 1x1 convolution (a Dense over channels) to `encoder_stride**2 * in_chans` values per output position
followed by depth-to-space in PyTorch `PixelShuffle` channel order, predicting all pixels at the input
resolution; the L1 loss counts masked pixels only (`losses.masked_l1_loss`).

Parameters live under `encoder/...` and `decoder/...`, mirroring the official `encoder.` / `decoder.0.` keys.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from simmim_jax import losses, masking
from simmim_jax.models import layers

Dtype = Any


def pixel_shuffle(x: jax.Array, upscale: int) -> jax.Array:
  """Depth-to-space with PyTorch `PixelShuffle` channel order, NHWC.

  [B, h, w, C * r * r] -> [B, h * r, w * r, C], where input channel c * r * r + i * r + j goes to output
  pixel (h * r + i, w * r + j) of channel c. (TF's `depth_to_space` uses the order (i, j, c) instead, which
  would scramble weights converted from the official checkpoints.)
  """
  batch, height, width, channels = x.shape
  out_chans = channels // (upscale * upscale)
  if out_chans * upscale * upscale != channels:
    raise ValueError(f"{channels} channels cannot be shuffled by an upscale factor of {upscale}")
  x = x.reshape(batch, height, width, out_chans, upscale, upscale)  # [B, h, w, C, i, j]
  x = x.transpose(0, 1, 4, 2, 5, 3)                                 # [B, h, i, w, j, C]
  return x.reshape(batch, height * upscale, width * upscale, out_chans)


class SimMIM(nn.Module):
  """SimMIM = encoder (which takes the mask) + linear head + pixel shuffle + masked L1 loss.

  Attributes:
    encoder: a registry encoder; called as `encoder(images, mask, train=...)` and returning a dict with
      "feature_map" [B, H / encoder_stride, W / encoder_stride, D].
    encoder_stride: total downsampling of the feature map (official: 16 for ViT-B/16, 32 for Swin).
    in_chans: image channels (3 for RGB; any other number works: grayscale, multispectral).
    norm_target_window: if set, regress locally normalized targets (SwinV2 `NORM_TARGET`, window 47).
    dtype / param_dtype: compute / storage dtype of the head (the loss is always float32).
  """

  encoder: nn.Module
  encoder_stride: int
  in_chans: int = 3
  norm_target_window: int | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, mask: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """images: [B, H, W, in_chans] normalized; mask: [B, H/p, W/p] int (1 = masked), p = model patch.

    Returns a dict: "loss" (float32 scalar), "reconstruction" ([B, H, W, in_chans] float32, the
    prediction for every pixel), "target" (what the loss regresses: the images, or their local
    normalization when `norm_target_window` is set).
    """
    if images.ndim != 4 or images.shape[-1] != self.in_chans:
      raise ValueError(f"SimMIM expects NHWC images with in_chans={self.in_chans} channels; got shape "
                       f"{tuple(images.shape)}")
    encoder_chans = getattr(self.encoder, "in_chans", self.in_chans)
    if encoder_chans != self.in_chans:
      raise ValueError(f"SimMIM in_chans={self.in_chans} but the encoder has in_chans={encoder_chans}")
    features = self.encoder(images, mask, train=train)["feature_map"]  # [B, h, w, D]
    batch, height, width, dim = features.shape
    if height * self.encoder_stride != images.shape[1] or width * self.encoder_stride != images.shape[2]:
      raise ValueError(f"encoder_stride={self.encoder_stride} does not match the encoder's output "
                       f"{height}x{width} for {images.shape[1]}x{images.shape[2]} images")
    # decoder.0 keeps PyTorch's default Conv2d init (the encoder's _init_weights never touches it).
    prediction = layers.apply_to_rows(nn.Dense(self.encoder_stride ** 2 * self.in_chans,
                                               kernel_init=layers.torch_default_uniform((0,)),
                                               bias_init=layers.torch_default_bias(dim), dtype=self.dtype,
                                               param_dtype=self.param_dtype, name="decoder"), features)
    reconstruction = pixel_shuffle(prediction.astype(jnp.float32), self.encoder_stride)
    target = images.astype(jnp.float32)
    if self.norm_target_window is not None:
      target = losses.local_normalize_targets(target, self.norm_target_window)
    loss = losses.masked_l1_loss(target, reconstruction, mask)
    return {"loss": loss, "reconstruction": reconstruction, "target": target}


def reconstruct_masked(model: SimMIM, params: Any, images: jax.Array, key: jax.Array, *, mask_patch_size: int,
                       mask_ratio: float) -> tuple[jax.Array, jax.Array]:
  """(mask, reconstruction) of normalized `images` under a random SimMIM mask drawn from `key`; the
  reconstruction is in the images' own normalized space (a `norm_target_window` head predicts locally
  normalized pixels, mapped back here), ready for `visualize.reconstruction_grid`."""
  mask = masking.random_mask(key, images.shape[0], input_size=images.shape[1], mask_patch_size=mask_patch_size,
                             model_patch_size=model.encoder.patch_size, mask_ratio=mask_ratio)
  prediction = model.apply({"params": params}, images, mask)["reconstruction"]
  if model.norm_target_window:
    mean, std = losses.local_target_statistics(images, model.norm_target_window)
    prediction = prediction * std + mean
  return mask, prediction
