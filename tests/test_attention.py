"""The encoders' `attention_impl` ("einsum" / "dot_product_attention") and the ViT / Swin MLP dropout placement.

Both attention paths compute softmax(q k^T * scale + bias) v; on CPU in float32 they must agree to 1e-5 in
the forward pass and in every parameter gradient, with the biases that matter: ViT's shared and per-block
relative position bias, Swin's relative bias plus the shifted-window mask, SwinV2's cosine attention
(logit scale folded into q) plus its continuous position bias. Parameters are random draws (not `init`:
the tables start at zero there, which would hide a dropped bias).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from simmim_jax import masking, models
from simmim_jax.models import layers, swin, vit

# name, field overrides, image size, model patch size
CASES = {
    "vit_shared_rpb": ("vit_test_tiny", dict(use_shared_rel_pos_bias=True, use_rel_pos_bias=False), 32, 4),
    "vit_per_block_rpb": ("vit_test_tiny", dict(use_shared_rel_pos_bias=False, use_rel_pos_bias=True), 32, 4),
    "vit_both_rpb": ("vit_test_tiny", dict(use_shared_rel_pos_bias=True, use_rel_pos_bias=True), 32, 4),
    "vit_plain": ("vit_test_tiny_plain", {}, 32, 4),
    # Two stages (compile time): stage 0 8x8 with window 4, so block 1 is shifted and masked; stage 1 4x4,
    # one unshifted window.
    "swin_shifted": ("swin_test_tiny", dict(depths=(2, 2), num_heads=(2, 4)), 32, 4),
    "swinv2_shifted": ("swinv2_test_tiny", dict(depths=(2, 2), num_heads=(2, 4)), 32, 4),
}


def random_params(shapes, seed=0):
  """O(1) random parameters: kernels ~ N(0, 1/fan_in), LayerNorm scales 1 + noise, logit_scale near log 10,
  everything else (biases, position tables, mask token) ~ N(0, 0.5)."""
  rng = np.random.default_rng(seed)
  out = {}
  for path, leaf in traverse_util.flatten_dict(shapes).items():
    if path[-1] == "scale":
      value = 1.0 + 0.2 * rng.standard_normal(leaf.shape)
    elif path[-1] == "logit_scale":
      value = np.log(10.0) + 0.5 * rng.standard_normal(leaf.shape)
    elif path[-1] == "kernel":
      value = rng.standard_normal(leaf.shape) / np.sqrt(int(np.prod(leaf.shape[:-1])))
    else:
      value = 0.5 * rng.standard_normal(leaf.shape)
    out[path] = jnp.asarray(value, leaf.dtype)
  return traverse_util.unflatten_dict(out)


def build(case, attention_impl, **extra):
  name, fields, img, patch = CASES[case]
  encoder = models.create_encoder(name, attention_impl=attention_impl, **{**fields, **extra})
  key = jax.random.key(0)
  images = jax.random.normal(key, (2, img, img, 3))
  mask = masking.random_mask(key, 2, input_size=img, mask_patch_size=8, model_patch_size=patch, mask_ratio=0.6)
  shapes = jax.eval_shape(encoder.init, key, images, mask)["params"]
  return encoder, random_params(shapes), images, mask


def forward_and_grads(encoder, params, images, mask):
  def loss(p):
    out = encoder.apply({"params": p}, images, mask)
    feature_map = out["feature_map"]
    weights = jnp.cos(jnp.arange(feature_map.size, dtype=jnp.float32).reshape(feature_map.shape))
    return jnp.sum(feature_map * weights) + jnp.sum(out["pooled"] ** 2), out["feature_map"]
  (value, feature_map), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return value, feature_map, grads


def count_dot_product_attention_calls(monkeypatch):
  calls = []
  original = jax.nn.dot_product_attention

  def counting(*args, **kwargs):
    calls.append(kwargs.get("implementation"))
    return original(*args, **kwargs)

  monkeypatch.setattr(jax.nn, "dot_product_attention", counting)
  return calls


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c.startswith("swin") else c  # compile time
                                  for c in sorted(CASES)])
def test_dot_product_attention_matches_einsum_forward_and_gradients(case, monkeypatch):
  calls = count_dot_product_attention_calls(monkeypatch)
  encoder, params, images, mask = build(case, "einsum")
  ref_value, ref_map, ref_grads = forward_and_grads(encoder, params, images, mask)
  assert not calls, "the einsum path must not call jax.nn.dot_product_attention"
  encoder, _, _, _ = build(case, "dot_product_attention")
  value, feature_map, grads = forward_and_grads(encoder, params, images, mask)
  assert calls and set(calls) == {"xla"}, f"expected XLA dot_product_attention calls on CPU, got {calls}"
  np.testing.assert_allclose(feature_map, ref_map, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  flat_ref, flat = traverse_util.flatten_dict(ref_grads), traverse_util.flatten_dict(grads)
  assert flat.keys() == flat_ref.keys()
  for path in flat_ref:
    scale = max(1.0, float(jnp.max(jnp.abs(flat_ref[path]))))
    np.testing.assert_allclose(flat[path] / scale, flat_ref[path] / scale, atol=1e-5, rtol=0,
                               err_msg="/".join(path))
  # The position biases reach the output: their gradients are not zero.
  bias_grads = [v for p, v in flat_ref.items() if "relative_position_bias_table" in p or "cpb_mlp" in p]
  assert not bias_grads or all(float(jnp.abs(g).max()) > 0 for g in bias_grads)


@pytest.mark.parametrize("case", ["vit_shared_rpb"])
def test_active_attention_dropout_falls_back_to_einsum(case, monkeypatch):
  calls = count_dot_product_attention_calls(monkeypatch)
  outputs = {}
  for impl in ("einsum", "dot_product_attention"):
    encoder, params, images, mask = build(case, impl, attn_drop_rate=0.3)
    calls.clear()  # init (deterministic) may take either path
    outputs[impl] = encoder.apply({"params": params}, images, mask, train=True,
                                  rngs={"dropout": jax.random.key(3)})["feature_map"]
    assert not calls  # dot_product_attention has no dropout: the einsum path ran both times
  np.testing.assert_array_equal(outputs["einsum"], outputs["dot_product_attention"])


@pytest.mark.parametrize("name", ["vit_test_tiny", "swin_test_tiny", "swinv2_test_tiny"])
def test_attention_impl_is_validated(name):
  encoder = models.create_encoder(name, attention_impl="flash")
  with pytest.raises(ValueError, match=r"attention_impl='flash'.*'einsum', 'dot_product_attention'"):
    jax.eval_shape(encoder.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_cudnn_is_requested_only_on_a_cuda_gpu_for_qualifying_calls(monkeypatch):
  q16 = jax.ShapeDtypeStruct((2, 36, 4, 64), jnp.bfloat16)
  bias = jax.ShapeDtypeStruct((1, 4, 36, 36), jnp.bfloat16)
  assert layers.dot_product_attention_implementation(q16, q16, bias) == "xla"  # this CPU
  monkeypatch.setattr(layers, "_cuda_compute_capability", lambda: (9, 0))
  implementation = lambda q, bias=bias: layers.dot_product_attention_implementation(q, q, bias)
  assert implementation(q16) == "cudnn"
  assert implementation(jax.ShapeDtypeStruct((2, 36, 4, 64), jnp.float32)) == "xla"      # cuDNN: fp16/bf16
  assert implementation(jax.ShapeDtypeStruct((2, 36, 4, 12), jnp.bfloat16)) == "xla"     # head_dim % 8
  assert implementation(jax.ShapeDtypeStruct((2, 36, 4, 512), jnp.bfloat16)) == "xla"    # head_dim > 256
  odd = jax.ShapeDtypeStruct((2, 197, 4, 64), jnp.bfloat16)  # ViT-B/16 224 with its cls token
  assert implementation(odd, jax.ShapeDtypeStruct((1, 4, 197, 197), jnp.bfloat16)) == "xla"
  assert implementation(odd, None) == "cudnn"
  monkeypatch.setattr(layers, "_cuda_compute_capability", lambda: (8, 0))
  assert implementation(jax.ShapeDtypeStruct((2, 36, 4, 192), jnp.bfloat16)) == "xla"    # > 128 before Hopper
  monkeypatch.setattr(layers, "_cuda_compute_capability", lambda: (7, 5))
  assert implementation(q16) == "xla"


# ----------------------------------------------------------------------------------------------------
# MLP dropout placement (issue 18)


def mlp_outputs(dropout_after_fc1):
  mlp = layers.Mlp(hidden_dim=64, dropout_rate=0.5, dropout_after_fc1=dropout_after_fc1)
  x = jax.random.normal(jax.random.key(0), (4, 16))
  params = mlp.init(jax.random.key(1), x)
  plain = mlp.apply(params, x, deterministic=True)
  dropped = mlp.apply(params, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
  return np.asarray(plain), np.asarray(dropped)


def test_mlp_dropout_after_fc2_only_zeroes_or_rescales_the_output():
  plain, dropped = mlp_outputs(dropout_after_fc1=False)
  kept = dropped != 0
  assert 0 < kept.mean() < 1
  np.testing.assert_allclose(dropped[kept], plain[kept] / 0.5, rtol=1e-5, atol=1e-6)
  plain, dropped = mlp_outputs(dropout_after_fc1=True)  # timm: the hidden layer is dropped too
  kept = dropped != 0
  assert not np.allclose(dropped[kept], plain[kept] / 0.5, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name, expected", [("vit_test_tiny", False), ("vit_test_tiny_plain", False),
                                            ("swin_test_tiny", True), ("swinv2_test_tiny", True)])
def test_encoders_place_mlp_dropout_as_their_official_models(name, expected):
  """ViT: the official SimMIM / BEiT `Mlp` (and HF ViT) drop out after fc2 only; Swin / SwinV2: timm's
  `Mlp` (microsoft/Swin-Transformer) after the activation too."""
  seen = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, layers.Mlp) and context.method_name == "__call__":
      seen.append(context.module.dropout_after_fc1)
    return next_fun(*args, **kwargs)

  encoder = models.create_encoder(name, drop_rate=0.1)
  with nn.intercept_methods(record):
    jax.eval_shape(encoder.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert seen and set(seen) == {expected}


def test_default_attention_impl_is_einsum():
  for module in (vit.VisionTransformer(), swin.SwinTransformer(), models.SwinTransformerV2()):
    assert module.attention_impl == "einsum"
