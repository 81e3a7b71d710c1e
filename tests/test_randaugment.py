"""data/randaugment.py: every op keeps the shape and range and is the identity at magnitude zero."""

import numpy as np


def test_randaugment_ops_keep_shape_and_range_and_are_identity_at_magnitude_zero():
  from simmim_jax.data import randaugment
  import tensorflow as tf
  image = tf.constant(np.random.default_rng(0).integers(0, 256, (20, 24, 3)), tf.float32)
  for sign in (1.0, -1.0):
    for index, op in enumerate(randaugment._ops(image, tf.constant(9.0), tf.constant(sign))):
      out = op().numpy()
      assert out.shape == (20, 24, 3) and out.min() >= 0 and out.max() <= 255, index
  zero_ops = randaugment._ops(image, tf.constant(0.0), tf.constant(1.0))
  for index in (3, 7, 8, 9, 10, 11, 12, 13, 14):  # rotate, enhance x4, shear x2, translate x2
    np.testing.assert_allclose(zero_ops[index]().numpy(), image.numpy(), atol=1.0, err_msg=str(index))
  augmented = randaugment.rand_augment(image, tf.constant([1, 2], tf.int64), "rand-m9-mstd0.5-inc1")
  assert augmented.shape == (20, 24, 3)


def _photo(size=224):
  """skimage's astronaut, centre-cropped and resized: a real photograph."""
  import os  # pylint: disable=g-import-not-at-top
  import pytest  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  skimage_data = pytest.importorskip("skimage.data")
  photo = Image.open(os.path.join(os.path.dirname(skimage_data.__file__), "astronaut.png")).convert("RGB")
  return photo.resize((size, size), Image.BICUBIC)


def test_autocontrast_rounds_where_pil_truncates_at_most_one_level_brighter():
  """README Fidelity notes: PIL's ImageOps.autocontrast truncates the rescaled values (int()); ours rounds."""
  from PIL import Image, ImageOps  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from simmim_jax.data import randaugment
  low_contrast = (np.asarray(_photo(), np.float32) * 0.5 + 40).astype(np.uint8)
  ours = randaugment._autocontrast(tf.constant(low_contrast, tf.float32)).numpy()  # pylint: disable=protected-access
  pil = np.asarray(ImageOps.autocontrast(Image.fromarray(low_contrast)), np.float32)
  assert set(np.unique(ours - pil)) == {0.0, 1.0}


def test_rotate_differs_from_pil_in_sampling_geometry_not_only_the_kernel():
  """README Fidelity notes: with PIL's bilinear kernel, Rotate 27 deg (magnitude 9) is ~3.2 grey levels off on
  average on this photo; rotating about PIL's pixel-centre point (half a pixel off ours) leaves ~0.5."""
  import math  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from simmim_jax.data import randaugment
  photo = _photo()
  image = tf.constant(np.asarray(photo, np.float32))
  pil = np.asarray(photo.rotate(27.0, resample=Image.BILINEAR, fillcolor=(124, 116, 104)), np.float32)
  ours = randaugment._rotate(image, tf.constant(27.0)).numpy()  # pylint: disable=protected-access
  angle, centre = -27.0 * math.pi / 180.0, 224 / 2 - 0.5  # PIL's centre in integer pixel coordinates
  cos, sin = math.cos(angle), math.sin(angle)
  matrix = [cos, sin, centre - cos * centre - sin * centre, -sin, cos, centre + sin * centre - cos * centre]
  at_pil_centres = randaugment._affine(image, matrix).numpy()  # pylint: disable=protected-access
  assert 2.5 < np.abs(ours - pil).mean() < 4.0
  assert np.abs(at_pil_centres - pil).mean() < 0.8
