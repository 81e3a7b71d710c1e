"""Ahead-of-time compilation of a recipe's real step for a target mesh, without the hardware (`simmim-aot`
compiles the pretraining step of a config).

Catches sharding and shape errors of big configs early (MaxText's `train_compile`): the train state and
batch are abstract (`jax.ShapeDtypeStruct`s with shardings), nothing is allocated, and XLA reports the
per-device memory the step needs. On a CPU machine, fake devices stand in for the target's chips:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 simmim-aot \\
      --config=pretrain/vit_base_800ep --config.global_batch_size=64 --config.mesh.fsdp=8
"""

from simmim_jax import run


def compile_step(setup: run.StepSetup):
  """Lowers and compiles a recipe's step (e.g. `pretrain.build_step(config, mesh)`) on its abstract inputs;
  returns the Compiled object. Nothing is allocated."""
  return setup.train_step.lower(*setup.abstract_inputs()).compile()


def memory_summary(compiled) -> dict[str, int]:
  """Bytes per device from XLA's memory analysis (arguments, outputs, temporaries, generated code)."""
  analysis = compiled.memory_analysis()
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes", "alias_size_in_bytes")
  return {f: int(getattr(analysis, f, 0) or 0) for f in fields}
