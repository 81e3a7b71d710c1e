"""Swin V1 / V2 encoders: window machinery vs brute force, blocks vs a numpy reference, exact official
parameter counts and key layout, mask-token placement, official initialization, dtypes, jit, remat.

CPU compile time dominates here, so most tests fill parameters from `jax.eval_shape` shapes with numpy
draws instead of running `init` (whose many random initializers compile slowly), and only the
initialization tests run a real `init` (of a reduced model).
"""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from simmim_jax import losses, masking, models
from simmim_jax.models import layers, swin, swin_v2

_erf = np.vectorize(math.erf)


def count_params(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def flat_shapes(tree) -> dict[str, tuple[int, ...]]:
  return {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(tree).items()}


def random_params(shapes, seed=0):
  """Parameters of the given shapes with O(1) activations: LayerNorm scale 1 + noise, logit_scale near
  log 10, kernels ~ N(0, 1/fan_in), everything else ~ N(0, 0.5) (so biases and tables matter)."""
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(shapes)
  out = {}
  for path, leaf in flat.items():
    shape = leaf.shape
    if path[-1] == "scale":
      value = 1.0 + 0.2 * rng.standard_normal(shape)
    elif path[-1] == "logit_scale":
      value = np.log(10.0) + 0.5 * rng.standard_normal(shape)
    elif path[-1] == "kernel":
      fan_in = int(np.prod(shape[:-1]))
      value = rng.standard_normal(shape) / np.sqrt(fan_in)
    else:
      value = 0.5 * rng.standard_normal(shape)
    out[path] = jnp.asarray(value, leaf.dtype)
  return traverse_util.unflatten_dict(out)


def tiny_batch(batch=2, img=32, mask_patch=8, seed=0):
  key = jax.random.key(seed)
  images = jax.random.normal(key, (batch, img, img, 3))
  mask = masking.random_mask(key, batch, input_size=img, mask_patch_size=mask_patch, model_patch_size=4,
                             mask_ratio=0.6)
  return images, mask


# One shifted stage (8x8 tokens, window 4, output stride 4): the cheapest model that still has shifted
# windows, for the tests that compile forward and backward passes.
ONE_STAGE = (("depths", (2,)), ("num_heads", (1,)))


def simmim_tiny(name="swin_test_tiny", norm_target_window=None, dtype=jnp.float32, **overrides):
  encoder = models.create_encoder(name, dtype=dtype, **overrides)
  return models.SimMIM(encoder=encoder, encoder_stride=encoder.output_stride,
                       norm_target_window=norm_target_window, dtype=dtype)


@functools.lru_cache(maxsize=None)
def jitted_simmim(name, overrides=(), norm_target_window=None, dtype=jnp.float32):
  """(model, jitted apply), compiled once per configuration and shared by the tests below."""
  model = simmim_tiny(name, norm_target_window, dtype, **dict(overrides))
  return model, jax.jit(model.apply)


def simmim_random_params(model, images, mask, seed=0):
  shapes = jax.eval_shape(model.init, jax.random.key(0), images, mask)["params"]
  return random_params(shapes, seed)


@functools.lru_cache(maxsize=None)
def capture_stage0(encoder):
  """A jitted function returning (input to `layers_0`, `layers_0` output, encoder output)."""

  @jax.jit
  def run(params, images, mask):
    captured = {}

    def interceptor(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if (isinstance(context.module, swin.BasicLayer) and context.module.name == "layers_0"
          and context.method_name == "__call__"):
        captured["input"], captured["output"] = args[0], out[0]
      return out

    with nn.intercept_methods(interceptor):
      out = encoder.apply({"params": params}, images, mask)
    return captured["input"], captured["output"], out

  return run


# --------------------------------------------------------------------------------------------------
# Window machinery: partition, shift mask, relative positions, patch merging.


def test_window_partition_round_trip_and_window_order():
  x = np.arange(2 * 8 * 12 * 3, dtype=np.float32).reshape(2, 8, 12, 3)
  windows = swin.window_partition(jnp.asarray(x), 4)
  assert windows.shape == (2 * 2 * 3, 4, 4, 3)
  # Windows are ordered (batch, window row, window column), row-major inside a window.
  np.testing.assert_array_equal(windows[1], x[0, 0:4, 4:8])
  np.testing.assert_array_equal(windows[3], x[0, 4:8, 0:4])
  np.testing.assert_array_equal(windows[6 + 5], x[1, 4:8, 8:12])
  np.testing.assert_array_equal(swin.window_reverse(windows, 4, 8, 12), x)


@pytest.mark.parametrize("size, window, shift", [(8, 4, 2), (12, 6, 3), (16, 4, 2), (14, 7, 3)])
def test_shifted_window_mask_matches_brute_force_regions(size, window, shift):
  mask = swin.shifted_window_attention_mask(size, size, window, shift)

  def region(i):  # the slices (0:-w, -w:-s, -s:) of the rolled map, per axis
    return 0 if i < size - window else (1 if i < size - shift else 2)

  per_side = size // window
  assert mask.shape == (per_side ** 2, window ** 2, window ** 2) and mask.dtype == np.float32
  for wi in range(per_side):
    for wj in range(per_side):
      for a in range(window ** 2):
        for b in range(window ** 2):
          pa = (wi * window + a // window, wj * window + a % window)
          pb = (wi * window + b // window, wj * window + b % window)
          same = (region(pa[0]), region(pa[1])) == (region(pb[0]), region(pb[1]))
          assert mask[wi * per_side + wj, a, b] == (0.0 if same else -100.0)
  assert swin.shifted_window_attention_mask(size, size, window, 0) is None


@pytest.mark.parametrize("window", [2, 6, 7, 12])
def test_relative_position_index_matches_brute_force(window):
  index = layers.relative_position_index(window, window)
  assert index.shape == (window ** 2, window ** 2)
  for a in range(window ** 2):
    for b in range(window ** 2):
      dy, dx = a // window - b // window, a % window - b % window
      assert index[a, b] == (dy + window - 1) * (2 * window - 1) + (dx + window - 1)
  assert index.min() == 0 and index.max() == (2 * window - 1) ** 2 - 1


def test_effective_window_clips_and_unshifts_small_stages():
  assert swin.effective_window(48, 6, 3) == (6, 3)
  assert swin.effective_window(6, 6, 3) == (6, 0)     # Swin-B 192/w6 stage 3: one unshifted window
  assert swin.effective_window(6, 12, 6) == (6, 0)    # Swin-L 192/w12 stage 3: clipped to 6
  assert swin.effective_window(12, 12, 6) == (12, 0)  # Swin-L 192/w12 stage 2


def test_patch_merging_concatenates_row_offset_first():
  x = jnp.arange(1 * 4 * 4 * 2, dtype=jnp.float32).reshape(1, 4, 4, 2)
  merged = np.asarray(swin.merge_patches(x))
  assert merged.shape == (1, 2, 2, 8)
  x = np.asarray(x)
  for k, (dy, dx) in enumerate([(0, 0), (1, 0), (0, 1), (1, 1)]):
    np.testing.assert_array_equal(merged[..., 2 * k:2 * k + 2], x[:, dy::2, dx::2])


# --------------------------------------------------------------------------------------------------
# Blocks against a direct numpy implementation of the official semantics (per-token loops, no
# window_partition, no roll: each token finds its window and region in rolled coordinates).


def _layer_norm(x, p, eps=1e-5):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * np.asarray(p["scale"]) + np.asarray(p["bias"])


def _dense(x, p):
  out = x @ np.asarray(p["kernel"], np.float64)
  return out + np.asarray(p["bias"]) if "bias" in p else out


def _mlp(x, p):
  h = _dense(x, p["fc1"])
  return _dense(0.5 * h * (1.0 + _erf(h / np.sqrt(2.0))), p["fc2"])


def _reference_window_attention(x, attn, heads, window, shift, bias_table, cosine):
  """Official (S)W-MSA on one image x [H, W, C] (float64), token by token in rolled coordinates."""
  size, _, dim = x.shape
  head_dim = dim // heads
  if cosine:  # V2: no qkv bias, q_bias / zero k bias / v_bias
    qkv = _dense(x, attn["qkv"]) + np.concatenate(
        [np.asarray(attn["q_bias"]), np.zeros(dim), np.asarray(attn["v_bias"])])
  else:
    qkv = _dense(x, attn["qkv"])
  qkv = qkv.reshape(size, size, 3, heads, head_dim)

  def region(i):
    return 0 if i < size - window else (1 if i < size - shift else 2)

  out = np.zeros((size, size, heads, head_dim))
  for i in range(size):
    for j in range(size):
      si, sj = (i - shift) % size, (j - shift) % size  # position in the rolled map
      wi, wj = si // window, sj // window
      keys = [(wi * window + a, wj * window + b) for a in range(window) for b in range(window)]
      for h in range(heads):
        q = qkv[i, j, 0, h]
        logits, values = [], []
        for ki, kj in keys:
          oi, oj = (ki + shift) % size, (kj + shift) % size  # the key's original position
          k = qkv[oi, oj, 1, h]
          if cosine:
            scale = np.exp(min(float(np.asarray(attn["logit_scale"])[h, 0, 0]), np.log(100.0)))
            logit = q @ k / (np.linalg.norm(q) * np.linalg.norm(k)) * scale
          else:
            logit = q @ k * head_dim ** -0.5
          rel = (si - ki + window - 1) * (2 * window - 1) + (sj - kj + window - 1)
          logit += bias_table[rel, h]
          if shift and (region(si), region(sj)) != (region(ki), region(kj)):
            logit += -100.0
          logits.append(logit)
          values.append(qkv[oi, oj, 2, h])
        weights = np.exp(np.array(logits) - max(logits))
        out[i, j, h] = (weights / weights.sum()) @ np.array(values)
  return _dense(out.reshape(size, size, dim), attn["proj"])


def _reference_cpb_bias(cpb, window, pretrained_window):
  """16 * sigmoid(cpb_mlp(log-spaced table)), table written out from the paper's formula."""
  divisor = (pretrained_window if pretrained_window > 0 else window) - 1
  rows = []
  for dy in range(-(window - 1), window):
    for dx in range(-(window - 1), window):
      coords = np.array([dy, dx], np.float64) / divisor * 8
      rows.append(np.sign(coords) * np.log2(np.abs(coords) + 1) / np.log2(8))
  hidden = np.maximum(_dense(np.array(rows), cpb["layers_0"]), 0.0)
  return 16.0 / (1.0 + np.exp(-_dense(hidden, cpb["layers_2"])))


def _apply_block(block, size, dim, seed):
  x = jax.random.normal(jax.random.key(seed), (1, size, size, dim))
  shapes = jax.eval_shape(block.init, jax.random.key(0), x)["params"]
  params = random_params(shapes, seed)
  out = jax.jit(block.apply)({"params": params}, x)
  return np.asarray(x[0], np.float64), jax.tree.map(np.asarray, params), np.asarray(out[0])


@pytest.mark.parametrize("resolution, window_size, shift_size, window, shift", [
    (8, 4, 2, 4, 2),   # shifted windows with the -100 region mask
    (4, 8, 4, 4, 0),   # resolution <= window: one unshifted window of the whole map
])
def test_swin_v1_block_matches_numpy_reference(resolution, window_size, shift_size, window, shift):
  block = swin.SwinTransformerBlock(num_heads=2, input_resolution=resolution, window_size=window_size,
                                    shift_size=shift_size)
  x, p, out = _apply_block(block, resolution, 16, seed=1)
  assert p["attn"]["relative_position_bias_table"].shape == ((2 * window - 1) ** 2, 2)
  y = x + _reference_window_attention(_layer_norm(x, p["norm1"]), p["attn"], 2, window, shift,
                                      p["attn"]["relative_position_bias_table"], cosine=False)
  expected = y + _mlp(_layer_norm(y, p["norm2"]), p["mlp"])
  np.testing.assert_allclose(out, expected, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("resolution, window_size, shift_size, pretrained, window, shift", [
    (8, 4, 2, 0, 4, 2),
    (8, 4, 2, 6, 4, 2),   # fine-tuning style: coordinates normalized by the pretrained window
    (4, 8, 4, 0, 4, 0),
])
def test_swin_v2_block_matches_numpy_reference(resolution, window_size, shift_size, pretrained, window,
                                               shift):
  block = swin_v2.SwinTransformerBlockV2(num_heads=2, input_resolution=resolution, window_size=window_size,
                                         shift_size=shift_size, pretrained_window_size=pretrained)
  x, p, out = _apply_block(block, resolution, 16, seed=2)
  bias = _reference_cpb_bias(p["attn"]["cpb_mlp"], window, pretrained)
  attn = _reference_window_attention(x, p["attn"], 2, window, shift, bias, cosine=True)
  y = x + _layer_norm(attn, p["norm1"])                 # residual post-norm
  expected = y + _layer_norm(_mlp(y, p["mlp"]), p["norm2"])
  np.testing.assert_allclose(out, expected, atol=2e-4, rtol=2e-4)


def test_v2_relative_coords_table_matches_formula():
  for window, pretrained in [(4, 0), (6, 12), (12, 0)]:
    table = swin_v2.relative_coords_table(window, pretrained)
    divisor = (pretrained or window) - 1
    expected = []
    for dy in range(-(window - 1), window):
      for dx in range(-(window - 1), window):
        c = np.array([dy, dx]) / divisor * 8.0
        expected.append(np.sign(c) * np.log2(np.abs(c) + 1.0) / 3.0)
    assert table.shape == ((2 * window - 1) ** 2, 2) and table.dtype == np.float32
    np.testing.assert_allclose(table, np.array(expected), rtol=1e-6, atol=1e-7)
  # The largest offset w - 1 of an un-pretrained window is scaled to 8, i.e. log2(9) / log2(8).
  assert np.isclose(np.abs(swin_v2.relative_coords_table(8)).max(), np.log2(9) / 3)
  np.testing.assert_array_equal(swin_v2.relative_coords_table(1), [[0.0, 0.0]])  # no 0 / 0 NaN


def test_v2_logit_scale_is_clamped_at_log_100():
  attention = swin_v2.WindowAttentionV2(num_heads=2, window_size=4)
  x = jax.random.normal(jax.random.key(0), (3, 16, 16))
  params = random_params(jax.eval_shape(attention.init, jax.random.key(0), x)["params"])
  apply = jax.jit(lambda ls: attention.apply({"params": {**params, "logit_scale": ls}}, x))
  at = lambda value: np.asarray(apply(jnp.full((2, 1, 1), value, jnp.float32)))
  np.testing.assert_array_equal(at(np.log(1000.0)), at(np.log(100.0)))   # clamped
  assert np.abs(at(np.log(50.0)) - at(np.log(100.0))).max() > 1e-3     # below the clamp it matters


# --------------------------------------------------------------------------------------------------
# Official configurations: shapes, exact parameter counts, state-dict layout.


@pytest.mark.parametrize("name, img, window, clipped_stages", [
    ("swin_base_patch4_window6", 192, 6, [3]),        # 48/24/12/6 vs window 6
    ("swin_base_patch4_window7", 224, 7, [3]),        # 56/28/14/7 vs window 7
    ("swin_large_patch4_window12", 192, 12, [2, 3]),  # 48/24/12/6 vs window 12
])
def test_official_configurations_output_shapes(name, img, window, clipped_stages):
  encoder = models.create_encoder(name)
  assert encoder.img_size == img and encoder.window_size == window and encoder.output_stride == 32
  out, variables = jax.eval_shape(encoder.init_with_output, jax.random.key(0),
                                  jnp.zeros((2, img, img, 3)))
  dim = encoder.embed_dim
  assert out["feature_map"].shape == (2, img // 32, img // 32, 8 * dim)
  assert out["pooled"].shape == (2, 8 * dim) == (2, encoder.num_features)
  assert [s.shape for s in out["stages"]] == [
      (2, img // 4 >> l, img // 4 >> l, dim << l) for l in range(4)]
  params = variables["params"]
  for stage in range(4):
    resolution = img // 4 >> stage
    window_used = resolution if stage in clipped_stages else window
    assert (resolution <= window) == (stage in clipped_stages)
    table = params[f"layers_{stage}"]["blocks_1"]["attn"]["relative_position_bias_table"]
    assert table.shape == ((2 * window_used - 1) ** 2, encoder.num_heads[stage])


def test_swin_base_simmim_parameter_count_and_key_layout_match_official():
  """89,874,104 = the official `simmim_pretrain__swin_base__img192_window6` state dict without buffers."""
  model = models.SimMIM(encoder=models.create_encoder("swin_base_patch4_window6"), encoder_stride=32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 192, 192, 3)),
                          jnp.zeros((1, 48, 48), jnp.int32))["params"]
  assert count_params(shapes) == 89_874_104
  flat = flat_shapes(shapes)
  # 365 official entries minus 24 relative_position_index and 11 attn_mask buffers.
  assert len(flat) == 330
  assert flat["encoder/mask_token"] == (1, 1, 128)
  assert flat["encoder/patch_embed/proj/kernel"] == (4, 4, 3, 128)
  assert flat["encoder/patch_embed/norm/scale"] == (128,)
  for stage, (dim, heads) in enumerate([(128, 4), (256, 8), (512, 16), (1024, 32)]):
    block = f"encoder/layers_{stage}/blocks_1/"
    assert flat[block + "attn/relative_position_bias_table"] == (121, heads)
    assert flat[block + "attn/qkv/kernel"] == (dim, 3 * dim) and flat[block + "attn/qkv/bias"] == (3 * dim,)
    assert flat[block + "mlp/fc1/kernel"] == (dim, 4 * dim) and flat[block + "norm2/scale"] == (dim,)
    if stage < 3:
      assert flat[f"encoder/layers_{stage}/downsample/norm/scale"] == (4 * dim,)
      assert flat[f"encoder/layers_{stage}/downsample/reduction/kernel"] == (4 * dim, 2 * dim)
      assert f"encoder/layers_{stage}/downsample/reduction/bias" not in flat
  assert "encoder/layers_2/blocks_17/norm1/scale" in flat
  assert "encoder/layers_2/blocks_18/norm1/scale" not in flat
  assert not any(k.startswith("encoder/layers_3/downsample") for k in flat)
  assert flat["encoder/norm/scale"] == (1024,)
  assert flat["decoder/kernel"] == (1024, 32 * 32 * 3)
  assert not any("absolute_pos_embed" in k for k in flat)


def test_swin_large_simmim_parameter_count_and_table_shapes_match_official():
  model = models.SimMIM(encoder=models.create_encoder("swin_large_patch4_window12"), encoder_stride=32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 192, 192, 3)),
                          jnp.zeros((1, 48, 48), jnp.int32))["params"]
  assert count_params(shapes) == 199_881_204
  flat = flat_shapes(shapes)
  for stage, heads in enumerate([6, 12, 24]):
    assert flat[f"encoder/layers_{stage}/blocks_0/attn/relative_position_bias_table"] == (529, heads)
  assert flat["encoder/layers_3/blocks_1/attn/relative_position_bias_table"] == (121, 48)
  assert flat["decoder/kernel"] == (1536, 3072)


def test_swinv2_parameter_count_and_key_layout():
  encoder = models.create_encoder("swinv2_tiny_patch4_window8")
  assert encoder.img_size == 256
  shapes = jax.eval_shape(encoder.init, jax.random.key(0), jnp.zeros((1, 256, 256, 3)))["params"]

  def block(c, heads):
    attn = 3 * c * c + 2 * c + (c * c + c) + heads + (2 * 512 + 512 + 512 * heads)  # qkv, q/v bias,
    return 4 * c + attn + (c * 4 * c + 4 * c) + (4 * c * c + c)                    # proj, scale, cpb
  dims, heads = [96, 192, 384, 768], [3, 6, 12, 24]
  expected = (3 * 16 * 96 + 96) + 2 * 96 + 2 * 768
  expected += sum(d * block(c, h) for d, c, h in zip((2, 2, 6, 2), dims, heads))
  expected += sum(4 * c * 2 * c + 2 * 2 * c for c in dims[:3])  # PatchMerging V2: reduction, norm(2C)
  assert count_params(shapes) == expected == 27_578_154
  # + a 1000-class head = 28,347,154: the published 28.3M of SwinV2-T 256/w8.
  assert round((expected + 768 * 1000 + 1000) / 1e6, 2) == 28.35
  flat = flat_shapes(shapes)
  attn = "layers_1/blocks_1/attn/"
  assert flat[attn + "qkv/kernel"] == (192, 576) and attn + "qkv/bias" not in flat
  assert flat[attn + "q_bias"] == flat[attn + "v_bias"] == (192,)
  assert flat[attn + "logit_scale"] == (6, 1, 1)
  assert flat[attn + "cpb_mlp/layers_0/kernel"] == (2, 512) and flat[attn + "cpb_mlp/layers_0/bias"] == (512,)
  assert flat[attn + "cpb_mlp/layers_2/kernel"] == (512, 6) and attn + "cpb_mlp/layers_2/bias" not in flat
  assert not any("relative_position_bias_table" in k for k in flat)
  assert flat["layers_0/downsample/reduction/kernel"] == (384, 192)
  assert flat["layers_0/downsample/norm/scale"] == (192,)  # V2 normalizes after the reduction: 2C


def test_stages_alternate_shifted_blocks_and_spread_drop_path_linearly():
  encoder = models.create_encoder("swin_base_patch4_window6", drop_path_rate=0.2)
  seen = []

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, swin.SwinTransformerBlock) and context.method_name == "__call__":
      block = context.module
      seen.append((block.input_resolution, block.window_size, block.shift_size, block.drop_path_rate))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    jax.eval_shape(encoder.init, jax.random.key(0), jnp.zeros((1, 192, 192, 3)))
  assert len(seen) == 24
  resolutions = [48] * 2 + [24] * 2 + [12] * 18 + [6] * 2
  stage_block = [j for depth in (2, 2, 18, 2) for j in range(depth)]
  assert [r for r, _, _, _ in seen] == resolutions
  assert [(w, s) for _, w, s, _ in seen] == [(6, 0 if j % 2 == 0 else 3) for j in stage_block]
  np.testing.assert_allclose([rate for *_, rate in seen], np.linspace(0.0, 0.2, 24), rtol=1e-6)


def test_encoder_output_contract():
  encoder = models.create_encoder("swin_test_tiny", **dict(ONE_STAGE))
  images, mask = tiny_batch()
  params = random_params(jax.eval_shape(encoder.init, jax.random.key(0), images, mask)["params"])
  _, stage0_output, out = capture_stage0(encoder)(params, images, mask)
  assert len(out["stages"]) == 1 and out["stages"][0].shape == (2, 8, 8, 16)
  np.testing.assert_array_equal(out["stages"][0], stage0_output)  # before the final norm
  assert (encoder.output_stride, encoder.num_features) == (4, 16)
  # feature_map = final norm of the last stage; pooled = the mean of the normed tokens.
  norm = jax.tree.map(np.asarray, params["norm"])
  np.testing.assert_allclose(out["feature_map"], _layer_norm(np.asarray(stage0_output), norm), atol=1e-4)
  np.testing.assert_allclose(out["pooled"], np.asarray(out["feature_map"]).mean((1, 2)), atol=1e-6)
  # Parameters that exist only on request: the mask token (a mask is passed), the absolute positions.
  full = models.create_encoder("swin_test_tiny")
  assert "mask_token" not in jax.eval_shape(full.init, jax.random.key(0), images)["params"]
  with_ape = models.create_encoder("swin_test_tiny", ape=True)
  ape_shapes = jax.eval_shape(with_ape.init, jax.random.key(0), images)["params"]
  assert ape_shapes["absolute_pos_embed"].shape == (1, 64, 16)  # official (1, num_patches, embed_dim)


# --------------------------------------------------------------------------------------------------
# The SimMIM mask token.


@pytest.mark.parametrize("name", ["swin_test_tiny", "swinv2_test_tiny"])
def test_mask_token_is_blended_after_the_patch_embed_norm(name):
  encoder = models.create_encoder(name, **dict(ONE_STAGE))
  images, mask = tiny_batch()
  params = random_params(jax.eval_shape(encoder.init, jax.random.key(0), images, mask)["params"])
  stage0_input, _, _ = capture_stage0(encoder)(params, images, mask)
  stage0_input = np.asarray(stage0_input)
  token = np.asarray(params["mask_token"]).reshape(-1)
  masked = np.asarray(mask, bool)
  # Masked positions carry the raw mask token (a blend before the norm would normalize it) ...
  np.testing.assert_array_equal(stage0_input[masked], np.broadcast_to(token, (masked.sum(), 16)))
  # ... and visible positions the normed patch embedding.
  conv = params["patch_embed"]["proj"]
  patches = np.asarray(images).reshape(2, 8, 4, 8, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 8, 8, -1)
  embedded = patches @ np.asarray(conv["kernel"]).reshape(-1, 16) + np.asarray(conv["bias"])
  expected = _layer_norm(embedded, jax.tree.map(np.asarray, params["patch_embed"]["norm"]))
  np.testing.assert_allclose(stage0_input[~masked], expected[~masked], atol=1e-4)


def test_simmim_swin_with_random_block_masks():
  model, apply = jitted_simmim("swin_test_tiny")
  images, mask = tiny_batch()  # masking.random_mask(..., model_patch_size=4): [2, 8, 8]
  assert mask.shape == (2, 8, 8) and model.encoder_stride == 16
  params = simmim_random_params(model, images, mask)
  out = apply({"params": params}, images, mask)
  chex.assert_shape(out["reconstruction"], (2, 32, 32, 3))
  np.testing.assert_allclose(out["loss"], losses.masked_l1_loss(images, out["reconstruction"], mask),
                             rtol=1e-6)
  # Only masked pixels count: changing the prediction target at visible pixels leaves the loss unchanged.
  visible = np.asarray(masking.upsample_mask(mask, 4) == 0)[..., None]
  shifted = np.where(visible, np.asarray(images) + 10.0, np.asarray(images))
  np.testing.assert_allclose(losses.masked_l1_loss(shifted, out["reconstruction"], mask), out["loss"],
                             rtol=1e-6)
  with pytest.raises(ValueError, match="mask must have shape"):
    jax.eval_shape(model.init, jax.random.key(0), images, jnp.zeros((2, 4, 4), jnp.int32))


# --------------------------------------------------------------------------------------------------
# Official initialization (a real `init` of reduced models).


def test_swin_official_initialization():
  encoder = models.create_encoder("swin_test_tiny", embed_dim=32, depths=(1, 1), num_heads=(2, 4))
  images, mask = tiny_batch()
  params = jax.jit(encoder.init)(jax.random.key(0), images, mask)["params"]
  flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
  for path, value in flat.items():
    if path.endswith("scale"):
      np.testing.assert_array_equal(value, 1.0, err_msg=path)
    elif path.endswith("bias") and not path.startswith("patch_embed/proj"):
      np.testing.assert_array_equal(value, 0.0, err_msg=path)
  for path in ["layers_0/blocks_0/attn/qkv/kernel", "layers_1/blocks_0/mlp/fc1/kernel",
               "layers_0/downsample/reduction/kernel"]:
    assert 0.018 < flat[path].std() < 0.022 and abs(flat[path].mean()) < 0.002, path  # timm N(0, .02)
  table = flat["layers_0/blocks_0/attn/relative_position_bias_table"]
  assert 0.013 < table.std() < 0.027 and np.abs(table).max() < 0.1
  assert 0.01 < flat["mask_token"].std() < 0.03
  # The patch-embed conv keeps PyTorch's default: U(+-1/sqrt(fan_in)) for weight and bias, fan_in = 48.
  bound = 1 / np.sqrt(48)
  for path in ["patch_embed/proj/kernel", "patch_embed/proj/bias"]:
    assert np.abs(flat[path]).max() <= bound and flat[path].std() > 0.45 * bound, path


def test_swinv2_official_initialization_makes_every_block_the_identity():
  encoder = models.create_encoder("swinv2_test_tiny", **dict(ONE_STAGE))  # a shifted and an unshifted block
  images, mask = tiny_batch()
  params = jax.jit(encoder.init)(jax.random.key(0), images, mask)["params"]
  flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
  for block in ("layers_0/blocks_0/", "layers_0/blocks_1/"):
    for norm in ("norm1", "norm2"):  # _init_respostnorm: weight and bias 0
      np.testing.assert_array_equal(flat[block + norm + "/scale"], 0.0)
      np.testing.assert_array_equal(flat[block + norm + "/bias"], 0.0)
    np.testing.assert_allclose(flat[block + "attn/logit_scale"], np.log(10.0), rtol=1e-6)
    np.testing.assert_array_equal(flat[block + "attn/q_bias"], 0.0)
    np.testing.assert_array_equal(flat[block + "attn/v_bias"], 0.0)
    np.testing.assert_array_equal(flat[block + "attn/cpb_mlp/layers_0/bias"], 0.0)
  for path in ["patch_embed/norm/scale", "norm/scale"]:
    np.testing.assert_array_equal(flat[path], 1.0)
  cpb = flat["layers_0/blocks_0/attn/cpb_mlp/layers_0/kernel"]
  assert 0.015 < cpb.std() < 0.025
  assert 0.018 < flat["layers_0/blocks_0/attn/qkv/kernel"].std() < 0.022
  # With zero post-norms every block starts as the identity: stage 0 returns its input exactly.
  stage0_input, stage0_output, _ = capture_stage0(encoder)(params, images, mask)
  np.testing.assert_array_equal(stage0_output, stage0_input)


# --------------------------------------------------------------------------------------------------
# Numerics and transformations.


@pytest.mark.parametrize("name", ["swin_test_tiny", "swinv2_test_tiny"])
def test_bfloat16_compute_with_float32_params(name):
  model16, apply16 = jitted_simmim(name, ONE_STAGE, dtype=jnp.bfloat16)
  _, apply32 = jitted_simmim(name, ONE_STAGE)
  images, mask = tiny_batch()
  shapes = jax.eval_shape(model16.init, jax.random.key(0), images, mask)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes))
  params = random_params(shapes["params"])
  features = jax.eval_shape(model16.encoder.apply, {"params": params["encoder"]}, images, mask)
  assert features["feature_map"].dtype == jnp.bfloat16
  loss16 = apply16({"params": params}, images, mask)["loss"]
  loss32 = apply32({"params": params}, images, mask)["loss"]
  assert loss16.dtype == jnp.float32 and np.isfinite(loss16)
  np.testing.assert_allclose(loss16, loss32, rtol=0.05)


def test_jit_matches_eager_and_does_not_retrace():
  model, apply = jitted_simmim("swin_test_tiny", ONE_STAGE)
  images, mask = tiny_batch()
  params = simmim_random_params(model, images, mask)
  eager = model.apply({"params": params}, images, mask)["loss"]
  np.testing.assert_allclose(apply({"params": params}, images, mask)["loss"], eager, rtol=1e-5)
  apply({"params": params}, images, tiny_batch(seed=1)[1])  # a new mask, same shapes: no retrace
  assert apply._cache_size() == 1


def test_remat_gives_same_loss_and_gradients():
  images, mask = tiny_batch()
  results = []
  for remat in (False, True):
    # Stochastic depth on: the rematerialized backward pass must replay the same random draws.
    model = simmim_tiny("swin_test_tiny", remat=remat, drop_path_rate=0.2, **dict(ONE_STAGE))
    params = simmim_random_params(model, images, mask)  # remat keeps the parameter tree unchanged
    loss_fn = lambda p: model.apply({"params": p}, images, mask, train=True,
                                    rngs={"dropout": jax.random.key(3)})["loss"]
    results.append(jax.jit(jax.value_and_grad(loss_fn))(params))
  np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6)
  chex.assert_trees_all_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(results[0][1]["encoder"]["mask_token"])).max() > 0  # the blend is differentiable


def test_swinv2_simmim_with_local_target_normalization():
  model, apply = jitted_simmim("swinv2_test_tiny", norm_target_window=47)  # official NORM_TARGET 47
  images, mask = tiny_batch()
  params = simmim_random_params(model, images, mask)
  out = apply({"params": params}, images, mask)
  np.testing.assert_allclose(out["target"], losses.local_normalize_targets(images, 47), atol=1e-5)
  np.testing.assert_allclose(out["loss"], losses.masked_l1_loss(out["target"], out["reconstruction"], mask),
                             rtol=1e-6)
  assert np.isfinite(out["loss"])


# --------------------------------------------------------------------------------------------------
# Registry and errors.


def test_registry_names_and_defaults():
  names = set(models.list_encoders())
  for size in ("tiny", "small", "base", "large"):
    assert {f"swin_{size}_patch4_window{w}" for w in (6, 7, 12, 14)} <= names
  for size in ("tiny", "small", "base", "large", "huge", "giant"):
    assert {f"swinv2_{size}_patch4_window{w}" for w in (8, 12, 16)} <= names
  assert {"swin_test_tiny", "swinv2_test_tiny"} <= names
  assert models.create_encoder("swin_large_patch4_window14").img_size == 224
  assert models.create_encoder("swinv2_base_patch4_window12").img_size == 192
  giant = models.create_encoder("swinv2_giant_patch4_window16")
  assert (giant.embed_dim, giant.depths, giant.num_heads) == (512, (2, 2, 42, 4), (16, 32, 64, 128))
  assert isinstance(giant, models.SwinTransformerV2) and isinstance(
      models.create_encoder("swin_tiny_patch4_window7"), models.SwinTransformer)
  v2 = models.create_encoder("swinv2_base_patch4_window12", pretrained_window_sizes=(12, 12, 12, 6))
  assert v2.pretrained_window_sizes == (12, 12, 12, 6)


@pytest.mark.parametrize("name, overrides, message", [
    ("swin_base_patch4_window6", dict(img_size=224), "stage 0 resolution 56x56.*window_size=6"),
    ("swin_base_patch4_window7", dict(img_size=226), "img_size=226 is not divisible by patch_size=4"),
    ("swin_base_patch4_window7", dict(img_size=208), "52 must be divisible by 2\\*\\*\\(num_stages-1\\) = 8"),
    ("swin_tiny_patch4_window7", dict(num_heads=(3, 6, 12)), "depths=.*num_heads=.*same length"),
    ("swin_tiny_patch4_window7", dict(num_heads=(3, 5, 12, 24)),
     "stage 1 width .* = 192 .*num_heads\\[1\\] = 5"),
    ("swinv2_tiny_patch4_window8", dict(pretrained_window_sizes=(8, 8)), "pretrained_window_sizes"),
])
def test_invalid_configurations_are_clear_errors(name, overrides, message):
  encoder = models.create_encoder(name, **overrides)
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(encoder.init, jax.random.key(0), jnp.zeros((1, encoder.img_size, encoder.img_size, 3)))


def test_wrong_image_size_is_a_clear_error():
  encoder = models.create_encoder("swin_test_tiny")
  with pytest.raises(ValueError, match="img_size=32"):
    jax.eval_shape(encoder.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
