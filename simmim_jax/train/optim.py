"""The optimizer recipe of the official SimMIM code, in optax.

* AdamW (b1 0.9, b2 0.999, eps 1e-8, weight decay 0.05), gradient clipping by global norm 5.0
  (microsoft/SimMIM `config.py`:97-129 defaults; AdamW built in `optimizer.py`:40, clipping in
  `main_simmim.py`:148).
* Learning rates given per 512 images and scaled by the images per update / 512, like the official
  `lr = BASE_LR * batch * world_size / 512 (* ACCUMULATION_STEPS)`; warmup and min lr are scaled alike.
* Schedules with timm semantics, in optimizer updates:
  - "cosine" (timm `CosineLRScheduler`): linear warmup from `warmup_lr`, then
    `min_lr + 0.5 (peak - min_lr) (1 + cos(pi t / T))`; `min_lr` after T. With `optimizer.warmup_prefix`
    False (the default; timm's default, and what the official SimMIM code and microsoft/Swin-Transformer at
    the SimMIM merge pass) t counts from step 0 and T = total steps: the cosine spans the warmup too. With
    True (timm `warmup_prefix=True`, microsoft/Swin-Transformer HEAD's `TRAIN.LR_SCHEDULER.WARMUP_PREFIX`,
    whose `build_scheduler` then passes t_initial = total - warmup) t = step - warmup and
    T = total - warmup: the cosine runs over the post-warmup steps only and starts at the peak.
  - "multistep" (official `MultiStepLRScheduler`): linear warmup, then `peak * gamma ** k` with k the number
    of milestones <= t (bisect_right).
  Deviation: the official code updates the lr *after* each optimizer step, so update k uses lr(k - 1)
  (and updates 0 and 1 both use `warmup_lr`); here update k uses lr(k).
* Weight decay (`config.optimizer.no_decay`; `weight_decay_mask`), two choices:
  - "intended" (the default of `default_config` / `finetune_config` and of the demo configs): no decay on
    1-D parameters (biases, norms, layer scales, q/v biases), the cls / mask tokens, position embeddings, every
    relative-position table and SwinV2's `cpb_mlp` / `logit_scale`, in pretraining and fine-tuning alike. This
    is what the official `no_weight_decay` / `no_weight_decay_keywords` lists intend.
  - "official" (set by configs/pretrain/*.py and configs/finetune/*.py): exactly the groups the official code
    produced, whose rule is: no decay iff 1-D, or the name ends in ".bias", or it is in the model's
    `no_weight_decay()`, or a keyword of `no_weight_decay_keywords()` is a substring of it (microsoft/SimMIM
    `optimizer.py` get_pretrain_param_groups / get_finetune_param_groups, check_keywords_in_name; the same in
    microsoft/Swin-Transformer's `optimizer.py` for SwinV2). In pretraining `SimMIM.no_weight_decay_keywords`
    prefixes the keywords with "encoder." (`models/simmim.py`), so they never match: the official runs *decay*
    the ViT mask token and shared relative-position table, every Swin relative-position table and SwinV2's
    `cpb_mlp` weights and `logit_scale` (the exempt names still match: ViT cls_token / pos_embed, Swin
    mask_token / absolute_pos_embed). The fine-tune ViT has no keywords, so official ViT fine-tuning also
    decays every per-block relative-position table; Swin / SwinV2 fine-tuning equals "intended".
* Gradient accumulation happens in the train step (`pretrain.py`), which clips the accumulated gradient
  once; the official code clips every micro-step's partial sum (a quirk we do not copy).
"""

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

NO_DECAY_NAMES = frozenset({"cls_token", "mask_token", "pos_embed", "absolute_pos_embed",
                            "relative_position_bias_table", "logit_scale"})
NO_DECAY_MODULES = frozenset({"cpb_mlp"})
NO_DECAY_CHOICES = ("intended", "official")
# "official": exact encoder-level names of the encoders' no_weight_decay() (the Swin SimMIM encoders add
# mask_token), and the keywords of no_weight_decay_keywords() as path components (Swin: the table; SwinV2: the
# table, cpb_mlp and logit_scale; ViT: none). Keywords act in fine-tuning only (see the module docstring).
OFFICIAL_SKIP = {("vit", "pretrain"): frozenset({"pos_embed", "cls_token"}),
                 ("vit", "finetune"): frozenset({"pos_embed", "cls_token"}),
                 ("swin", "pretrain"): frozenset({"absolute_pos_embed", "mask_token"}),
                 ("swin", "finetune"): frozenset({"absolute_pos_embed"})}
OFFICIAL_SWIN_FINETUNE_KEYWORDS = frozenset({"relative_position_bias_table", "cpb_mlp", "logit_scale"})
SCHEDULES = ("cosine", "multistep")


def lr_scale(optimizer_config, global_batch_size: int) -> float:
  """Factor applied to base / warmup / min lr: images per update / `lr_scaling_batch` (official: 512)."""
  if not optimizer_config.lr_scaling_batch:
    return 1.0
  images_per_update = global_batch_size * optimizer_config.accumulation_steps
  return images_per_update / optimizer_config.lr_scaling_batch


def learning_rate_schedule(*, schedule: str, peak_lr: float, warmup_lr: float, min_lr: float,
                           total_steps: int, warmup_steps: int, warmup_prefix: bool = False,
                           milestones: tuple[int, ...] = (), gamma: float = 0.1) -> optax.Schedule:
  """A timm-semantics schedule over optimizer updates (see the module docstring). Lrs are absolute.
  `warmup_prefix` (cosine only): the cosine runs over the steps after the warmup (timm's warmup_prefix)."""
  if schedule not in SCHEDULES:
    raise ValueError(f"optimizer.schedule={schedule!r} is not one of {SCHEDULES}")
  check_warmup_prefix(warmup_prefix, schedule)
  # timm `_get_lr`: with warmup_prefix, t -= warmup_t; Swin's build_scheduler passes t_initial = total - warmup.
  cosine_start, cosine_steps = (warmup_steps, max(total_steps - warmup_steps, 1)) if warmup_prefix else (0, total_steps)
  if warmup_steps < 0 or total_steps <= 0:
    raise ValueError(f"need total_steps > 0 and warmup_steps >= 0; got {total_steps}, {warmup_steps}")
  milestones_array = jnp.asarray(sorted(milestones), jnp.int32)
  if schedule == "multistep" and len(milestones) and warmup_steps > min(milestones):
    raise ValueError(f"warmup ({warmup_steps} steps) must end before the first milestone ({min(milestones)})")

  def lr(step):
    t = jnp.asarray(step, jnp.float32)
    warmup = warmup_lr + t * (peak_lr - warmup_lr) / max(warmup_steps, 1)
    if schedule == "cosine":
      t_cosine = t - cosine_start
      after = min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + jnp.cos(jnp.pi * t_cosine / cosine_steps))
      after = jnp.where(t_cosine >= cosine_steps, min_lr, after)
    else:
      passed = jnp.sum(milestones_array <= jnp.asarray(step, jnp.int32)) if len(milestones) else 0
      after = peak_lr * gamma ** passed
    return jnp.where(t < warmup_steps, warmup, after)

  return lr


def check_warmup_prefix(warmup_prefix, schedule: str = "cosine") -> None:
  if not isinstance(warmup_prefix, bool):
    raise ValueError(f"config.optimizer.warmup_prefix={warmup_prefix!r}: use True (the cosine runs after the "
                     "warmup, Swin-Transformer HEAD) or False (the cosine spans the warmup, official SimMIM)")
  if warmup_prefix and schedule != "cosine":
    raise ValueError(f"config.optimizer.warmup_prefix=True applies to the cosine schedule, not "
                     f"optimizer.schedule={schedule!r}: set it to False")


def check_no_decay(no_decay: str) -> None:
  if no_decay not in NO_DECAY_CHOICES:
    raise ValueError(f"config.optimizer.no_decay={no_decay!r}: use one of {NO_DECAY_CHOICES} (\"official\" = the "
                     "official runs' weight-decay groups, \"intended\" = what their no-decay lists intend)")


def weight_decay_mask(params: Any, no_decay: str = "intended", stage: str = "pretrain") -> Any:
  """True where weight decay applies (see the module docstring); same tree structure as `params`.

  "official" needs the model's tree ({"encoder": ..., "decoder" | "head": ...}) and the stage ("pretrain" or
  "finetune"); the encoder family is read from it (Swin / SwinV2 encoders have `layers_*`, ViTs `blocks_*`).
  """
  check_no_decay(no_decay)
  flat = traverse_util.flatten_dict(params)
  if no_decay == "intended":
    decay = {path: (np.ndim(value) >= 2 and path[-1] not in NO_DECAY_NAMES
                    and not NO_DECAY_MODULES.intersection(path))
             for path, value in flat.items()}
    return traverse_util.unflatten_dict(decay)
  if stage not in ("pretrain", "finetune") or "encoder" not in params:
    raise ValueError(f"no_decay='official' needs a model tree with an 'encoder' and stage 'pretrain' or "
                     f"'finetune'; got stage {stage!r} and top-level keys {sorted(params)}")
  family = "swin" if any(name.startswith("layers_") for name in params["encoder"]) else "vit"
  skip = OFFICIAL_SKIP[family, stage]
  keywords = OFFICIAL_SWIN_FINETUNE_KEYWORDS if (family, stage) == ("swin", "finetune") else frozenset()

  def official_decay(path, value):
    if np.ndim(value) < 2 or path[-1] == "bias":  # len(shape) == 1 or name.endswith(".bias")
      return False
    if path[0] == "encoder" and ((len(path) == 2 and path[1] in skip) or keywords.intersection(path)):
      return False
    return True

  return traverse_util.unflatten_dict({path: official_decay(path, value) for path, value in flat.items()})


def steps_from_config(config) -> tuple[int, int, int]:
  """(total_steps, warmup_steps, steps_per_epoch) in optimizer updates; explicit step counts win."""
  images_per_update = config.global_batch_size * config.optimizer.accumulation_steps
  steps_per_epoch = max(config.num_train_images // images_per_update, 1)  # drop_last, as the official loader
  total = config.total_steps if config.total_steps > 0 else int(config.num_epochs * steps_per_epoch)
  warmup = config.warmup_steps if config.warmup_steps > 0 else int(config.warmup_epochs * steps_per_epoch)
  return total, min(warmup, total), steps_per_epoch


def create_schedule(config) -> optax.Schedule:
  """The lr schedule of a pretraining config (lrs scaled by images per update / 512)."""
  total_steps, warmup_steps, steps_per_epoch = steps_from_config(config)
  opt = config.optimizer
  scale = lr_scale(opt, config.global_batch_size)
  return learning_rate_schedule(
      schedule=opt.schedule, peak_lr=opt.base_lr * scale, warmup_lr=opt.warmup_lr * scale,
      min_lr=opt.min_lr * scale, total_steps=total_steps, warmup_steps=warmup_steps,
      warmup_prefix=uses_warmup_prefix(opt),
      milestones=tuple(int(e * steps_per_epoch) for e in opt.multistep_epochs), gamma=opt.multistep_gamma)


def uses_warmup_prefix(optimizer_config) -> bool:
  """config.optimizer.warmup_prefix; configs written before the option (an old workdir's config.json) have
  none and keep the schedule they ran with (False)."""
  return optimizer_config.get("warmup_prefix", False)


def create_optimizer(config) -> tuple[optax.GradientTransformation, Callable]:
  """AdamW with clipping and the weight-decay mask; returns (transformation, lr schedule)."""
  opt = config.optimizer
  schedule = create_schedule(config)
  parts = []
  if opt.clip_grad_norm:
    parts.append(optax.clip_by_global_norm(opt.clip_grad_norm))
  no_decay = opt.get("no_decay", "intended")  # configs written before the option: the old behaviour
  check_no_decay(no_decay)
  mask = functools.partial(weight_decay_mask, no_decay=no_decay, stage="pretrain")
  parts.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                           mask=mask))
  return optax.chain(*parts), schedule


# ----------------------------------------------------------------------------------------------------
# Fine-tuning: layer-wise lr decay (official `optimizer.py`, build_finetune_optimizer) and LARS probing


def vit_layer_id(path: tuple[str, ...], depth: int) -> int:
  """Official `get_vit_layer(name, depth + 2)` on an encoder-relative Flax path: 0 = tokens and patch
  embedding, i + 1 = block i, depth + 1 = everything else (final norms, shared RPB, the head)."""
  last = depth + 1
  name = path[0] if path else ""
  if name in ("cls_token", "mask_token", "pos_embed", "patch_embed"):
    return 0
  if name.startswith("blocks_"):
    return int(name.split("_")[1]) + 1
  return last  # rel_pos_bias, norm, fc_norm, head


def swin_layer_id(path: tuple[str, ...], depths: tuple[int, ...]) -> int:
  """Official `get_swin_layer(name, sum(depths) + 2, depths)`: 0 = mask token and patch embedding,
  block j of stage l = sum(depths[:l]) + j + 1, stage l's PatchMerging = sum(depths[:l + 1]) (the id of
  the stage's last block), everything else (final norm, head, and - an official quirk kept here - the
  unused absolute_pos_embed) = sum(depths) + 1."""
  name = path[0] if path else ""
  if name in ("mask_token", "patch_embed"):
    return 0
  if name.startswith("layers_"):
    stage = int(name.split("_")[1])
    if path[1] == "downsample":
      return sum(depths[:stage + 1])
    return sum(depths[:stage]) + int(path[1].split("_")[1]) + 1
  return sum(depths) + 1


def num_layer_ids(encoder) -> int:
  """Number of layer-decay groups: depth + 2 (ViT-B: 14) or sum(depths) + 2 (Swin-B: 26)."""
  depths = getattr(encoder, "depths", None)
  return (sum(depths) if depths is not None else encoder.depth) + 2


def layer_ids(params: Any, encoder, encoder_key: str = "encoder") -> Any:
  """Tree of int layer ids (same structure as `params`); parameters outside `params[encoder_key]`
  (the classification head) get the last id, as the official maps give `head`."""
  depths = getattr(encoder, "depths", None)
  last = num_layer_ids(encoder) - 1

  def layer_id(path):
    if path[0] != encoder_key:
      return last
    inner = path[1:]
    return swin_layer_id(inner, tuple(depths)) if depths is not None else vit_layer_id(inner, encoder.depth)

  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({path: layer_id(path) for path in flat})


def layer_decay_scales(num_ids: int, layer_decay: float) -> list[float]:
  """lr scale of layer id i: layer_decay ** (num_ids - 1 - i) (official `scales`); the head's is 1."""
  return [layer_decay ** (num_ids - 1 - i) for i in range(num_ids)]


def create_finetune_optimizer(config, encoder) -> tuple[optax.GradientTransformation, Callable]:
  """AdamW with layer-wise lr decay, as the official fine-tuning code (see `create_optimizer`).

  Each layer id has its own schedule whose *peak* is `base_lr * layer_decay ** (num_ids - 1 - id)`;
  the warmup and min lr are the same absolute values for every layer (official quirk, kept: microsoft/SimMIM
  `lr_scheduler.py`:30-31 gives every param group the one `lr_min` / `warmup_lr_init`).
  Lrs are per `lr_scaling_batch` images and scaled by images per update, as pretraining.
  Returns (transformation, the schedule of the top layer id, i.e. of the head).
  """
  opt = config.optimizer
  total_steps, warmup_steps, steps_per_epoch = steps_from_config(config)
  scale = lr_scale(opt, config.global_batch_size)
  num_ids = num_layer_ids(encoder)
  no_decay = opt.get("no_decay", "intended")  # configs written before the option: the old behaviour
  check_no_decay(no_decay)
  mask = functools.partial(weight_decay_mask, no_decay=no_decay, stage="finetune")
  schedules = [learning_rate_schedule(
      schedule=opt.schedule, peak_lr=opt.base_lr * scale * layer_scale, warmup_lr=opt.warmup_lr * scale,
      min_lr=opt.min_lr * scale, total_steps=total_steps, warmup_steps=warmup_steps,
      warmup_prefix=uses_warmup_prefix(opt),
      milestones=tuple(int(e * steps_per_epoch) for e in opt.multistep_epochs), gamma=opt.multistep_gamma)
      for layer_scale in layer_decay_scales(num_ids, opt.layer_decay)]
  transforms = {str(i): optax.adamw(schedules[i], b1=opt.b1, b2=opt.b2, eps=opt.eps,
                                    weight_decay=opt.weight_decay, mask=mask)
                for i in range(num_ids)}
  labels = lambda params: jax.tree.map(str, layer_ids(params, encoder))
  parts = [optax.clip_by_global_norm(opt.clip_grad_norm)] if opt.clip_grad_norm else []
  parts.append(optax.multi_transform(transforms, labels))
  return optax.chain(*parts), schedules[-1]


PROBE_OPTIMIZERS = ("lars", "sgd")


def create_lars_optimizer(config) -> tuple[optax.GradientTransformation, Callable]:
  """LARS for linear probing (MAE `main_linprobe.py`, `util/lars.py`): momentum 0.9, trust coefficient
  0.001, no trust ratio and no weight decay on 1-D parameters; lr per `lr_scaling_batch` (MAE: 256).

  LARS steps are relative to each weight's norm, so a head started at std 0.01 needs thousands of steps at
  MAE's lr (6.4 at batch 16384); `config.optimizer.name="sgd"` is plain momentum SGD on the same schedule
  for short runs at small batches."""
  opt = config.optimizer
  total_steps, warmup_steps, _ = steps_from_config(config)
  scale = lr_scale(opt, config.global_batch_size)
  schedule = learning_rate_schedule(schedule="cosine", peak_lr=opt.base_lr * scale,
                                    warmup_lr=opt.warmup_lr * scale, min_lr=opt.min_lr * scale,
                                    total_steps=total_steps, warmup_steps=warmup_steps,
                                    warmup_prefix=uses_warmup_prefix(opt))
  not_1d = lambda params: jax.tree.map(lambda p: np.ndim(p) > 1, params)
  if opt.get("name", "lars") == "sgd":  # no trust ratio: steps in absolute units (short runs, small batches)
    tx = optax.chain(optax.masked(optax.add_decayed_weights(opt.weight_decay), not_1d),
                     optax.sgd(schedule, momentum=opt.momentum))
  elif opt.get("name", "lars") == "lars":
    tx = optax.lars(schedule, weight_decay=opt.weight_decay, weight_decay_mask=not_1d, trust_coefficient=0.001,
                    eps=0.0, trust_ratio_mask=not_1d, momentum=opt.momentum)
  else:
    raise ValueError(f"config.optimizer.name={opt.name!r}: the linear probe uses 'lars' (MAE) or 'sgd'")
  return tx, schedule
