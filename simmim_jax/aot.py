"""Ahead-of-time compilation of the real pretraining step for a target mesh, without the hardware.

Catches sharding and shape errors of big configs early (MaxText's `train_compile`): the train state and
batch are abstract (`jax.ShapeDtypeStruct`s with shardings), nothing is allocated, and XLA reports the
per-device memory the step needs. On a CPU machine, fake devices stand in for the target's chips:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m simmim_jax.aot \\
      --config=configs/pretrain/vit_base_800ep.py --config.global_batch_size=64 --config.mesh.fsdp=8
"""

import sys

import jax
import ml_collections
from absl import flags

from simmim_jax import optim, pretrain, sharding


def compile_train_step(config: ml_collections.ConfigDict, devices=None):
  """Lowers and compiles the train step of `config` on a mesh of `devices`; returns the Compiled object."""
  step, args = abstract_train_step(config, devices)
  return step.lower(*args).compile()


def abstract_train_step(config: ml_collections.ConfigDict, devices=None):
  """(the jitted train step of `config` on a mesh of `devices`, its abstract (state, images, key) arguments
  with their shardings): what `compile_train_step` compiles and `jax.export` can lower for other platforms."""
  devices = jax.devices() if devices is None else devices
  mesh = sharding.create_mesh(config.mesh, devices)
  model = pretrain.build_model(config)
  tx, schedule = optim.create_optimizer(config)
  abstract_state = jax.eval_shape(lambda key: pretrain.init_train_state(model, tx, key), jax.random.key(0))
  state_shardings = sharding.state_shardings(abstract_state, mesh, config.mesh.fsdp_min_size)
  images_per_step = config.global_batch_size * config.optimizer.accumulation_steps
  images = jax.ShapeDtypeStruct((images_per_step, config.img_size, config.img_size, model.in_chans),
                                jax.numpy.float32, sharding=sharding.batch_sharding(mesh))
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(mesh))
  step = jax.jit(pretrain.make_train_step(config, model, tx, schedule),
                 in_shardings=(state_shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
                       state_shardings)
  return step, (state, images, key)


def memory_summary(compiled) -> dict[str, int]:
  """Bytes per device from XLA's memory analysis (arguments, outputs, temporaries, generated code)."""
  analysis = compiled.memory_analysis()
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes", "alias_size_in_bytes")
  return {f: int(getattr(analysis, f, 0) or 0) for f in fields}


def main(argv):
  del argv
  config = flags.FLAGS.config
  try:
    pretrain.validate_config(config, "", check_data=False)
  except pretrain.ConfigError as e:
    print(f"simmim_jax.aot: configuration error: {' '.join(str(e).split())}", file=sys.stderr)
    sys.exit(2)
  compiled = compile_train_step(config)
  print(f"compiled the {config.model.name} train step for {jax.device_count()} devices "
        f"(mesh data={config.mesh.data} fsdp={config.mesh.fsdp}); per-device bytes: {memory_summary(compiled)}")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Path to a pretraining config.")
  app.run(main)
