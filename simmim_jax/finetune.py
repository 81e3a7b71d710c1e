"""Fine-tuning and evaluation of a (SimMIM-pretrained or random) encoder for classification.

The recipe of the official `main_finetune.py` (shared/reference/simmim_official.md §1.10-1.11):
  * model: encoder + linear head (`classifier.Classifier`); the official ViT fine-tune layout (per-block
    relative position bias, mean pooling + fc_norm, head init x 0.001); drop path;
  * weights: `config.pretrained` = a `simmim-pretrain` workdir (encoder name and sizes from its config,
    weights remapped by `pos_interpolation.remap_pretrained`: mask token and SimMIM head dropped, shared
    RPB copied per block, tables / position embeddings resized) or "" (random init: the scratch baseline);
  * AdamW with layer-wise lr decay (`optim.create_finetune_optimizer`), warmup + cosine, clip 5.0;
  * data: RandomResizedCrop(0.08-1, bicubic) + flip + RandAugment rand-m9-mstd0.5-inc1 + random erasing
    0.25 (`data.finetune_pipeline`), Mixup 0.8 / CutMix 1.0 / switch 0.5 + label smoothing 0.1 on device
    (`mixup.py`), soft-target cross entropy;
  * eval: resize 256/224 x size + centre crop; top-1 / top-5 over the whole eval split (padded batches
    masked out), written to `metrics.jsonl` as `eval_top1`, `eval_top5`, `eval_loss`.

The workdir holds `config.json` (resolved: model fields, classes, image count), `checkpoints/` (latest,
for resuming: rerunning the same command resumes; the pretrained weights are read only on a fresh start,
as the official code), `best/` (the parameters with the best eval top-1 so far), `metrics.jsonl`.
"""

import copy
import dataclasses
import os
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from simmim_jax import checkpoint, metrics, mixup, models, optim, pos_interpolation, sharding, validation
from simmim_jax import workdir as workdir_lib
from simmim_jax.models import classifier
from simmim_jax.validation import ConfigError

DTYPES = models.DTYPES

@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer updates done
  params: Any      # {"encoder": ..., "head": ...}
  opt_state: Any


BEST_DIRNAME = "best"
# config.model fields that belong to the fine-tuning recipe; with a pretrained workdir every other field
# (name, sizes) comes from the pretrained run. Fields the encoder class lacks are ignored (ViT vs Swin).
FINETUNE_MODEL_FIELDS = ("drop_path_rate", "drop_rate", "attn_drop_rate", "use_mean_pooling", "use_rel_pos_bias",
                         "use_shared_rel_pos_bias", "init_style", "window_size", "pretrained_window_sizes", "remat",
                         "attention_impl")
DATA_SOURCES = ("tfds", "folder")


# ----------------------------------------------------------------------------------------------------
# Model


def resolve_model_fields(config: ml_collections.ConfigDict) -> dict:
  """{name, field overrides} of the encoder: the pretrained run's model (if any) + this config's recipe
  fields, restricted to the fields the encoder class has."""
  own = dict(config.model.to_dict())
  if config.pretrained:
    pretrained = workdir_lib.read_config(config.pretrained).model.to_dict()
    fields = {k: v for k, v in pretrained.items() if k not in FINETUNE_MODEL_FIELDS}
    fields.update({k: v for k, v in own.items() if k in FINETUNE_MODEL_FIELDS})
  else:
    fields = own
  name = fields.pop("name")
  try:
    encoder = models.create_encoder(name)
  except ValueError as e:
    raise ConfigError(f"config.model.name: {e}") from None
  known = {f.name for f in dataclasses.fields(type(encoder))}
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()
            if k in known or k not in FINETUNE_MODEL_FIELDS}
  return {"name": name, **fields}


def build_encoder(model_fields: dict, img_size: int, dtype) -> Any:
  fields = {k: v for k, v in model_fields.items() if k != "name"}
  return models.create_encoder(model_fields["name"], img_size=img_size, dtype=dtype, **fields)


def build_classifier(config: ml_collections.ConfigDict) -> classifier.Classifier:
  """The classifier of a *resolved* config (see `resolve_config`)."""
  dtype = DTYPES[config.dtype]
  return classifier.Classifier(encoder=build_encoder(config.model.to_dict(), config.img_size, dtype),
                           num_classes=config.num_classes, head_init_scale=config.head_init_scale, dtype=dtype)


def is_vit(encoder) -> bool:
  return isinstance(encoder, models.VisionTransformer)


def load_pretrained_encoder_params(config: ml_collections.ConfigDict) -> Any:
  """The encoder parameters of the `simmim-pretrain` workdir `config.pretrained` (host arrays; read-only)."""
  _, variables, _ = workdir_lib.load_model(config.pretrained, config.pretrained_step or None)
  return jax.device_get(variables["params"]["encoder"])


def init_params(model: classifier.Classifier, key: jax.Array) -> Any:
  encoder = model.encoder
  images = jnp.zeros((1, encoder.img_size, encoder.img_size, encoder.in_chans), jnp.float32)
  return model.init(key, images)["params"]


def with_pretrained_encoder(params: Any, pretrained_encoder: Any, encoder) -> tuple[Any, dict]:
  """`params` ({"encoder", "head"}) with the encoder replaced by the remapped pretrained one."""
  encoder_params, report = pos_interpolation.remap_pretrained(pretrained_encoder, jax.device_get(params["encoder"]),
                                                              is_vit=is_vit(encoder))
  return {**params, "encoder": encoder_params}, report


# ----------------------------------------------------------------------------------------------------
# Steps


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """[B] float 1.0 where `labels` is among the k highest logits (k clipped to the number of classes)."""
  k = min(k, logits.shape[-1])
  _, top = jax.lax.top_k(logits, k)
  return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def classification_sums(logits: jax.Array, labels: jax.Array, valid: jax.Array) -> dict[str, jax.Array]:
  """Sums over valid rows: top-1 / top-5 correct, cross entropy, count."""
  loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  return {"top1": jnp.sum(topk_correct(logits, labels, 1) * valid),
          "top5": jnp.sum(topk_correct(logits, labels, 5) * valid),
          "loss": jnp.sum(loss * valid), "count": jnp.sum(valid)}


def make_train_step(config: ml_collections.ConfigDict, model: classifier.Classifier, tx: optax.GradientTransformation,
                    schedule: Callable):
  """train_step(state, images, labels, key) -> (state, metrics); mixup and dropout from fold_in(key, step)."""
  aug = config.augment

  def train_step(state: TrainState, images: jax.Array, labels: jax.Array, key: jax.Array):
    mix_key, dropout_key = jax.random.split(jax.random.fold_in(key, state.step))
    images, targets, _ = mixup.mixup_cutmix(
        mix_key, images, labels, num_classes=config.num_classes, mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix,
        prob=aug.mixup_prob, switch_prob=aug.mixup_switch_prob, label_smoothing=aug.label_smoothing,
        groups=aug.get("mixup_groups", 1))

    def loss_fn(params):
      logits = model.apply({"params": params}, images, train=True, rngs={"dropout": dropout_key})
      return optax.softmax_cross_entropy(logits, targets).mean()  # timm SoftTargetCrossEntropy

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    step_metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), step_metrics

  return train_step


def evaluate(eval_step: Callable, params: Any, batches, data_sharding) -> dict[str, float]:
  """Runs `eval_step(params, images, labels, valid) -> {suffix: sums}` over `batches`; returns
  {"eval_top1{suffix}", "eval_top5{suffix}", "eval_loss{suffix}"} in percent / mean loss."""
  from simmim_jax import data  # pylint: disable=g-import-not-at-top

  totals = None
  for batch in batches:
    batch = data.make_global_batch(batch, data_sharding)
    sums = jax.device_get(jax.block_until_ready(eval_step(params, batch["image"], batch["label"], batch["valid"])))
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  result = {}
  for suffix, s in totals.items():
    count = max(float(s["count"]), 1.0)
    result.update({f"eval_top1{suffix}": 100.0 * float(s["top1"]) / count,
                   f"eval_top5{suffix}": 100.0 * float(s["top5"]) / count,
                   f"eval_loss{suffix}": float(s["loss"]) / count})
  return result


# ----------------------------------------------------------------------------------------------------
# Config


def resolve_config(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """Validates `config` and returns a copy with the encoder fields, number of classes and train image
  count filled in from the pretrained run and the data. Raises ConfigError naming the key and the fix."""
  del workdir  # checked by workdir.open_for_writing, after every config check
  config = copy.deepcopy(config)
  validation.check_run(config)
  validation.check_at_least(config, {"eval_every_steps": 1, "num_classes": 0, "num_train_images": 0,
                                     "pretrained_step": 0, "head_init_scale": 0,
                                     "data.train_examples_per_class": 0})
  validation.check_fraction(config, ("augment.reprob", "augment.mixup_prob", "augment.mixup_switch_prob"))
  validation.check_fraction(config, ("augment.label_smoothing",), closed=False)
  validation.check_at_least(config, {"augment.mixup": 0, "augment.cutmix": 0})
  validation.check_choice(config, "data.source", DATA_SOURCES)
  if config.pretrained and not os.path.exists(os.path.join(config.pretrained, workdir_lib.CONFIG_FILENAME)):
    raise ConfigError(f"config.pretrained={config.pretrained!r} is not a simmim-pretrain workdir (no "
                      f"{workdir_lib.CONFIG_FILENAME}); give a pretraining workdir or '' for random init")
  crop_padding = config.data.get("crop_padding", 4)
  if not isinstance(crop_padding, int) or crop_padding < 0:
    raise ConfigError(f"config.data.crop_padding={crop_padding!r}: use an integer >= 0 (official 4)")
  if config.optimizer.accumulation_steps != 1:
    raise ConfigError(f"config.optimizer.accumulation_steps={config.optimizer.accumulation_steps}: fine-tuning "
                      "supports 1 (raise global_batch_size over more devices instead)")
  from simmim_jax.data import finetune_pipeline  # pylint: disable=g-import-not-at-top
  try:
    info = finetune_pipeline.dataset_info(config.data)
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(f"config.data: {e}") from None
  with config.unlocked():
    config.model = ml_collections.ConfigDict(resolve_model_fields(config))
    if not config.num_classes:
      config.num_classes = info["num_classes"]
    if not config.num_train_images:
      config.num_train_images = info["num_train"]
  if config.num_classes < info["num_classes"]:
    raise ConfigError(f"config.num_classes={config.num_classes} < the data's {info['num_classes']} classes")
  validation.check_model(lambda: build_encoder(config.model.to_dict(), config.img_size, jnp.float32),
                         f"config.model ({config.model.to_dict()}) at img_size={config.img_size}",
                         lambda encoder: encoder.init(jax.random.key(0), models.init_inputs(encoder)[0]))
  if optim.steps_from_config(config)[0] <= 0:
    raise ConfigError(f"config.total_steps={config.total_steps} / num_epochs={config.num_epochs} give no steps")
  return config


def signature(config: ml_collections.ConfigDict) -> dict:
  return {"model": models.parameter_fields(config.model.to_dict()), "img_size": int(config.img_size),
          "num_classes": int(config.num_classes)}


# ----------------------------------------------------------------------------------------------------
# The loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Fine-tunes (or resumes, or with `config.eval_only` evaluates) as `config` says; returns the last
  evaluation {"eval_top1", "eval_top5", "eval_loss", "best_top1"}.

  Every check runs before anything is written: a refused run leaves `workdir` as it was. With
  `config.eval_only` the workdir is only read (its latest complete checkpoint, or the initial weights when it
  has none) and the result is printed, not written."""
  config = resolve_config(config, workdir)
  if config.eval_only:
    try:
      workdir_lib.check_resumable(workdir, signature(config))
    except checkpoint.SignatureMismatchError as e:
      raise ConfigError(f"{e}; use the config of that run") from None
    return _run(config, workdir, read_only=True)
  lock = workdir_lib.open_for_writing(workdir, config, signature(config), "simmim-finetune")
  try:
    return _run(config, workdir, read_only=False)
  finally:
    if lock:
      lock.release()


def _run(config: ml_collections.ConfigDict, workdir: str, read_only: bool) -> dict[str, float]:
  is_main = jax.process_index() == 0
  from simmim_jax import data  # pylint: disable=g-import-not-at-top  (TensorFlow)
  from simmim_jax.data import finetune_pipeline  # pylint: disable=g-import-not-at-top

  model = build_classifier(config)
  tx, schedule = optim.create_finetune_optimizer(config, model.encoder)
  total_steps, _, _ = optim.steps_from_config(config)
  mesh = sharding.create_mesh(config.mesh)
  init_state = lambda params: TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  abstract_state = jax.eval_shape(lambda key: init_state(init_params(model, key)), jax.random.key(0))
  state_shardings = sharding.state_shardings(abstract_state, mesh, config.mesh.fsdp_min_size)
  data_sharding, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  init_key, step_key = jax.random.split(jax.random.key(config.seed))

  if read_only:
    checkpointer = None
    start_step, state, meta = read_latest(workdir, abstract_state, state_shardings)
  else:
    checkpointer, start_step, state, meta = workdir_lib.resume(workdir, config.keep_checkpoints, signature(config),
                                                               abstract_state, state_shardings)
  best_top1 = meta.get("best_top1", -1.0)
  if state is None:
    params = jax.device_get(jax.jit(lambda key: init_params(model, key))(init_key))
    if config.pretrained:
      params, report = with_pretrained_encoder(params, load_pretrained_encoder_params(config), model.encoder)
      print(f"Loaded {len(report['loaded'])} pretrained encoder arrays from {config.pretrained} (resized: "
            f"{report['resized'] or 'none'}; dropped: {report['dropped']}; fresh: {report['fresh'] + ['head']})",
            flush=True)
    state = jax.jit(init_state, out_shardings=state_shardings)(params)
  best_checkpointer = None if read_only else checkpoint.Checkpointer(os.path.join(workdir, BEST_DIRNAME), keep=1)

  eval_step = jax.jit(lambda params, images, labels, valid: {"": classification_sums(
      model.apply({"params": params}, images), labels, valid)})
  make_eval_batches = lambda: finetune_pipeline.create_eval_iterator(
      config.data, image_size=config.img_size, global_batch_size=config.global_batch_size)
  writer = metrics.MetricWriter(workdir, resume_step=start_step, enabled=is_main and not read_only)
  result = {}

  def run_eval(step, state):
    nonlocal best_top1
    result.update(evaluate(eval_step, state.params, make_eval_batches(), data_sharding))
    if result["eval_top1"] > best_top1 and best_checkpointer:
      best_top1 = result["eval_top1"]
      best_checkpointer.save(step, {"params": state.params}, {"step": step, **result})
    result["best_top1"] = best_top1
    writer.write(step, result)
    if is_main:
      print(f"eval step {step}: top-1 {result['eval_top1']:.2f}% | top-5 {result['eval_top5']:.2f}% | "
            f"loss {result['eval_loss']:.4f} | best top-1 {best_top1:.2f}%", flush=True)

  if config.eval_only or start_step >= total_steps:
    if not config.eval_only:
      print(f"Nothing to do: the checkpoint in {workdir} is at step {start_step} >= total steps {total_steps}.")
    run_eval(start_step, state)
    for c in (checkpointer, best_checkpointer):
      if c:
        c.close()
    writer.close()
    return result

  batches = finetune_pipeline.create_train_iterator(
      config.data, image_size=config.img_size, global_batch_size=config.global_batch_size, seed=config.seed,
      start_step=start_step, randaugment_config=config.augment.randaugment, reprob=config.augment.reprob)
  train_step = jax.jit(make_train_step(config, model, tx, schedule),
                       in_shardings=(state_shardings, data_sharding, data_sharding, replicated),
                       out_shardings=(state_shardings, replicated), donate_argnums=(0,))
  print(f"Fine-tuning {config.model.name} ({'from ' + config.pretrained if config.pretrained else 'random init'}) "
        f"on {config.num_train_images} images of {config.num_classes} classes for {total_steps} steps of "
        f"{config.global_batch_size} from step {start_step}; workdir {workdir}", flush=True)
  run_loop(config, state, train_step, batches, data_sharding, step_key, start_step, total_steps, writer,
           lambda step, state: checkpointer.save(step, state, {"step": step, "signature": signature(config),
                                                               "best_top1": best_top1}),
           run_eval)
  for c in (checkpointer, best_checkpointer):
    c.close()
  writer.close()
  return result


def read_latest(workdir: str, abstract_state: Any, shardings: Any) -> tuple[int, Any | None, dict]:
  """(step, state, meta) of the workdir's latest complete checkpoint, or (0, None, {}); reads only."""
  steps = checkpoint.complete_steps(workdir_lib.checkpoint_dir(workdir))
  if not steps:
    return 0, None, {}
  state, meta = checkpoint.read_state(workdir_lib.checkpoint_dir(workdir), steps[-1],
                                      checkpoint.abstract_with_shardings(abstract_state, shardings))
  return steps[-1], state, meta


def run_loop(config, state, train_step, batches, data_sharding, step_key, start_step, total_steps, writer,
             save: Callable, run_eval: Callable):
  """The shared train loop of fine-tuning and probing: step, log, evaluate, checkpoint."""
  from simmim_jax import data  # pylint: disable=g-import-not-at-top

  clock = metrics.Throughput()
  log_every = max(config.log_every_steps, 1)
  for step in range(start_step + 1, total_steps + 1):
    batch = data.make_global_batch(next(batches), data_sharding)
    state, step_metrics = train_step(state, batch["image"], batch["label"], step_key)
    step_metrics = jax.block_until_ready(step_metrics)  # CPU meshes of > 2 devices must not queue steps
    if step == start_step + 1:
      clock.start(step)
    if step % log_every == 0 or step in (start_step + 1, total_steps):
      scalars = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
      steps_per_sec, _ = clock.rate(step)
      scalars["img_per_sec"] = steps_per_sec * config.global_batch_size
      writer.write(step, scalars)
      if jax.process_index() == 0:
        eta = (total_steps - step) / steps_per_sec if steps_per_sec else None
        print(metrics.progress_line(step, total_steps, scalars, eta), flush=True)
    if not np.isfinite(float(step_metrics["loss"])):
      raise FloatingPointError(f"non-finite loss at step {step}")
    if step % config.eval_every_steps == 0 or step == total_steps:
      run_eval(step, state)
    if step % config.checkpoint_every_steps == 0 or step == total_steps:
      save(step, state)
  return state
