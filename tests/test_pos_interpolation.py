"""pos_interpolation.py: relative-position tables and absolute position embeddings resized as the official
code does, and a pretrained checkpoint that does not fit the model refused with the parameters' names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simmim_jax import models
from simmim_jax.storage import pos_interpolation


def test_geometric_interpolation_keeps_values_at_matching_offsets():
  rng = np.random.default_rng(0)
  table = rng.normal(size=(11 * 11, 4)).astype(np.float32)  # Swin window 6 -> 7
  resized = pos_interpolation.resize_relative_position_table(table, 13 * 13)
  src, dst = table.reshape(11, 11, 4), resized.reshape(13, 13, 4)
  for dy in (-1, 0, 1):  # the geo grid puts source offsets 0 and +-1 on integer target offsets
    for dx in (-1, 0, 1):
      np.testing.assert_allclose(dst[6 + dy, 6 + dx], src[5 + dy, 5 + dx], atol=1e-5)
  assert np.all(np.isfinite(resized))
  np.testing.assert_array_equal(pos_interpolation.resize_relative_position_table(table, 121), table)


def test_vit_table_interpolation_keeps_the_three_cls_rows():
  table = np.random.default_rng(1).normal(size=(13 * 13 + 3, 2)).astype(np.float32)  # grid 7 -> 8
  resized = pos_interpolation.resize_relative_position_table(table, 15 * 15 + 3, num_extra=3)
  np.testing.assert_array_equal(resized[-3:], table[-3:])
  np.testing.assert_allclose(resized[:-3].reshape(15, 15, 2)[7, 7], table[:-3].reshape(13, 13, 2)[6, 6], atol=1e-5)


def test_absolute_position_embedding_resize_keeps_cls_and_constant_grids():
  embedding = np.concatenate([np.full((1, 1, 4), 7.0), np.full((1, 16, 4), 2.0)], axis=1)  # cls + 4x4
  resized = pos_interpolation.resize_absolute_position_embedding(embedding, 1 + 36, num_extra=1)
  assert resized.shape == (1, 37, 4)
  np.testing.assert_allclose(resized[0, 0], 7.0)
  np.testing.assert_allclose(resized[0, 1:], 2.0, atol=1e-5)


def test_mismatched_checkpoint_error_names_the_parameters():
  images = jnp.zeros((1, 32, 32, 3))
  params = lambda **fields: models.create_encoder("vit_test_tiny", **fields).init(jax.random.key(0), images)["params"]
  with pytest.raises(pos_interpolation.CheckpointMismatchError, match=r"blocks_0/attn/qkv/kernel: checkpoint "
                     r"shape \(32, 96\) != model shape \(48, 144\)"):
    pos_interpolation.remap_pretrained(params(), params(embed_dim=48), is_vit=True)
  with pytest.raises(pos_interpolation.CheckpointMismatchError, match="blocks_2/attn/proj/kernel: missing from"):
    pos_interpolation.remap_pretrained(params(), params(depth=3), is_vit=True)
  with pytest.raises(pos_interpolation.CheckpointMismatchError, match="blocks_2/mlp/fc1/bias: in the checkpoint but "
                     "not in the model"):
    pos_interpolation.remap_pretrained(params(depth=3), params(), is_vit=True)
