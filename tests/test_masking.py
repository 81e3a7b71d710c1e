"""Block masking: exact counts, block structure, determinism, errors (official MaskGenerator semantics)."""

import jax
import numpy as np
import pytest

from simmim_jax import masking


@pytest.mark.parametrize(
    "input_size, mask_patch_size, model_patch_size, ratio, cells, masked",
    [
        (224, 32, 16, 0.6, 49, 30),  # ViT-B/16 at 224: 30 of 49 cells
        (192, 32, 4, 0.6, 36, 22),   # Swin at 192: 22 of 36 cells
        (32, 8, 4, 0.6, 16, 10),     # ceil(9.6)
        (64, 16, 8, 0.75, 16, 12),
        (96, 32, 32, 0.5, 9, 5),     # ceil(4.5), one model patch per cell
    ])
def test_exact_masked_cell_count(input_size, mask_patch_size, model_patch_size, ratio, cells, masked):
  mask = masking.random_mask(jax.random.key(0), 16, input_size=input_size, mask_patch_size=mask_patch_size,
                             model_patch_size=model_patch_size, mask_ratio=ratio)
  grid = input_size // model_patch_size
  scale = mask_patch_size // model_patch_size
  assert mask.shape == (16, grid, grid) and mask.dtype == np.int32
  mask = np.asarray(mask)
  assert set(np.unique(mask)) <= {0, 1}
  # Every image masks exactly `masked` cells, i.e. masked * scale**2 model patches.
  np.testing.assert_array_equal(mask.reshape(16, -1).sum(1), masked * scale * scale)
  assert (input_size // mask_patch_size) ** 2 == cells


def test_mask_is_constant_within_each_cell():
  mask = np.asarray(masking.random_mask(jax.random.key(1), 8, input_size=192, mask_patch_size=32,
                                        model_patch_size=4, mask_ratio=0.6))  # [8, 48, 48], cells of 8x8
  blocks = mask.reshape(8, 6, 8, 6, 8)
  assert (blocks.min(axis=(2, 4)) == blocks.max(axis=(2, 4))).all()
  cells = blocks[:, :, 0, :, 0]
  np.testing.assert_array_equal(cells.reshape(8, -1).sum(1), 22)


def test_same_key_same_mask_and_different_keys_differ():
  kwargs = dict(input_size=224, mask_patch_size=32, model_patch_size=16, mask_ratio=0.6)
  a = masking.random_mask(jax.random.key(7), 4, **kwargs)
  b = masking.random_mask(jax.random.key(7), 4, **kwargs)
  c = masking.random_mask(jax.random.key(8), 4, **kwargs)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_images_in_a_batch_get_different_masks():
  mask = np.asarray(masking.random_mask(jax.random.key(3), 32, input_size=224, mask_patch_size=32,
                                        model_patch_size=16, mask_ratio=0.6))
  distinct = {m.tobytes() for m in mask}
  assert len(distinct) == 32
  # Every cell is masked for some image and visible for another: no fixed pattern.
  frequency = mask.mean(0)
  assert frequency.min() > 0 and frequency.max() < 1


def test_every_cell_is_equally_likely():
  mask = np.asarray(masking.random_mask(jax.random.key(4), 4000, input_size=128, mask_patch_size=32,
                                        model_patch_size=32, mask_ratio=0.5))  # 16 cells, 8 masked
  frequency = mask.reshape(4000, -1).mean(0)
  np.testing.assert_allclose(frequency, 0.5, atol=0.04)


def test_jittable_with_static_sizes():
  draw = jax.jit(lambda key: masking.random_mask(key, 2, input_size=224, mask_patch_size=32,
                                                 model_patch_size=16, mask_ratio=0.6))
  np.testing.assert_array_equal(draw(jax.random.key(5)),
                                masking.random_mask(jax.random.key(5), 2, input_size=224, mask_patch_size=32,
                                                    model_patch_size=16, mask_ratio=0.6))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(input_size=200, mask_patch_size=32, model_patch_size=16, mask_ratio=0.6), "input_size=200"),
        (dict(input_size=224, mask_patch_size=32, model_patch_size=12, mask_ratio=0.6), "model_patch_size=12"),
        (dict(input_size=224, mask_patch_size=32, model_patch_size=16, mask_ratio=1.0), "mask_ratio=1.0"),
        (dict(input_size=224, mask_patch_size=32, model_patch_size=16, mask_ratio=0.0), "mask_ratio=0.0"),
        (dict(input_size=224, mask_patch_size=32, model_patch_size=16, mask_ratio=-0.2), "mask_ratio=-0.2"),
        (dict(input_size=224, mask_patch_size=0, model_patch_size=16, mask_ratio=0.6), "mask_patch_size"),
    ])
def test_bad_sizes_raise_naming_the_values(kwargs, message):
  with pytest.raises(ValueError, match=message):
    masking.random_mask(jax.random.key(0), 2, **kwargs)
