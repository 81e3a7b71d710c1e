"""visualize.py: the reconstruction grid's panels and the header that labels its columns."""

import numpy as np
import pytest

from simmim_jax.storage import visualize
from simmim_jax.data import normalization


def sample(n=2, size=32, seed=0):
  """(images, mask, reconstruction): normalized images, a model-patch mask (4 px cells), a prediction."""
  rng = np.random.default_rng(seed)
  images = normalization.normalize(rng.integers(0, 256, (n, size, size, 3)).astype(np.uint8))
  mask = (rng.random((n, size // 4, size // 4)) < 0.6).astype(np.int32)
  return images, mask, 0.5 * images + 0.1


def columns(strip, width):
  return [strip[:, col * width:(col + 1) * width] for col in range(4)]


@pytest.mark.parametrize("scale", [1, 4, 8])  # --scale=1, the training grids of the 32 px demo, simmim-reconstruct
def test_the_grid_is_a_label_strip_above_the_unchanged_panels(scale):
  images, mask, reconstruction = sample()
  grid = visualize.reconstruction_grid(images, mask, reconstruction, scale=scale)
  panels = visualize.reconstruction_panels(images, mask, reconstruction)
  header, body = grid[:visualize.HEADER_HEIGHT], grid[visualize.HEADER_HEIGHT:]
  assert visualize.HEADER_HEIGHT <= 16  # a small strip, whatever the scale
  np.testing.assert_array_equal(body, panels.repeat(scale, axis=0).repeat(scale, axis=1))  # pixel for pixel
  size = 32 * scale  # the first panel is the input, in real colours, right below the strip
  original = (np.clip(normalization.denormalize(images[:1]), 0, 1)[0] * 255 + 0.5).astype(np.uint8)
  np.testing.assert_array_equal(body[:size, :size], original.repeat(scale, axis=0).repeat(scale, axis=1))
  width = grid.shape[1] // 4
  labels = columns(header, width)
  for col, label in enumerate(labels):
    ink = (label.min(axis=-1) < 128).sum()
    assert ink > 20, f"column {col} has no label"  # dark text on the white strip
  assert len({label.tobytes() for label in labels}) == 4  # four different labels


def test_labels_say_what_each_column_is_where_they_fit():
  """The longest label set is drawn when it fits the column (136 px at the demo's 32 px x 4), a short one at 34 px;
  the labels are the same pixels as text drawn by Pillow's bitmap font."""
  from PIL import Image, ImageDraw, ImageFont  # pylint: disable=g-import-not-at-top
  font = getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)()

  def drawn(text, width):
    cell = Image.new("RGB", (width, visualize.HEADER_HEIGHT), "white")
    ImageDraw.Draw(cell).text((max((width - font.getbbox(text)[2]) // 2, 1), 0), text, fill="black", font=font)
    return np.asarray(cell)

  for width, labels in ((136, ("original", "masked input", "prediction", "prediction + visible")),
                        (34, ("orig", "mask", "pred", "p+vis"))):
    header = visualize.column_header(width)
    assert header.shape == (visualize.HEADER_HEIGHT, 4 * width, 3)
    for col, (cell, text) in enumerate(zip(columns(header, width), labels)):
      np.testing.assert_array_equal(cell, drawn(text, width), err_msg=f"column {col}: {text}")
