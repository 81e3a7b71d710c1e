"""The SimMIM masked L1 loss and PixelShuffle order, against hand (numpy) computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simmim_jax import losses, masking, models
from simmim_jax.models import simmim


def torch_pixel_shuffle_nchw(x: np.ndarray, r: int) -> np.ndarray:
  """PyTorch PixelShuffle by its definition: out[b, c, h*r+i, w*r+j] = in[b, c*r*r + i*r + j, h, w]."""
  b, crr, h, w = x.shape
  c = crr // (r * r)
  out = np.zeros((b, c, h * r, w * r), x.dtype)
  for ch in range(c):
    for i in range(r):
      for j in range(r):
        out[:, ch, i::r, j::r] = x[:, ch * r * r + i * r + j]
  return out


@pytest.mark.parametrize("channels, r", [(3, 2), (1, 4), (5, 3)])
def test_pixel_shuffle_matches_pytorch_order(channels, r):
  x = np.random.default_rng(0).normal(size=(2, 3, 4, channels * r * r)).astype(np.float32)  # NHWC
  expected = torch_pixel_shuffle_nchw(x.transpose(0, 3, 1, 2), r).transpose(0, 2, 3, 1)
  np.testing.assert_array_equal(simmim.pixel_shuffle(jnp.asarray(x), r), expected)


def numpy_masked_l1(x, x_rec, mask_pixels):
  """The official formula, written with loops over the masked pixels."""
  total, count = 0.0, 0
  b, h, w, c = x.shape
  for n in range(b):
    for i in range(h):
      for j in range(w):
        if mask_pixels[n, i, j]:
          total += np.abs(x[n, i, j] - x_rec[n, i, j]).sum()
          count += 1
  return total / (count + 1e-5) / c


def test_masked_l1_equals_hand_computation():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
  x_rec = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
  mask = rng.integers(0, 2, size=(2, 4, 4)).astype(np.int32)  # model-patch grid, patch 2
  mask_pixels = mask.repeat(2, 1).repeat(2, 2)
  got = losses.masked_l1_loss(jnp.asarray(x), jnp.asarray(x_rec), jnp.asarray(mask))
  np.testing.assert_allclose(got, numpy_masked_l1(x, x_rec, mask_pixels), rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_simmim():
  encoder = models.create_encoder("vit_test_tiny")
  model = models.SimMIM(encoder=encoder, encoder_stride=encoder.output_stride)
  key = jax.random.key(0)
  images = jax.random.normal(key, (2, 32, 32, 3))
  mask = masking.random_mask(key, 2, input_size=32, mask_patch_size=8, model_patch_size=4, mask_ratio=0.6)
  variables = model.init(key, images, mask)
  return model, variables, images, mask


def test_model_loss_equals_hand_computation_from_its_reconstruction(tiny_simmim):
  model, variables, images, mask = tiny_simmim
  out = model.apply(variables, images, mask)
  mask_pixels = np.asarray(mask).repeat(4, 1).repeat(4, 2)
  expected = numpy_masked_l1(np.asarray(images), np.asarray(out["reconstruction"]), mask_pixels)
  np.testing.assert_allclose(out["loss"], expected, rtol=1e-5)


def test_loss_ignores_target_values_at_visible_pixels():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
  x_rec = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
  mask = rng.integers(0, 2, size=(2, 4, 4)).astype(np.int32)
  visible = np.asarray(masking.upsample_mask(jnp.asarray(mask), 2))[..., None] == 0
  x_changed = np.where(visible, x + 100.0, x)
  a = losses.masked_l1_loss(jnp.asarray(x), jnp.asarray(x_rec), jnp.asarray(mask))
  b = losses.masked_l1_loss(jnp.asarray(x_changed), jnp.asarray(x_rec), jnp.asarray(mask))
  np.testing.assert_allclose(a, b, rtol=1e-6)
  # ...while changing a masked pixel does change it.
  x_masked_changed = np.where(~visible, x + 1.0, x)
  c = losses.masked_l1_loss(jnp.asarray(x_masked_changed), jnp.asarray(x_rec), jnp.asarray(mask))
  assert abs(float(c) - float(a)) > 1e-3


def test_loss_through_the_model_ignores_visible_target_pixels(tiny_simmim):
  """Through the whole model the target's visible pixels still matter only via the encoder input:
  the loss depends on them only through the prediction, so a prediction-fixed comparison holds."""
  model, variables, images, mask = tiny_simmim
  out = model.apply(variables, images, mask)
  visible = np.asarray(masking.upsample_mask(mask, 4))[..., None] == 0
  target_changed = np.where(visible, np.asarray(images) * 3.0 + 1.0, np.asarray(images))
  np.testing.assert_allclose(
      losses.masked_l1_loss(jnp.asarray(target_changed), out["reconstruction"], mask), out["loss"], rtol=1e-6)


def test_local_target_normalization_matches_numpy():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(1, 9, 7, 2)).astype(np.float32)
  window = 5
  got = np.asarray(losses.local_normalize_targets(jnp.asarray(x), window))
  expected = np.zeros_like(x)
  for i in range(9):
    for j in range(7):
      patch = x[0, max(0, i - 2):i + 3, max(0, j - 2):j + 3]  # pixels inside the image only
      n = patch.shape[0] * patch.shape[1]
      mean = patch.mean((0, 1))
      var = np.maximum(((patch ** 2).mean((0, 1)) - mean ** 2) * n / (n - 1), 0)
      expected[0, i, j] = (x[0, i, j] - mean) / np.sqrt(var + 1e-6)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
