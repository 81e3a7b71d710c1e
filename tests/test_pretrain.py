"""The jitted train step: learns, is topology-independent, accumulates exactly; config validation."""


import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simmim_jax.train import optim, pretrain, sharding
from helpers import fixed_images, tiny_config


def build(config, devices):
  mesh = sharding.create_mesh(config.mesh, devices)
  model = pretrain.build_model(config)
  tx, schedule = optim.create_optimizer(config)
  abstract = jax.eval_shape(lambda k: pretrain.init_train_state(model, tx, k), jax.random.key(0))
  state_sh = sharding.state_shardings(abstract, mesh, config.mesh.fsdp_min_size)
  state = jax.jit(lambda k: pretrain.init_train_state(model, tx, k), out_shardings=state_sh)(jax.random.key(0))
  step = jax.jit(pretrain.make_train_step(config, model, tx, schedule),
                 in_shardings=(state_sh, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
                 out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))
  return state, step, sharding.batch_sharding(mesh)


def run_steps(config, devices, images, num_steps):
  state, step, batch_sh = build(config, devices)
  key = jax.random.key(42)
  losses = []
  for _ in range(num_steps):
    state, metrics = step(state, jax.device_put(images, batch_sh), key)
    losses.append(float(jax.block_until_ready(metrics)["loss"]))  # block each step (CPU mesh)
  return losses, state, metrics


def test_train_step_lowers_the_loss_on_a_fixed_batch():
  config = tiny_config(50, warmup_steps=0, **{"optimizer.base_lr": 2e-2})
  losses, state, metrics = run_steps(config, jax.devices()[:1], fixed_images().astype(np.float32), 40)
  assert np.mean(losses[-5:]) < 0.85 * np.mean(losses[:5]), losses
  assert int(state.step) == 40
  assert set(metrics) >= {"loss", "grad_norm", "lr"} and float(metrics["grad_norm"]) > 0


def test_eight_devices_give_the_same_losses_as_one():
  """The same global batch on a data x fsdp mesh of 8 fake CPU devices and on 1 device: the masks come
  from fold_in(key, step) over the global batch, so only float summation order may differ (rtol 1e-5)."""
  images = fixed_images().astype(np.float32)
  one, state_one, _ = run_steps(tiny_config(), jax.devices()[:1], images, 3)
  eight, state_eight, _ = run_steps(tiny_config(**{"mesh.data": 4, "mesh.fsdp": 2}), jax.devices()[:8], images, 3)
  np.testing.assert_allclose(eight, one, rtol=1e-5)
  chex.assert_trees_all_close(jax.device_get(state_eight.params), jax.device_get(state_one.params),
                              rtol=1e-4, atol=1e-6)


def test_fsdp_shards_large_parameters():
  config = tiny_config(**{"mesh.data": 2, "mesh.fsdp": 4, "mesh.fsdp_min_size": 1024})
  state, _, _ = build(config, jax.devices()[:8])
  qkv = state.params["encoder"]["blocks_0"]["attn"]["qkv"]["kernel"]  # [32, 96]: 3,072 elements
  assert qkv.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
  assert qkv.addressable_shards[0].data.shape == (32, 24)
  mu = state.opt_state[1][0].mu["encoder"]["blocks_0"]["attn"]["qkv"]["kernel"]  # AdamW state too
  assert mu.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
  bias = state.params["encoder"]["blocks_0"]["attn"]["q_bias"]
  assert bias.sharding.spec == jax.sharding.PartitionSpec()  # small: replicated


def test_gradient_accumulation_equals_the_full_batch():
  """2 micro-batches of 8 = one batch of 16 (same masks, same lr scale; no dropout)."""
  images = fixed_images().astype(np.float32)
  full, state_full, _ = run_steps(tiny_config(global_batch_size=16), jax.devices()[:1], images, 2)
  accumulated, state_acc, _ = run_steps(
      tiny_config(global_batch_size=8, **{"optimizer.accumulation_steps": 2}), jax.devices()[:1], images, 2)
  np.testing.assert_allclose(accumulated, full, rtol=1e-5)
  chex.assert_trees_all_close(jax.device_get(state_acc.params), jax.device_get(state_full.params),
                              rtol=1e-4, atol=1e-6)


def test_train_step_compiles_once():
  config = tiny_config()
  state, step, batch_sh = build(config, jax.devices()[:1])
  images = jax.device_put(fixed_images().astype(np.float32), batch_sh)
  for _ in range(3):
    state, metrics = step(state, images, jax.random.key(0))
  jax.block_until_ready(metrics)
  assert step._cache_size() == 1


@pytest.mark.parametrize("changes, message", [
    ({"model.name": "vit_nonexistent"}, "vit_nonexistent"),
    ({"mask_patch_size": 12}, "mask_patch_size=12"),
    ({"mask_ratio": 1.5}, "mask_ratio=1.5"),
    ({"global_batch_size": 12}, "global_batch_size=12"),
    ({"dtype": "float16"}, "config.dtype='float16'"),
    ({"data.source": "hdf5"}, "config.data.source='hdf5'"),
    ({"optimizer.schedule": "linear"}, "config.optimizer.schedule='linear'"),
    ({"mesh.data": 3, "mesh.fsdp": 1}, "data=3"),
])
def test_invalid_configs_are_named_before_compiling(changes, message, tmp_path):
  with pytest.raises(pretrain.ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
    pretrain.validate_config(tiny_config(**{"mesh.data": -1, **changes}))  # over the 8 devices
