"""Every pretraining config builds and validates; the real ViT-B / Swin-B steps compile for a sharded mesh."""

import functools
import importlib

import jax
import numpy as np
import pytest

from simmim_jax.tools import aot
from simmim_jax import configs
from simmim_jax.train import optim, pretrain, sharding

PRETRAIN_CONFIGS = [n for n in configs.names() if n.startswith("pretrain/") or n in ("demo", "demo_swin")]


def load(name):
  return configs.load(name)


@pytest.mark.parametrize("path", PRETRAIN_CONFIGS, ids=str)
def test_pretrain_config_validates_and_documents_its_run(path, tmp_path):
  config = load(path)
  # ImageNet is not prepared on a test machine (validate_config refuses an unprepared tfds dataset,
  # tested in test_robustness.py): check everything else with the offline demo source.
  config.data.source = "demo"
  # The official batch of 2048 (and SwinV2-G's 3 B parameters at any batch) need a pod: the memory estimate
  # against this machine is tested in test_memory_estimate.py. One image per device checks everything else.
  config.global_batch_size, config.mesh.fsdp = jax.device_count(), jax.device_count()
  pretrain.validate_config(config, check_memory=False)
  docstring = open(configs.resolve(path)).read().split('"""')[1]
  assert "simmim-pretrain --config=" + str(path) in docstring  # the run command
  assert "Expected" in docstring


@pytest.mark.parametrize("path, encoder, img_size, steps, peak_lr", [
    ("pretrain/vit_base_800ep", "vit_base_patch16", 224, 500_000, 4e-4),
    # Cosine with timm's warmup_prefix=False counts from step 0: at the end of warmup (t = T/10) the lr is
    # min + (peak - min) (1 + cos(pi / 10)) / 2 = 4e-5 + 7.6e-4 * 0.97553 = 7.814e-4, not the peak 8e-4.
    ("pretrain/swin_base_100ep", "swin_base_patch4_window6", 192, 62_500, 7.81402e-4),
    ("pretrain/swin_base_800ep", "swin_base_patch4_window6", 192, 500_000, 4e-4),
    ("pretrain/swin_large_800ep", "swin_large_patch4_window12", 192, 500_000, 4e-4),
    ("pretrain/swinv2_base_800ep", "swinv2_base_patch4_window12", 192, 500_000, 4e-4),
])
def test_official_values_at_batch_2048(path, encoder, img_size, steps, peak_lr):
  config = load(path)
  assert (config.model.name, config.img_size, config.global_batch_size) == (encoder, img_size, 2048)
  assert (config.mask_patch_size, config.mask_ratio) == (32, 0.6)
  assert (config.optimizer.weight_decay, config.optimizer.clip_grad_norm) == (0.05, 5.0)
  total, warmup, per_epoch = optim.steps_from_config(config)
  assert (total, warmup, per_epoch) == (steps, 10 * 625, 625)
  np.testing.assert_allclose(float(optim.create_schedule(config)(warmup)), peak_lr, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["pretrain/vit_base_800ep", "pretrain/swin_base_800ep"])
def test_real_model_train_step_compiles_for_an_fsdp_mesh_of_8(path):
  """AOT: the full-size ViT-B / Swin-B step, sharded FSDP over 8 fake devices, without allocating it."""
  config = load(path)
  config.global_batch_size = 8
  config.mesh.data, config.mesh.fsdp = 1, 8
  setup = pretrain.build_step(config, sharding.create_mesh(config.mesh, jax.devices()[:8]))
  memory = aot.memory_summary(aot.compile_step(setup))
  abstract = setup.abstract_state
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
  # Params + AdamW moments, sharded 8 ways (small arrays stay replicated): about 1/8 per device.
  assert state_bytes / 8 <= memory["argument_size_in_bytes"] < state_bytes / 8 * 1.1 + 8 * 3 * 192 * 192 * 4


FINETUNE_CONFIGS = [n for n in configs.names() if n.startswith("finetune/") and n != "finetune/demo"]


@pytest.mark.parametrize("path", FINETUNE_CONFIGS, ids=str)
def test_official_finetune_configs_reproduce_the_official_runs(path):
  """16 GPUs x 128: weight-decay groups as the official code, Mixup / CutMix per 128 images (timm per GPU),
  validation every epoch of ImageNet-1K (main_finetune.py)."""
  from simmim_jax.configs import default_config
  from simmim_jax.train import mixup
  config = load(path)
  assert config.global_batch_size == 2048 and config.optimizer.no_decay == "official"
  mixup.check_groups(config.augment.mixup_groups, config.global_batch_size)
  assert config.global_batch_size // config.augment.mixup_groups == 128
  assert config.eval_every_steps == default_config.IMAGENET_TRAIN_IMAGES // config.global_batch_size == 625


@pytest.mark.parametrize("path", ["demo", "demo_swin", "finetune/demo"])
def test_demo_configs_keep_the_intended_grouping_and_one_mixup_group(path):
  config = load(path)
  assert config.optimizer.no_decay == "intended"
  assert config.get("augment", {"mixup_groups": 1})["mixup_groups"] == 1


# Each official recipe, by name, pinned to the values of its yaml: a change of a family function that moves
# one is caught here (the run commands and docstrings are checked above).
@pytest.mark.parametrize("name, variant, model, img_size, extra", [
    ("pretrain/vit_base_800ep", "vit_base,800ep", dict(name="vit_base_patch16", drop_path_rate=0.1), 224, {}),
    ("pretrain/swin_base_100ep", "swin_base,100ep", dict(name="swin_base_patch4_window6", drop_path_rate=0.0),
     192, {"optimizer.schedule": "cosine", "optimizer.base_lr": 2e-4, "optimizer.min_lr": 1e-5}),
    ("pretrain/swin_large_800ep", "swin_large,800ep", dict(name="swin_large_patch4_window12", remat=False), 192,
     {"optimizer.multistep_epochs": (700,)}),
    ("pretrain/swinv2_base_800ep", "swinv2_base,800ep", dict(name="swinv2_base_patch4_window12"), 192,
     {"norm_target_window": 47, "dtype": "float32"}),
    ("pretrain/swinv2_huge_800ep", "swinv2_huge,800ep", dict(name="swinv2_huge_patch4_window12", remat=True), 192,
     {"norm_target_window": 47, "dtype": "bfloat16", "mesh.fsdp": 8}),
    ("pretrain/swinv2_giant_800ep", "swinv2_giant,800ep", dict(name="swinv2_giant_patch4_window12",
                                                              scan_blocks=True), 192, {"mesh.fsdp": 64}),
    ("finetune/vit_base_800ep", "vit_base,224,800ep", dict(name="vit_base_patch16", use_rel_pos_bias=True), 224,
     {"optimizer.layer_decay": 0.65, "head_init_scale": 0.001}),
    ("finetune/swin_base_192_100ep", "swin_base,192,100ep", dict(window_size=6, drop_path_rate=0.1), 192,
     {"optimizer.layer_decay": 0.9, "head_init_scale": 1.0}),
    ("finetune/swin_base_224_800ep", "swin_base,224,800ep", dict(window_size=7), 224, {"optimizer.layer_decay": 0.8}),
    ("finetune/swin_large_224_800ep", "swin_large,224,800ep", dict(window_size=14, drop_path_rate=0.2), 224,
     {"optimizer.layer_decay": 0.7}),
    ("finetune/swinv2_base_224_800ep", "swinv2_base,224,800ep", dict(pretrained_window_sizes=(12, 12, 12, 6)), 224,
     {"optimizer.layer_decay": 0.75, "optimizer.warmup_prefix": False}),
    ("linear_probe/vit_base", "vit_base", dict(name="vit_base_patch16"), 224, {"probe_blocks": (8,)}),
    ("demo_swin", "swin", dict(name="swin_tiny_patch4_window7", window_size=4), 32, {"optimizer.base_lr": 2e-3}),
])
def test_each_recipe_name_is_a_variant_of_its_family_with_its_yaml_values(name, variant, model, img_size, extra):
  config = load(name)
  family = importlib.import_module("simmim_jax.configs." + (name.split("/")[0] if "/" in name else "demo"))
  assert config.to_dict() == family.get_config(variant).to_dict()
  assert {key: config.model[key] for key in model} == model and config.img_size == img_size
  assert {key: functools.reduce(getattr, key.split("."), config) for key in extra} == extra


@pytest.mark.parametrize("family, variant", [("pretrain", "swin_base,400ep"), ("pretrain", "vit_huge,800ep"),
                                             ("finetune", "swin_base,192,800ep,x"), ("finetune", "vit_base,192,800ep"),
                                             ("linear_probe", "swin_base"), ("demo", "vit_base")])
def test_an_unknown_family_variant_is_refused_with_the_known_ones(family, variant):
  with pytest.raises(ValueError, match="config variant .*(vit_base|vit)"):
    importlib.import_module(f"simmim_jax.configs.{family}").get_config(variant)


def test_a_family_builds_variants_no_recipe_names():
  """Variant arguments combine: Swin-L pretrained with the 100-epoch schedule of the Swin-B ablation."""
  from simmim_jax.configs import pretrain  # pylint: disable=g-import-not-at-top
  config = pretrain.get_config("swin_large,100ep")
  assert (config.model.name, config.num_epochs, config.optimizer.schedule) == ("swin_large_patch4_window12", 100,
                                                                               "cosine")
