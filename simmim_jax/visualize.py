"""Reconstruction grids: for each sample, original | masked input | prediction | prediction pasted into the
visible pixels, un-normalized to real colours (ImageNet mean / std). TF-free (numpy + pillow)."""

import os

import numpy as np
from PIL import Image

from simmim_jax.data import normalization

MASK_GRAY = 0.5  # colour of hidden pixels in the "masked" panel
GAP = 2          # pixels between panels


def _to_unit_range(normalized: np.ndarray) -> np.ndarray:
  """[n, H, W, C] normalized -> [n, H, W, 3] in [0, 1]."""
  if normalized.shape[-1] == 3:
    return np.clip(normalization.denormalize(normalized), 0.0, 1.0)
  # Other channel counts: show the first channel, min-max scaled per image, as grayscale.
  first = normalized[..., :1]
  low = first.min(axis=(1, 2, 3), keepdims=True)
  high = first.max(axis=(1, 2, 3), keepdims=True)
  return np.repeat((first - low) / np.maximum(high - low, 1e-6), 3, axis=-1)


def reconstruction_grid(images: np.ndarray, mask: np.ndarray, reconstruction: np.ndarray) -> np.ndarray:
  """uint8 [n * (H + GAP), 4 * (W + GAP), 3]: one row per sample.

  Args:
    images: [n, H, W, C] normalized inputs.
    mask: [n, h, w] int, 1 = masked, at any grid that divides H (e.g. the model-patch grid).
    reconstruction: [n, H, W, C] predictions in the same normalized space as `images`.
  """
  images, mask, reconstruction = (np.asarray(a, np.float32) for a in (images, mask, reconstruction))
  n, height, width, _ = images.shape
  factor = height // mask.shape[1]
  pixel_mask = mask.repeat(factor, axis=1).repeat(factor, axis=2)[..., None]  # [n, H, W, 1]
  original = _to_unit_range(images)
  prediction = _to_unit_range(reconstruction)
  masked = original * (1 - pixel_mask) + MASK_GRAY * pixel_mask
  pasted = original * (1 - pixel_mask) + prediction * pixel_mask
  grid = np.ones((n * (height + GAP), 4 * (width + GAP), 3), np.float32)
  for row in range(n):
    for col, panel in enumerate((original, masked, prediction, pasted)):
      top, left = row * (height + GAP), col * (width + GAP)
      grid[top:top + height, left:left + width] = panel[row]
  return (grid * 255.0 + 0.5).astype(np.uint8)


def save_png(grid: np.ndarray, path: str, scale: int = 1) -> None:
  """Writes `grid` as a PNG, upscaled `scale` times (nearest) so that small images stay visible."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  image = Image.fromarray(grid)
  if scale > 1:
    image = image.resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
  image.save(path)
