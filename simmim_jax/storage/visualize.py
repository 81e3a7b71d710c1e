"""Reconstruction grids: for each sample, original | masked input | prediction | prediction pasted into the
visible pixels, un-normalized to real colours (ImageNet mean / std), under a header strip that labels the
columns. TF-free (numpy + pillow)."""

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from simmim_jax.storage import safe_files
from simmim_jax.data import normalization

MASK_GRAY = 0.5  # colour of hidden pixels in the "masked" panel
GAP = 2          # pixels between panels
HEADER_HEIGHT = 12  # pixels of the label strip above the panels (Pillow's bitmap font: 11 px lines)
# Column labels, longest first: the first set whose every label fits the column is drawn (6 px per character).
COLUMN_LABELS = (("original", "masked input", "prediction", "prediction + visible"),
                 ("original", "masked", "prediction", "pred. + visible"),
                 ("orig", "mask", "pred", "p+vis"))


def _to_unit_range(normalized: np.ndarray) -> np.ndarray:
  """[n, H, W, C] normalized -> [n, H, W, 3] in [0, 1]."""
  if normalized.shape[-1] == 3:
    return np.clip(normalization.denormalize(normalized), 0.0, 1.0)
  # Other channel counts: show the first channel, min-max scaled per image, as grayscale.
  first = normalized[..., :1]
  low = first.min(axis=(1, 2, 3), keepdims=True)
  high = first.max(axis=(1, 2, 3), keepdims=True)
  return np.repeat((first - low) / np.maximum(high - low, 1e-6), 3, axis=-1)


def reconstruction_grid(images: np.ndarray, mask: np.ndarray, reconstruction: np.ndarray, *,
                        scale: int = 1) -> np.ndarray:
  """uint8 [HEADER_HEIGHT + scale * n * (H + GAP), scale * 4 * (W + GAP), 3]: the column labels, then the
  panels (`reconstruction_panels`) upscaled `scale` times (nearest), so that small images stay visible and the
  labels stay one small strip of text. Arguments: see `reconstruction_panels`."""
  panels = reconstruction_panels(images, mask, reconstruction)
  if scale > 1:
    panels = panels.repeat(scale, axis=0).repeat(scale, axis=1)
  column_width = panels.shape[1] // 4
  return np.concatenate([column_header(column_width), panels], axis=0)


def column_header(column_width: int) -> np.ndarray:
  """uint8 [HEADER_HEIGHT, 4 * column_width, 3]: black labels on white, each centred on its column (clipped to
  it when even the shortest labels are wider)."""
  font = getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)()  # Pillow's bitmap font
  width = lambda text: font.getbbox(text)[2]
  labels = next((labels for labels in COLUMN_LABELS if max(map(width, labels)) <= column_width - 2),
                COLUMN_LABELS[-1])
  header = Image.new("RGB", (4 * column_width, HEADER_HEIGHT), "white")
  for col, label in enumerate(labels):
    cell = Image.new("RGB", (column_width, HEADER_HEIGHT), "white")
    ImageDraw.Draw(cell).text((max((column_width - width(label)) // 2, 1), 0), label, fill="black", font=font)
    header.paste(cell, (col * column_width, 0))
  return np.asarray(header)


def reconstruction_panels(images: np.ndarray, mask: np.ndarray, reconstruction: np.ndarray) -> np.ndarray:
  """uint8 [n * (H + GAP), 4 * (W + GAP), 3]: one row per sample, without labels.

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


def save_png(grid: np.ndarray, path: str, scale: int = 1, *, inside: str | None = None) -> None:
  """Writes `grid` as a PNG, upscaled `scale` times (nearest) so that small images stay visible.

  Written atomically and never through a symbolic link (safe_files); `inside`: the workdir the PNG lies in,
  whose folders below it are never links either."""
  image = Image.fromarray(grid)
  if scale > 1:
    image = image.resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
  with safe_files.atomic_file(path, inside=inside) as f:
    image.save(f, format="PNG")
