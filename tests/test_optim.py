"""Optimizer recipes: timm-semantics schedules (hand-computed values), lr scaling, weight-decay groups, layer-wise
lr decay of fine-tuning."""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from simmim_jax.configs import default_config, finetune_config
from simmim_jax import models
from simmim_jax.train import downstream, optim, validation
from simmim_jax.models import classifier


def configs_pretrain(name):
  from simmim_jax import configs
  return configs.load(f"pretrain/{name}")


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


def timm_cosine_lr(t, *, peak, warmup_lr, min_lr, total, warmup, warmup_prefix):
  """timm's CosineLRScheduler._get_lr (timm/scheduler/cosine_lr.py lines 80-108 at
  huggingface/pytorch-image-models@16664ea) with the arguments microsoft/Swin-Transformer's build_scheduler
  passes (lr_scheduler.py lines 16-33 at HEAD f82860b): t_initial = total - warmup if WARMUP_PREFIX else total,
  cycle_mul 1, cycle_decay 1, cycle_limit 1, k_decay 1, warmup_t = warmup, warmup_lr_init = WARMUP_LR."""
  t_initial = total - warmup if warmup_prefix else total
  if t < warmup:
    return warmup_lr + t * (peak - warmup_lr) / warmup
  if warmup_prefix:
    t = t - warmup
  cycle, t_curr = t // t_initial, t - t_initial * (t // t_initial)
  if cycle >= 1:  # i < cycle_limit fails: lr_min
    return min_lr
  return min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * t_curr / t_initial))


@pytest.mark.parametrize("warmup_prefix", [False, True])
def test_warmup_prefix_matches_the_official_scheduler_on_the_swinv2_finetune_config(warmup_prefix):
  """finetune/swinv2_base_224_800ep at batch 2048 (lr x4: peak 5e-3, warmup and min 1e-6; 100 epochs of 625
  updates, 20 of warmup): False is the code at the SimMIM merge (5b841aa, 2022-09-25), True the code since
  d19503d (2022-10-05, TRAIN.LR_SCHEDULER.WARMUP_PREFIX = True). The head's group (layer-decay scale 1)."""
  from simmim_jax import configs  # pylint: disable=g-import-not-at-top
  from simmim_jax.train import downstream
  config = configs.load("finetune/swinv2_base_224_800ep")
  assert config.optimizer.warmup_prefix is False  # the config follows the SimMIM merge
  config.num_train_images = default_config.IMAGENET_TRAIN_IMAGES
  config.optimizer.warmup_prefix = warmup_prefix
  encoder = downstream.build_encoder(config.model.to_dict(), config.img_size, jnp.float32)
  _, lr = optim.create_finetune_optimizer(config, encoder)
  official = functools.partial(timm_cosine_lr, peak=5e-3, warmup_lr=1e-6, min_lr=1e-6, total=62_500,
                               warmup=12_500, warmup_prefix=warmup_prefix)
  for step in (0, 1, 6_250, 12_499, 12_500, 12_501, 20_000, 37_500, 50_000, 62_499, 62_500, 70_000):
    np.testing.assert_allclose(float(lr(step)), official(step), rtol=1e-5, atol=1e-10, err_msg=f"step {step}")
  # The numbers: the lr at the end of warmup, and the mean lr of the SimMIM-merge schedule vs HEAD's.
  assert official(12_500) == pytest.approx(5e-3 if warmup_prefix else 4.5226e-3, rel=1e-4)
  mean = lambda prefix: np.mean([timm_cosine_lr(t, peak=5e-3, warmup_lr=1e-6, min_lr=1e-6, total=62_500,
                                                warmup=12_500, warmup_prefix=prefix) for t in range(0, 62_500, 5)])
  assert mean(False) / mean(True) == pytest.approx(0.813, abs=2e-3)


def test_warmup_prefix_is_a_bool_of_the_cosine_schedule():
  from simmim_jax.train import pretrain, validation  # pylint: disable=g-import-not-at-top
  for name in ("demo", "pretrain/swin_base_100ep", "finetune/swinv2_base_224_800ep", "linear_probe/vit_base"):
    from simmim_jax import configs  # pylint: disable=g-import-not-at-top
    assert configs.load(name).optimizer.warmup_prefix is False, name
  config = default_config.get_config()
  config.data.source = "demo"
  del config.optimizer["warmup_prefix"]  # a config file of the user's may give any type
  config.optimizer.warmup_prefix = "True"
  with pytest.raises(validation.ConfigError, match=r"config.optimizer.warmup_prefix='True': use True"):
    pretrain.validate_config(config)
  config = default_config.get_config()
  config.data.source = "demo"
  config.optimizer.warmup_prefix = True
  config.optimizer.schedule, config.optimizer.multistep_epochs = "multistep", (50,)
  with pytest.raises(validation.ConfigError, match="applies to the cosine schedule"):
    pretrain.validate_config(config)


def test_a_config_from_before_warmup_prefix_resumes_with_its_schedule_and_signature():
  """An old workdir's config.json has no optimizer.warmup_prefix: it runs the schedule it ran (False), and the
  checkpoint signature (model fields and image size only) is the same, so its checkpoints restore."""
  from simmim_jax.train import pretrain  # pylint: disable=g-import-not-at-top
  new = default_config.get_config()
  old = ml_collections.ConfigDict(new.to_dict())
  del old.optimizer["warmup_prefix"]
  for step in (0, 1000, 6_250, 40_000, 62_500):
    assert float(optim.create_schedule(old)(step)) == float(optim.create_schedule(new)(step))
  assert pretrain.RECIPE.signature(old) == pretrain.RECIPE.signature(new)
  new.optimizer.warmup_prefix = True
  assert pretrain.RECIPE.signature(old) == pretrain.RECIPE.signature(new)
  assert float(optim.create_schedule(new)(6_250 + 1)) > float(optim.create_schedule(old)(6_250 + 1))


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
  from simmim_jax.configs import finetune_config
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


# ----------------------------------------------------------------------------------------------------
# no_decay="official": the official runs' weight-decay groups, checked against the official rule applied to the
# official parameter names (simmim_jax.storage.convert's mapping), on abstract ViT-B / Swin-B / SwinV2-B.


def _load_config(kind, name):
  from simmim_jax import configs
  return configs.load(f"{kind}/{name}")


def _official_decayed(params, kind, skip_list, skip_keywords):
  """Official names of the decayed parameters under the official rule (microsoft/SimMIM optimizer.py
  get_pretrain_param_groups / get_finetune_param_groups): no decay iff len(shape) == 1, or the name ends with
  ".bias", or it is in skip_list, or check_keywords_in_name(name, skip_keywords)."""
  from simmim_jax.storage import convert
  decayed = set()
  for path, value in traverse_util.flatten_dict(params).items():
    name, layout = convert._key_and_layout(kind, path)
    shape = convert._from_flax(np.broadcast_to(np.float32(0), value.shape), layout).shape  # official shape
    if not (len(shape) == 1 or name.endswith(".bias") or name in skip_list
            or any(keyword in name for keyword in skip_keywords)):
      decayed.add(name)
  return decayed


def _mask_decayed(params, kind, no_decay, stage):
  from simmim_jax.storage import convert
  mask = traverse_util.flatten_dict(optim.weight_decay_mask(params, no_decay=no_decay, stage=stage))
  return {convert._key_and_layout(kind, path)[0] for path, decay in mask.items() if decay}


# no_weight_decay() / no_weight_decay_keywords() of the official encoders (microsoft/SimMIM
# models/vision_transformer.py and swin_transformer.py, the SimMIM Swin subclass adds mask_token;
# microsoft/Swin-Transformer models/swin_transformer_v2.py); SimMIM prefixes both with "encoder." in pretraining.
OFFICIAL_LISTS = {
    "vit": ({"pos_embed", "cls_token"}, set()),
    "swin": ({"absolute_pos_embed"}, {"relative_position_bias_table"}),
    "swinv2": ({"absolute_pos_embed"}, {"cpb_mlp", "logit_scale", "relative_position_bias_table"}),
}


@pytest.mark.parametrize("family, config_name", [("vit", "vit_base_800ep"), ("swin", "swin_base_800ep"),
                                                 ("swinv2", "swinv2_base_800ep")])
def test_official_no_decay_equals_the_official_pretraining_groups(family, config_name):
  from simmim_jax.storage import convert
  from simmim_jax.train import pretrain
  config = _load_config("pretrain", config_name)
  assert config.optimizer.no_decay == "official"
  params = convert.abstract_params(pretrain.build_model(config))
  skip, keywords = OFFICIAL_LISTS[family]
  skip = skip | ({"mask_token"} if family != "vit" else set())  # SwinTransformer(V2)ForSimMIM.no_weight_decay
  expected = _official_decayed(params, "simmim", {"encoder." + s for s in skip}, {"encoder." + k for k in keywords})
  assert _mask_decayed(params, "simmim", "official", "pretrain") == expected
  # The keyword bug at work: what the official run decays beyond the intended grouping.
  extra = expected - _mask_decayed(params, "simmim", "intended", "pretrain")
  if family == "vit":
    assert extra == {"encoder.mask_token", "encoder.rel_pos_bias.relative_position_bias_table"}
  elif family == "swin":
    assert extra and all(name.endswith("attn.relative_position_bias_table") for name in extra)
    assert len(extra) == 24  # one table per Swin-B block
  else:
    assert {name.split(".attn.")[1] for name in extra} == {"cpb_mlp.0.weight", "cpb_mlp.2.weight", "logit_scale"}
    assert len(extra) == 3 * 24


@pytest.mark.parametrize("family, config_name", [("vit", "vit_base_800ep"), ("swin", "swin_base_224_800ep"),
                                                 ("swinv2", "swinv2_base_224_800ep")])
def test_official_no_decay_equals_the_official_finetuning_groups(family, config_name):
  from simmim_jax.storage import convert
  from simmim_jax.train import finetune
  config = _load_config("finetune", config_name)
  assert config.optimizer.no_decay == "official"
  config.num_classes = 1000
  params = convert.abstract_params(downstream.build_classifier(config))
  skip, keywords = OFFICIAL_LISTS[family]
  expected = _official_decayed(params, "classifier", skip, keywords)
  assert _mask_decayed(params, "classifier", "official", "finetune") == expected
  extra = expected - _mask_decayed(params, "classifier", "intended", "finetune")
  if family == "vit":  # no keywords in the fine-tune ViT: every per-block table is decayed
    assert extra == {f"blocks.{i}.attn.relative_position_bias_table" for i in range(12)}
  else:
    assert extra == set()


def test_the_optimizers_apply_the_configured_grouping():
  """Zero gradients: an AdamW update is -lr * wd * p exactly on the decayed parameters. The official ViT
  pretraining decays the mask token, official ViT fine-tuning the per-block tables (through layer decay)."""
  from simmim_jax.storage import convert
  from simmim_jax.train import finetune, pretrain
  from simmim_jax.configs import finetune_config
  config = default_config.get_config()
  config.model.update(name="vit_test_tiny")
  config.img_size, config.total_steps, config.warmup_steps, config.global_batch_size = 32, 10, 0, 512
  config.optimizer.update(base_lr=0.1, weight_decay=0.5)
  ones = lambda model: jax.tree.map(lambda x: jnp.ones(x.shape, x.dtype), convert.abstract_params(model))
  params = ones(pretrain.build_model(config))  # nonzero everywhere (the values do not matter)

  def decayed(tx, params):
    updates = jax.jit(lambda p: tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)[0])(params)
    return {"/".join(k) for k, v in traverse_util.flatten_dict(updates).items() if np.any(np.asarray(v) != 0)}

  intended = decayed(optim.create_optimizer(config)[0], params)
  config.optimizer.no_decay = "official"
  official = decayed(optim.create_optimizer(config)[0], params)
  assert official - intended == {"encoder/mask_token", "encoder/rel_pos_bias/relative_position_bias_table"}
  assert intended < official

  ft = finetune_config.get_config()
  ft.model.update(name="vit_test_tiny")
  ft.img_size, ft.num_classes, ft.total_steps, ft.warmup_steps, ft.global_batch_size = 32, 10, 10, 0, 512
  ft.optimizer.update(base_lr=0.1, weight_decay=0.5)
  model = downstream.build_classifier(ft)
  ft_params = ones(model)
  intended = decayed(optim.create_finetune_optimizer(ft, model.encoder)[0], ft_params)
  ft.optimizer.no_decay = "official"
  official = decayed(optim.create_finetune_optimizer(ft, model.encoder)[0], ft_params)
  assert official - intended == {f"encoder/blocks_{i}/attn/relative_position_bias/relative_position_bias_table"
                                 for i in range(model.encoder.depth)}


def test_unknown_no_decay_is_refused_naming_the_choices():
  config = default_config.get_config()
  config.optimizer.no_decay = "offical"
  with pytest.raises(ValueError, match="no_decay='offical'.*intended.*official"):
    optim.create_optimizer(config)


# ----------------------------------------------------------------------------------------------------
# Layer-wise lr decay (fine-tuning)


def _flat_ids(encoder):
  model = classifier.Classifier(encoder=encoder, num_classes=10)
  size = encoder.img_size
  params = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, size, size, 3)))["params"], jax.random.key(0))
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(optim.layer_ids(params, encoder)).items()}


def test_vit_base_layer_decay_has_the_14_official_layer_ids():
  encoder = models.create_encoder("vit_base_patch16", use_mean_pooling=True, use_rel_pos_bias=True,
                                  use_shared_rel_pos_bias=False)
  ids = _flat_ids(encoder)
  assert optim.num_layer_ids(encoder) == 14 and set(ids.values()) == set(range(14))
  assert ids["encoder/patch_embed/kernel"] == 0 and ids["encoder/cls_token"] == 0
  assert ids["encoder/blocks_0/attn/qkv/kernel"] == 1 and ids["encoder/blocks_11/mlp/fc2/bias"] == 12
  assert ids["encoder/fc_norm/scale"] == 13 and ids["head/kernel"] == 13


def test_swin_base_layer_decay_has_the_26_official_layer_ids():
  encoder = models.create_encoder("swin_base_patch4_window7")
  ids = _flat_ids(encoder)
  assert optim.num_layer_ids(encoder) == 26 and set(ids.values()) == set(range(26))
  assert ids["encoder/patch_embed/proj/kernel"] == 0
  assert ids["encoder/layers_0/blocks_0/norm1/scale"] == 1
  assert ids["encoder/layers_0/downsample/reduction/kernel"] == 2  # = the stage's last block
  assert ids["encoder/layers_2/blocks_17/attn/qkv/kernel"] == 2 + 2 + 17 + 1
  assert ids["encoder/layers_2/downsample/norm/scale"] == 22
  assert ids["encoder/layers_3/blocks_1/mlp/fc1/kernel"] == 24
  assert ids["encoder/norm/scale"] == 25 and ids["head/bias"] == 25


def _first_update_lrs(encoder_name, layer_decay, warmup_steps):
  """|update| of AdamW's first step with unit gradients and no weight decay = each parameter's lr."""
  config = finetune_config.get_config()
  config.model = ml_collections.ConfigDict({"name": encoder_name})
  config.img_size = 32
  config.global_batch_size, config.total_steps, config.warmup_steps = 512, 100, warmup_steps
  config.warmup_epochs = 0  # only warmup_steps counts
  config.optimizer.update(layer_decay=layer_decay, weight_decay=0.0, base_lr=1e-3, warmup_lr=1e-6, min_lr=1e-6,
                          clip_grad_norm=0.0)
  encoder = models.create_encoder(encoder_name)
  model = classifier.Classifier(encoder=encoder, num_classes=3)
  params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  tx, _ = optim.create_finetune_optimizer(config, encoder)
  updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), jax.jit(tx.init)(params), params)
  lrs = {k: float(np.abs(np.asarray(v)).max()) for k, v in traverse_util.flatten_dict(updates).items()}
  ids = traverse_util.flatten_dict(optim.layer_ids(params, encoder))
  return lrs, ids, optim.num_layer_ids(encoder)


@pytest.mark.parametrize("encoder_name", ["vit_test_tiny", pytest.param("swin_test_tiny", marks=pytest.mark.slow)])
def test_layer_decay_scales_each_parameters_peak_lr_but_not_the_warmup_lr(encoder_name):
  lrs, ids, num_ids = _first_update_lrs(encoder_name, layer_decay=0.5, warmup_steps=0)
  for path, lr in lrs.items():
    np.testing.assert_allclose(lr, 1e-3 * 0.5 ** (num_ids - 1 - ids[path]), rtol=1e-3, err_msg=str(path))
  warmup_lrs, _, _ = _first_update_lrs(encoder_name, layer_decay=0.5, warmup_steps=10)
  np.testing.assert_allclose(list(warmup_lrs.values()), 1e-6, rtol=1e-3)  # official: not layer-decayed
