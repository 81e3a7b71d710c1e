"""Reuse from other JAX projects: inside another Linen module, under Flax NNX, and without TensorFlow."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx

from simmim_jax import models
from helpers import assert_runs_without_tensorflow


class LinearProbe(nn.Module):
  """A user's own module that embeds a simmim_jax encoder."""

  num_classes: int = 5

  @nn.compact
  def __call__(self, images):
    features = models.create_encoder("vit_test_tiny", name="backbone")(images)["pooled"]
    return nn.Dense(self.num_classes, name="head")(features)


def test_encoder_inside_another_linen_module_trains():
  model = LinearProbe()
  images = jax.random.normal(jax.random.key(0), (8, 32, 32, 3))
  labels = jnp.arange(8) % 5
  params = model.init(jax.random.key(1), images)["params"]
  assert set(params) == {"backbone", "head"}
  assert "blocks_1" in params["backbone"]
  tx = optax.adam(1e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    def loss_fn(p):
      logits = model.apply({"params": p}, images)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for _ in range(10):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert losses[-1] < losses[0]


def test_encoder_wrapped_for_flax_nnx():
  encoder = models.create_encoder("vit_test_tiny")
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  module = nnx.bridge.ToNNX(encoder, rngs=nnx.Rngs(0))
  nnx.bridge.lazy_init(module, images)
  out = module(images)
  assert out["feature_map"].shape == (2, 8, 8, 32)
  # The NNX module holds the same parameters the Linen module would apply.
  params = nnx.to_pure_dict(nnx.state(module, nnx.Param))
  linen_out = encoder.apply({"params": params}, images)
  np.testing.assert_allclose(out["pooled"], linen_out["pooled"], rtol=1e-6)


def test_models_masking_losses_run_without_tensorflow():
  """Block every TensorFlow import, then build, mask, differentiate and run a SimMIM train step (the GPU
  machines have no TensorFlow). The gradient is the loss's: finite and nonzero for every parameter (SimMIM
  freezes none and leaves none unused), and equal to a central difference on the mask token."""
  assert_runs_without_tensorflow("""
      import jax, jax.numpy as jnp
      from simmim_jax import models, masking, losses
      enc = models.create_encoder("vit_test_tiny")
      model = models.SimMIM(encoder=enc, encoder_stride=enc.output_stride)
      x = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
      m = masking.random_mask(jax.random.key(0), 2, input_size=32, mask_patch_size=8, model_patch_size=4,
                              mask_ratio=0.6)
      v = model.init(jax.random.key(0), x, m)
      loss_of = jax.jit(lambda p: model.apply({"params": p}, x, m)["loss"])
      grads = jax.grad(loss_of)(v["params"])
      for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert bool(jnp.isfinite(g).all()) and float(jnp.abs(g).max()) > 0, jax.tree_util.keystr(path)
      token, i = v["params"]["encoder"]["mask_token"], int(jnp.argmax(jnp.abs(grads["encoder"]["mask_token"])))
      def shifted(step):  # the parameters with the mask token's i-th coordinate moved by `step`
        params = jax.tree.map(lambda a: a, v["params"])
        params["encoder"]["mask_token"] = token.ravel().at[i].add(step).reshape(token.shape)
        return params
      numeric = float(loss_of(shifted(1e-3)) - loss_of(shifted(-1e-3))) / 2e-3  # the L1 loss has kinks: small step
      analytic = float(grads["encoder"]["mask_token"].ravel()[i])
      assert abs(numeric - analytic) < 1e-2 * abs(analytic), (numeric, analytic)
      # The optimizer, sharding, checkpointing and the train step too.
      from simmim_jax.storage import checkpoint
      from simmim_jax.configs import default_config
      from simmim_jax.train import optim, pretrain, sharding
      config = default_config.get_config()
      config.model.name, config.img_size, config.mask_patch_size = "vit_test_tiny", 32, 8
      config.total_steps, config.global_batch_size = 2, 2
      model = pretrain.build_model(config)
      tx, schedule = optim.create_optimizer(config)
      state = pretrain.init_train_state(model, tx, jax.random.key(0))
      step = jax.jit(pretrain.make_train_step(config, model, tx, schedule))
      state, metrics = step(state, x, jax.random.key(1))
      assert int(state.step) == 1 and bool(jnp.isfinite(metrics["loss"]))
      """)
