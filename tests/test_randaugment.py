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
