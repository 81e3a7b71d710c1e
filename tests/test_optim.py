"""Optimizer recipe: timm-semantics schedules (hand-computed values), lr scaling, weight-decay mask."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from simmim_jax import models, optim
from simmim_jax import default_config


def configs_pretrain(name):
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "pretrain" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_cosine_schedule_values_by_hand():
  lr = optim.learning_rate_schedule(schedule="cosine", peak_lr=1e-3, warmup_lr=1e-6, min_lr=1e-5,
                                    total_steps=100, warmup_steps=10)
  expected = {
      0: 1e-6,                                  # warmup starts at warmup_lr
      5: 1e-6 + 5 * (1e-3 - 1e-6) / 10,         # = 5.005e-4, linear warmup
      10: 1e-5 + 0.495e-3 * (1 + 0.9510565163),  # cos(pi * 10 / 100): the cosine counts from step 0
      50: 1e-5 + 0.495e-3,                      # cos(pi / 2) = 0
      99: 1e-5 + 0.495e-3 * (1 - 0.9995065604),  # cos(pi * 99 / 100)
      100: 1e-5,
      150: 1e-5,                                # min_lr after the end
  }
  for step, value in expected.items():
    np.testing.assert_allclose(float(lr(step)), value, rtol=1e-5, err_msg=f"step {step}")


def test_multistep_schedule_values_by_hand():
  lr = optim.learning_rate_schedule(schedule="multistep", peak_lr=4e-4, warmup_lr=2e-6, min_lr=0.0,
                                    total_steps=80, warmup_steps=10, milestones=(70,), gamma=0.1)
  expected = {0: 2e-6, 9: 2e-6 + 9 * 3.98e-5, 10: 4e-4, 69: 4e-4, 70: 4e-5, 79: 4e-5}
  for step, value in expected.items():
    np.testing.assert_allclose(float(lr(step)), value, rtol=1e-5, err_msg=f"step {step}")


def test_official_vit_base_800ep_schedule_at_batch_2048():
  """800 epochs x 625 steps; lr x 2048/512 = 4: peak 4e-4, warmup from 2e-6 over 6,250 steps, x0.1 at
  epoch 700 = step 437,500."""
  config = configs_pretrain("vit_base_800ep")
  assert optim.steps_from_config(config) == (500_000, 6_250, 625)
  lr = optim.create_schedule(config)
  np.testing.assert_allclose(float(lr(0)), 2e-6, rtol=1e-5)
  np.testing.assert_allclose(float(lr(6_250)), 4e-4, rtol=1e-5)
  np.testing.assert_allclose(float(lr(437_499)), 4e-4, rtol=1e-5)
  np.testing.assert_allclose(float(lr(437_500)), 4e-5, rtol=1e-5)


def test_lr_scaling_counts_accumulated_images():
  config = default_config.get_config()
  config.global_batch_size = 256
  config.optimizer.accumulation_steps = 4
  assert optim.lr_scale(config.optimizer, config.global_batch_size) == 2.0  # 256 * 4 / 512
  config.optimizer.lr_scaling_batch = 0
  assert optim.lr_scale(config.optimizer, config.global_batch_size) == 1.0


def test_total_steps_wins_over_epochs():
  config = default_config.get_config()
  config.total_steps, config.warmup_steps = 1234, 56
  assert optim.steps_from_config(config)[:2] == (1234, 56)


@pytest.fixture(scope="module")
def simmim_params():
  encoder = models.create_encoder("vit_test_tiny", use_abs_pos_emb=True)
  model = models.SimMIM(encoder=encoder, encoder_stride=4)
  return model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 8, 8), jnp.int32))["params"]


def test_weight_decay_mask(simmim_params):
  mask = {"/".join(k): v for k, v in traverse_util.flatten_dict(optim.weight_decay_mask(simmim_params)).items()}
  decayed = {k for k, v in mask.items() if v}
  assert decayed == {k for k in mask if k.endswith("kernel")}  # exactly the Dense / Conv kernels
  for name in ["encoder/cls_token", "encoder/mask_token", "encoder/pos_embed",
               "encoder/rel_pos_bias/relative_position_bias_table", "encoder/blocks_0/gamma_1",
               "encoder/blocks_0/attn/q_bias", "encoder/blocks_0/norm1/scale", "decoder/bias"]:
    assert mask[name] is False, name
  assert mask["encoder/blocks_0/attn/qkv/kernel"] and mask["decoder/kernel"]


def test_swin_v2_position_bias_mlp_and_logit_scale_are_not_decayed():
  params = {"blocks_0": {"attn": {"cpb_mlp_0": {"kernel": np.ones((2, 8))}},
                         "logit_scale": np.ones((2, 1, 1))},
            "cpb_mlp": {"kernel": np.ones((2, 8))}, "proj": {"kernel": np.ones((4, 4))}}
  mask = optim.weight_decay_mask(params)
  assert mask["blocks_0"]["attn"]["cpb_mlp_0"]["kernel"] is True  # only a module named exactly cpb_mlp
  assert mask["cpb_mlp"]["kernel"] is False and mask["blocks_0"]["logit_scale"] is False
  assert mask["proj"]["kernel"] is True


def test_adamw_decays_only_masked_parameters(simmim_params):
  config = default_config.get_config()
  config.total_steps, config.warmup_steps = 10, 0
  config.global_batch_size = 512
  config.optimizer.base_lr = 0.1
  config.optimizer.weight_decay = 0.5
  tx, schedule = optim.create_optimizer(config)
  grads = jax.tree.map(jnp.zeros_like, simmim_params)
  updates, _ = tx.update(grads, tx.init(simmim_params), simmim_params)
  lr = float(schedule(0))
  mask = optim.weight_decay_mask(simmim_params)
  for (path, update), decay, param in zip(traverse_util.flatten_dict(updates).items(),
                                          jax.tree.leaves(mask), jax.tree.leaves(simmim_params)):
    expected = -lr * 0.5 * np.asarray(param) if decay else np.zeros_like(param)  # decoupled: lr * wd * p
    np.testing.assert_allclose(update, expected, rtol=1e-5, atol=1e-9, err_msg="/".join(path))


def test_gradient_clipping_at_global_norm_5():
  """Two updates with gradients of very different norms: the result matches clip(5) + AdamW and differs
  from unclipped AdamW (a single Adam step is scale-invariant, so one update would prove nothing)."""
  import optax
  config = default_config.get_config()
  config.total_steps, config.warmup_steps = 10, 0
  config.optimizer.weight_decay = 0.0
  tx, schedule = optim.create_optimizer(config)
  params = {"w": jnp.ones((4, 4))}
  grads = [{"w": jnp.full((4, 4), 100.0)}, {"w": jnp.full((4, 4), -1.0)}]  # norms 400 and 4

  def run(transform):
    state, p = transform.init(params), params
    for g in grads:
      updates, state = transform.update(g, state, p)
      p = optax.apply_updates(p, updates)
    return p["w"] - params["w"]

  adamw = optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
  np.testing.assert_allclose(run(tx), run(optax.chain(optax.clip_by_global_norm(5.0), adamw)), rtol=1e-6)
  assert not np.allclose(run(tx), run(adamw), rtol=0.1)


def _first_probe_update(name):
  from simmim_jax import finetune_config
  config = finetune_config.get_linear_probe_config()
  config.global_batch_size, config.total_steps, config.warmup_steps = 256, 10, 0
  config.optimizer.update(name=name, base_lr=0.5, warmup_lr=0.5, min_lr=0.5)  # lr 0.5 at every step
  tx, _ = optim.create_lars_optimizer(config)
  params = {"kernel": jnp.full((4, 2), 0.01), "bias": jnp.zeros(2)}
  grads = {"kernel": jnp.ones((4, 2)), "bias": jnp.ones(2)}
  updates, _ = tx.update(grads, tx.init(params), params)
  return updates


def test_lars_probe_steps_are_relative_to_the_weight_norm_and_sgd_steps_are_not():
  lars, sgd = _first_probe_update("lars"), _first_probe_update("sgd")
  # LARS (MAE): lr x 0.001 x |w| / |g| on the kernel; the 1-D bias takes plain lr x g.
  np.testing.assert_allclose(lars["kernel"], -0.5 * 0.001 * 0.01, rtol=1e-5)
  np.testing.assert_allclose(lars["bias"], -0.5, rtol=1e-6)
  np.testing.assert_allclose(sgd["kernel"], -0.5, rtol=1e-6)
  np.testing.assert_allclose(sgd["bias"], -0.5, rtol=1e-6)
  with pytest.raises(ValueError, match="optimizer.name"):
    _first_probe_update("adam")
