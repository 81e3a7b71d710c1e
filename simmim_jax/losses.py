"""Losses. The SimMIM objective (official `models/simmim.py::SimMIM.forward`):

  loss = sum(|x - x_rec| * m) / (sum(m) + 1e-5) / in_chans

with `x` the normalized input image, `x_rec` the prediction and `m` the mask upsampled to pixels. Only
masked pixels count; `sum(m)` counts masked pixels once (not per channel), hence the division by `in_chans`.
"""

import jax
import jax.numpy as jnp

from simmim_jax import masking


def masked_l1_loss(target: jax.Array, reconstruction: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean absolute error over masked pixels.

  Args:
    target: [B, H, W, C] normalized images.
    reconstruction: [B, H, W, C] predictions.
    mask: [B, h, w] (1 = masked) at any grid that divides H (model-patch grid or pixels).
  Returns:
    A float32 scalar, computed in float32 whatever the input dtypes.
  """
  in_chans = target.shape[-1]
  factor = target.shape[1] // mask.shape[1]
  if mask.shape[1] * factor != target.shape[1] or mask.shape[2] * factor != target.shape[2]:
    raise ValueError(f"mask of shape {tuple(mask.shape)} does not tile images of shape {tuple(target.shape)}")
  pixel_mask = masking.upsample_mask(mask, factor).astype(jnp.float32)[..., None]  # [B, H, W, 1]
  abs_error = jnp.abs(target.astype(jnp.float32) - reconstruction.astype(jnp.float32))
  return (abs_error * pixel_mask).sum() / (pixel_mask.sum() + 1e-5) / in_chans


def local_target_statistics(images: jax.Array, window: int = 47) -> tuple[jax.Array, jax.Array]:
  """Mean and standard deviation of each pixel's `window x window` neighbourhood (per channel).

  As the SwinV2 SimMIM option `MODEL.SIMMIM.NORM_TARGET` (official `norm_targets`, window 47): stride-1
  average pooling with padding window // 2 that counts only pixels inside the image, the unbiased factor
  n / (n - 1) on the variance, clamped at 0; std = sqrt(var + 1e-6).

  Args:
    images: [B, H, W, C].
    window: odd neighbourhood size.
  """
  if window % 2 != 1:
    raise ValueError(f"the target-normalization window must be odd; got {window}")
  x = images.astype(jnp.float32)
  pad = window // 2
  box_sum = lambda a: jax.lax.reduce_window(
      a, 0.0, jax.lax.add, (1, window, window, 1), (1, 1, 1, 1),
      ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  count = box_sum(jnp.ones_like(x[..., :1]))  # valid pixels in each window, [B, H, W, 1]
  mean = box_sum(x) / count
  mean_square = box_sum(x * x) / count
  var = jnp.maximum((mean_square - mean ** 2) * (count / (count - 1)), 0.0)
  return mean, jnp.sqrt(var + 1e-6)


def local_normalize_targets(images: jax.Array, window: int = 47) -> jax.Array:
  """(x - local mean) / local std: the SwinV2 SimMIM regression target (see `local_target_statistics`)."""
  mean, std = local_target_statistics(images, window)
  return (images.astype(jnp.float32) - mean) / std
