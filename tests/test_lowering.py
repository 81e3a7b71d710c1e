"""Every train step lowers for CUDA GPUs and TPUs, from this CPU-only machine.

`jax.export` lowers a jitted function for platforms that are not present. The steps are the real ones (each
recipe's `build_step`, as `simmim-pretrain`, `simmim-finetune` and `simmim-linear-probe` jit them), on a data x fsdp mesh of the 8 fake CPU devices (tests/conftest.py) with the real shardings, in
bfloat16, with abstract inputs only (`jax.ShapeDtypeStruct`s, state from `jax.eval_shape`): nothing is
materialized. Catches what the CPU tests cannot: an op or a sharding the GPU / TPU lowering rejects.

The full matrix (ViT-B/16 224, Swin-B 192 window 6, SwinV2-B 192 window 12; FSDP; remat on and off; cuda and
tpu; the dot_product_attention path for cuda) takes about 4 minutes on a 2-core CPU: the default suite lowers
three cases (about 20 s), the rest run under `-m slow`. The cuda lowering of attention_impl="dot_product_attention"
is its XLA form: the implementation is chosen at trace time, on this CPU host (models/layers.py); the cuDNN
kernel cannot be lowered without a CUDA jaxlib.
"""

import time

import jax
import ml_collections
import pytest

from simmim_jax import configs, models
from simmim_jax.train import downstream, finetune, linear_probe, pretrain, sharding

NUM_DEVICES = 8
MESH = dict(data=2, fsdp=4)
PLATFORMS = ("cuda", "tpu")
slow = pytest.mark.slow


def load_config(name: str) -> ml_collections.ConfigDict:
  return configs.load(name)


def devices():
  if jax.device_count() < NUM_DEVICES:
    pytest.skip(f"needs {NUM_DEVICES} devices (XLA_FLAGS=--xla_force_host_platform_device_count, conftest.py)")
  return jax.devices()[:NUM_DEVICES]


def common(config, remat=False, attention_impl=None):
  with config.unlocked():
    config.dtype = "bfloat16"
    config.mesh.data, config.mesh.fsdp = MESH["data"], MESH["fsdp"]
    config.global_batch_size = 16
    config.model.remat = remat
    if attention_impl:
      config.model.attention_impl = attention_impl
  return config


def pretrain_step(config_path, remat=False, attention_impl=None):
  config = common(load_config(config_path), remat, attention_impl)
  setup = pretrain.build_step(config, sharding.create_mesh(config.mesh, devices()))
  return setup.train_step, setup.abstract_inputs()


def resolved(config):
  with config.unlocked():
    config.pretrained = ""
    config.num_classes, config.num_train_images = 1000, 1281167
    config.model = ml_collections.ConfigDict(downstream.resolve_model_fields(config))
  return config


def finetune_step(config_path, remat=False):
  """The fine-tuning step `simmim-finetune` runs (`finetune.build_step`; random init, 1000 classes)."""
  config = resolved(common(load_config(config_path), remat))
  setup = finetune.build_step(config, sharding.create_mesh(config.mesh, devices()))
  return setup.train_step, setup.abstract_inputs()


def linear_probe_step(config_path):
  """The linear-probe step `simmim-linear-probe` runs (`linear_probe.build_step`; encoder params replicated)."""
  config = resolved(common(load_config(config_path)))
  blocks = tuple(int(b) for b in config.probe_blocks)
  encoder = downstream.build_encoder(config.model.to_dict(), config.img_size, models.DTYPES[config.dtype])
  setup, _, _ = linear_probe.build_step(config, sharding.create_mesh(config.mesh, devices()), encoder, blocks)
  return setup.train_step, setup.abstract_inputs()


# name -> builder. Names say the step, the model and the options; the platform is the second id.
CASES = {
    "pretrain-vit_b16_224": lambda: pretrain_step("pretrain/vit_base_800ep"),
    "pretrain-vit_b16_224-remat": lambda: pretrain_step("pretrain/vit_base_800ep", remat=True),
    "pretrain-swin_b_192_w6": lambda: pretrain_step("pretrain/swin_base_800ep"),
    "pretrain-swin_b_192_w6-remat": lambda: pretrain_step("pretrain/swin_base_800ep", remat=True),
    "pretrain-swinv2_b_192_w12": lambda: pretrain_step("pretrain/swinv2_base_800ep"),
    "pretrain-swinv2_b_192_w12-remat": lambda: pretrain_step("pretrain/swinv2_base_800ep", remat=True),
    "finetune-vit_b16_224": lambda: finetune_step("finetune/vit_base_800ep"),
    "finetune-swin_b_224_w7": lambda: finetune_step("finetune/swin_base_224_800ep"),
    "linear_probe-vit_b16_224": lambda: linear_probe_step("linear_probe/vit_base"),
}
# jax.nn.dot_product_attention (attention_impl): lowered for CUDA, where it matters.
DPA_CASES = {
    f"{name}-dot_product_attention": (lambda path=path: pretrain_step(path, attention_impl="dot_product_attention"))
    for name, path in (("pretrain-vit_b16_224", "pretrain/vit_base_800ep"),
                       ("pretrain-swin_b_192_w6", "pretrain/swin_base_800ep"),
                       ("pretrain-swinv2_b_192_w12", "pretrain/swinv2_base_800ep"))
}
# In the default suite (about 10 s); every other case is marked slow.
FAST = {("pretrain-vit_b16_224", "cuda"), ("linear_probe-vit_b16_224", "tpu")}


def params():
  pairs = [(name, platform) for name in CASES for platform in PLATFORMS] + [(name, "cuda") for name in DPA_CASES]
  return [pytest.param(name, platform, id=f"{name}-{platform}", marks=() if (name, platform) in FAST else (slow,))
          for name, platform in pairs]


@pytest.mark.parametrize("name, platform", params())
def test_train_step_lowers(name, platform):
  build = {**CASES, **DPA_CASES}[name]
  step, args = build()
  start = time.perf_counter()
  try:
    exported = jax.export.export(step, platforms=(platform,))(*args)
  except Exception as e:  # pylint: disable=broad-except
    pytest.fail(f"the {name} step does not lower for {platform}: {type(e).__name__}: {e}")
  seconds = time.perf_counter() - start
  assert exported.platforms == (platform,), name
  assert exported.nr_devices == NUM_DEVICES, f"{name} on {platform}: {exported.nr_devices} devices"
  # The real shardings are in the module (Shardy): the data x fsdp mesh, the batch split over both axes
  # and (FSDP) parameters split over "fsdp".
  module = exported.mlir_module()
  assert '@mesh = <["data"=2, "fsdp"=4]>' in module, f"{name} on {platform}: no data x fsdp mesh"
  assert '{"data", "fsdp"}' in module, f"{name} on {platform}: the batch is not split over the mesh"
  if name.startswith(("pretrain", "finetune")):
    assert '[{"fsdp"}, {}]' in module or '[{}, {"fsdp"}]' in module, f"{name} on {platform}: no FSDP parameter"
  print(f"{name} on {platform}: exported in {seconds:.1f} s")
