"""ViT encoder and SimMIM model: shapes, exact parameter counts, mask token, dtypes, jit, remat, registry."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from simmim_jax import masking, models
from simmim_jax.models import layers, vit


def count_params(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def tiny_batch(batch=2, img=32, patch=4, mask_patch=8, seed=0):
  key = jax.random.key(seed)
  images = jax.random.normal(key, (batch, img, img, 3))
  mask = masking.random_mask(key, batch, input_size=img, mask_patch_size=mask_patch, model_patch_size=patch,
                             mask_ratio=0.6)
  return images, mask


def test_vit_base_simmim_parameter_count_matches_official_state_dict():
  """86,256,720 = the sum of the official ViT-B SimMIM state_dict shapes (buffers excluded)."""
  encoder = models.create_encoder("vit_base_patch16")
  model = models.SimMIM(encoder=encoder, encoder_stride=16)
  images = jnp.zeros((1, 224, 224, 3))
  mask = jnp.zeros((1, 14, 14), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), images, mask)["params"]
  assert count_params(shapes) == 86_256_720
  flat = {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(shapes).items()}
  assert flat["encoder/rel_pos_bias/relative_position_bias_table"] == (732, 12)
  assert flat["encoder/blocks_0/attn/qkv/kernel"] == (768, 2304)
  assert "encoder/blocks_0/attn/qkv/bias" not in flat  # q/v biases are separate, k bias is zero
  assert flat["encoder/blocks_11/attn/q_bias"] == (768,)
  assert flat["encoder/mask_token"] == (1, 1, 768)
  assert flat["decoder/kernel"] == (768, 16 * 16 * 3)
  assert not any("pos_embed" in k for k in flat)


def test_vit_large_parameter_count():
  encoder = models.create_encoder("vit_large_patch16")
  shapes = jax.eval_shape(encoder.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))["params"]
  # patch embed + cls + shared RPB (732 x 16) + 24 BEiT blocks of width 1024 + final norm.
  block = 2 * 1024 + 2 * 1024 + 2 * 1024 + 1024 * 3072 + (1024 * 1024 + 1024) + 2 * 1024 \
      + (1024 * 4096 + 4096) + (4096 * 1024 + 1024)
  expected = (1024 * 3 * 256 + 1024) + 1024 + 732 * 16 + 24 * block + 2 * 1024
  assert count_params(shapes) == expected


@pytest.mark.parametrize("name", ["vit_test_tiny", "vit_test_tiny_plain"])
def test_simmim_output_shapes_and_finite_loss(name):
  encoder = models.create_encoder(name)
  model = models.SimMIM(encoder=encoder, encoder_stride=encoder.output_stride)
  images, mask = tiny_batch()
  variables = model.init(jax.random.key(1), images, mask)
  out = model.apply(variables, images, mask)
  chex.assert_shape(out["reconstruction"], (2, 32, 32, 3))
  chex.assert_shape(out["loss"], ())
  assert out["loss"].dtype == jnp.float32 and np.isfinite(out["loss"])
  features = encoder.apply({"params": variables["params"]["encoder"]}, images, mask)
  chex.assert_shape(features["feature_map"], (2, 8, 8, 32))
  chex.assert_shape(features["pooled"], (2, 32))


def test_plain_vit_has_absolute_positions_and_fused_biases():
  encoder = models.create_encoder("vit_test_tiny_plain")
  params = encoder.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  assert params["pos_embed"].shape == (1, 65, 32)
  assert params["blocks_0"]["attn"]["qkv"]["bias"].shape == (96,)
  assert "gamma_1" not in params["blocks_0"] and "rel_pos_bias" not in params


def test_per_block_relative_position_bias_and_mean_pooling_variant():
  encoder = models.create_encoder("vit_test_tiny", use_rel_pos_bias=True, use_shared_rel_pos_bias=False,
                                  use_mean_pooling=True)
  images, _ = tiny_batch()
  params = encoder.init(jax.random.key(0), images)["params"]
  assert params["blocks_1"]["attn"]["relative_position_bias"]["relative_position_bias_table"].shape == (228, 2)
  assert "fc_norm" in params and "norm" not in params
  out = encoder.apply({"params": params}, images)
  # fc_norm of the mean of the patch tokens (which skip the final norm).
  tokens = out["feature_map"].reshape(2, -1, 32).mean(1)
  normed = (tokens - tokens.mean(-1, keepdims=True)) / jnp.sqrt(tokens.var(-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(out["pooled"], normed, atol=1e-4)


def test_relative_position_index_with_cls_matches_brute_force():
  h = w = 3
  index = vit.relative_position_index_with_cls(h, w)
  num = (2 * h - 1) * (2 * w - 1) + 3
  coords = [(i, j) for i in range(h) for j in range(w)]
  for a, (ya, xa) in enumerate(coords):
    for b, (yb, xb) in enumerate(coords):
      assert index[a + 1, b + 1] == (ya - yb + h - 1) * (2 * w - 1) + (xa - xb + w - 1)
  assert (index[0, 1:] == num - 3).all() and (index[1:, 0] == num - 2).all() and index[0, 0] == num - 1
  assert len(np.unique(index[1:, 1:])) == (2 * h - 1) * (2 * w - 1)


def test_official_initialization():
  """±1σ-truncated N(0, .02) weights, fix_init_weight scaling, layer scale 0.1, zero RPB and q/v biases."""
  encoder = models.create_encoder("vit_small_patch16", depth=4)
  model = models.SimMIM(encoder=encoder, encoder_stride=16)
  params = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), jnp.zeros((1, 14, 14), jnp.int32))["params"]
  enc = params["encoder"]
  qkv = np.asarray(enc["blocks_0"]["attn"]["qkv"]["kernel"])
  assert np.abs(qkv).max() <= 0.02 + 1e-7 and 0.009 < qkv.std() < 0.0125  # truncated at ±1σ: std ≈ 0.0108
  assert np.abs(np.asarray(enc["mask_token"])).max() <= 0.02 + 1e-7
  for layer in range(4):
    proj = np.asarray(enc[f"blocks_{layer}"]["attn"]["proj"]["kernel"])
    assert np.abs(proj).max() <= 0.02 / np.sqrt(2 * (layer + 1)) + 1e-7
    assert proj.std() > 0.8 * 0.0108 / np.sqrt(2 * (layer + 1))
  np.testing.assert_array_equal(enc["blocks_0"]["gamma_1"], np.float32(0.1))
  np.testing.assert_array_equal(enc["rel_pos_bias"]["relative_position_bias_table"], 0.0)
  np.testing.assert_array_equal(enc["blocks_0"]["attn"]["q_bias"], 0.0)
  # The decoder keeps PyTorch's Conv2d default: U(±1/sqrt(fan_in)), fan_in = 384.
  decoder = np.asarray(params["decoder"]["kernel"])
  bound = 1 / np.sqrt(384)
  assert np.abs(decoder).max() <= bound and decoder.std() > 0.5 * bound


def test_mask_token_gets_gradient_only_when_something_is_masked():
  encoder = models.create_encoder("vit_test_tiny")
  model = models.SimMIM(encoder=encoder, encoder_stride=4)
  images, mask = tiny_batch()
  variables = model.init(jax.random.key(0), images, mask)

  def mask_token_grad(m):
    # A loss over every pixel, so an unmasked image still gives the rest of the model a gradient.
    def loss_fn(params):
      out = model.apply({"params": params}, images, m)
      return jnp.abs(out["reconstruction"] - images).mean()
    grads = jax.grad(loss_fn)(variables["params"])
    return np.asarray(grads["encoder"]["mask_token"]), grads

  masked_grad, _ = mask_token_grad(mask)
  assert np.abs(masked_grad).max() > 0
  unmasked_grad, grads = mask_token_grad(jnp.zeros_like(mask))
  np.testing.assert_array_equal(unmasked_grad, 0.0)
  assert np.abs(np.asarray(grads["encoder"]["cls_token"])).max() > 0


def test_bfloat16_compute_with_float32_params():
  encoder = models.create_encoder("vit_test_tiny", dtype=jnp.bfloat16)
  model = models.SimMIM(encoder=encoder, encoder_stride=4, dtype=jnp.bfloat16)
  images, mask = tiny_batch()
  variables = model.init(jax.random.key(0), images, mask)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  out = jax.jit(model.apply)(variables, images, mask)
  assert out["loss"].dtype == jnp.float32 and np.isfinite(out["loss"])
  features = encoder.apply({"params": variables["params"]["encoder"]}, images, mask)
  assert features["feature_map"].dtype == jnp.bfloat16
  out32 = models.SimMIM(encoder=models.create_encoder("vit_test_tiny"), encoder_stride=4).apply(
      variables, images, mask)
  np.testing.assert_allclose(out["loss"], out32["loss"], rtol=0.05)


def test_jit_matches_eager_and_does_not_retrace():
  encoder = models.create_encoder("vit_test_tiny")
  model = models.SimMIM(encoder=encoder, encoder_stride=4)
  images, mask = tiny_batch()
  variables = model.init(jax.random.key(0), images, mask)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def loss(v, x, m):
    return model.apply(v, x, m)["loss"]

  eager = model.apply(variables, images, mask)["loss"]
  np.testing.assert_allclose(loss(variables, images, mask), eager, rtol=1e-5)
  _, mask2 = tiny_batch(seed=1)
  loss(variables, images, mask2)  # same shapes: no retrace


def test_remat_gives_same_loss_and_gradients():
  images, mask = tiny_batch()
  results = []
  for remat in (False, True):
    model = models.SimMIM(encoder=models.create_encoder("vit_test_tiny", remat=remat, drop_path_rate=0.1),
                          encoder_stride=4)
    variables = model.init(jax.random.key(0), images, mask)
    loss_fn = lambda p: model.apply({"params": p}, images, mask, train=True,
                                    rngs={"dropout": jax.random.key(3)})["loss"]
    results.append(jax.value_and_grad(loss_fn)(variables["params"]))
  np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6)
  chex.assert_trees_all_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-7)


def test_drop_path_is_active_only_in_training():
  encoder = models.create_encoder("vit_test_tiny", drop_path_rate=0.5)
  model = models.SimMIM(encoder=encoder, encoder_stride=4)
  images, mask = tiny_batch()
  variables = model.init(jax.random.key(0), images, mask)
  eval_a = model.apply(variables, images, mask)["loss"]
  eval_b = model.apply(variables, images, mask)["loss"]
  train_a = model.apply(variables, images, mask, train=True, rngs={"dropout": jax.random.key(1)})["loss"]
  train_b = model.apply(variables, images, mask, train=True, rngs={"dropout": jax.random.key(2)})["loss"]
  assert eval_a == eval_b and train_a != train_b


@pytest.mark.parametrize("in_chans", [1, 4])
def test_other_channel_counts(in_chans):
  encoder = models.create_encoder("vit_test_tiny", in_chans=in_chans)
  model = models.SimMIM(encoder=encoder, encoder_stride=4, in_chans=in_chans)
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, in_chans))
  _, mask = tiny_batch()
  variables = model.init(jax.random.key(0), images, mask)
  out = model.apply(variables, images, mask)
  chex.assert_shape(out["reconstruction"], (2, 32, 32, in_chans))
  assert variables["params"]["decoder"]["kernel"].shape == (32, 16 * in_chans)


def test_registry_overrides_and_errors():
  tiny = models.create_encoder("vit_base_patch16", img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2)
  assert (tiny.img_size, tiny.patch_size, tiny.embed_dim, tiny.depth, tiny.num_heads) == (32, 4, 32, 2, 2)
  assert tiny.layer_scale_init == 0.1 and tiny.use_shared_rel_pos_bias  # the official layout is kept
  assert {"vit_base_patch16", "vit_large_patch16", "vit_base_patch16_plain", "vit_test_tiny"} <= set(
      models.list_encoders())
  with pytest.raises(ValueError, match="vit_base_patch16"):  # the list of known names
    models.create_encoder("vit_gigantic")
  with pytest.raises(ValueError, match="embed_dims"):
    models.create_encoder("vit_base_patch16", embed_dims=3)


def test_wrong_image_size_or_mask_shape_is_a_clear_error():
  encoder = models.create_encoder("vit_test_tiny")
  with pytest.raises(ValueError, match="img_size=32"):
    encoder.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  with pytest.raises(ValueError, match="mask must have shape"):
    encoder.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 4, 4), jnp.int32))
  with pytest.raises(ValueError, match="encoder_stride=8"):
    models.SimMIM(encoder=encoder, encoder_stride=8).init(jax.random.key(0), *tiny_batch(batch=1))


def test_split_qkv_matches_the_official_row_order():
  batch, tokens, heads, head_dim = 2, 5, 4, 8
  qkv = jax.random.normal(jax.random.key(0), (batch, tokens, 3 * heads * head_dim))
  # The official code: qkv.reshape(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4) -> q, k, v = qkv[0..2].
  official = np.asarray(qkv).reshape(batch, tokens, 3, heads, head_dim)
  for got, want in zip(layers.split_qkv(qkv, heads), (official[:, :, i] for i in range(3))):
    chex.assert_shape(got, (batch, tokens, heads, head_dim))
    np.testing.assert_array_equal(np.asarray(got), want)
  weights = jax.random.normal(jax.random.key(1), (3, batch, tokens, heads, head_dim))
  loss = lambda x: sum((t * w).sum() for t, w in zip(layers.split_qkv(x, heads), weights))
  np.testing.assert_array_equal(np.asarray(jax.grad(loss)(qkv)),
                                np.moveaxis(np.asarray(weights), 0, 2).reshape(qkv.shape))
