"""Fine-tuning and evaluation of a (SimMIM-pretrained or random) encoder for classification.

The recipe of microsoft/SimMIM `main_finetune.py` (`main`, line 73), with the `config.py`:93-168 defaults and
`configs/vit_base__800ep/simmim_finetune__vit_base__img224__800ep.yaml`:
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

import os
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from simmim_jax.storage import checkpoint, metrics, pos_interpolation
from simmim_jax.train import evaluate, mixup, optim, run, sharding
from simmim_jax.models import flops
from simmim_jax import models
from simmim_jax.storage import workdir as workdir_lib
from simmim_jax.models import classifier
from simmim_jax.train.downstream import (DTYPES, build_classifier, build_encoder,  # noqa: F401
                                   load_pretrained_encoder_params, memory_problem, read_latest, resolve_config,
                                   resolve_model_fields, signature)
from simmim_jax.train.validation import ConfigError, DataNotReady


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer updates done (skipped non-finite updates included)
  params: Any      # {"encoder": ..., "head": ...}
  opt_state: Any
  nonfinite_streak: jax.Array  # int32 scalar: consecutive steps whose update was skipped (non-finite)


BEST_DIRNAME = "best"
# ----------------------------------------------------------------------------------------------------
# Model


def is_vit(encoder) -> bool:
  return isinstance(encoder, models.VisionTransformer)


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


def init_train_state(tx: optax.GradientTransformation, params: Any) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    nonfinite_streak=jnp.zeros((), jnp.int32))


def make_train_step(config: ml_collections.ConfigDict, model: classifier.Classifier, tx: optax.GradientTransformation,
                    schedule: Callable):
  """train_step(state, images, labels, key) -> (state, metrics); mixup and dropout from fold_in(key, step).

  `images` / `labels` hold accumulation_steps x global_batch_size rows: the gradient is the mean over the
  micro-batches, each with its own Mixup / CutMix and dropout draws (official `main_finetune.py`: the loss
  divided by TRAIN.ACCUMULATION_STEPS, one optimizer step per ACCUMULATION_STEPS batches; it clips the partial
  sum after each micro-batch, here the mean is clipped once). A non-finite loss or gradient norm leaves
  parameters and optimizer state untouched (`run.guarded_update`).
  """
  aug = config.augment

  def loss_fn(params, images, labels, key):
    mix_key, dropout_key = jax.random.split(key)
    images, targets, _ = mixup.mixup_cutmix(
        mix_key, images, labels, num_classes=config.num_classes, mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix,
        prob=aug.mixup_prob, switch_prob=aug.mixup_switch_prob, label_smoothing=aug.label_smoothing,
        groups=aug.get("mixup_groups", 1))
    logits = model.apply({"params": params}, images, train=True, rngs={"dropout": dropout_key})
    return optax.softmax_cross_entropy(logits, targets).mean()  # timm SoftTargetCrossEntropy

  grad_fn = jax.value_and_grad(loss_fn)

  def train_step(state: TrainState, images: jax.Array, labels: jax.Array, key: jax.Array):
    loss, grads = run.accumulated_gradients(grad_fn, state.params, (images, labels),
                                            jax.random.fold_in(key, state.step), config.optimizer.accumulation_steps)
    params, opt_state, streak, grad_norm, _ = run.guarded_update(tx, state.params, state.opt_state, grads, loss,
                                                                 state.nonfinite_streak)
    step_metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step), "nonfinite_streak": streak}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, nonfinite_streak=streak), step_metrics

  return train_step


def build_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> run.StepSetup:
  """The jitted fine-tuning step of a *resolved* config on `mesh`: train_step(state, images, labels, key)."""
  model = build_classifier(config)
  tx, schedule = optim.create_finetune_optimizer(config, model.encoder)
  abstract_state = jax.eval_shape(lambda key: init_train_state(tx, init_params(model, key)), jax.random.key(0))
  state_shardings = sharding.state_shardings(abstract_state, mesh, config.mesh.fsdp_min_size)
  data_sharding, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  rows, size = config.global_batch_size * config.optimizer.accumulation_steps, config.img_size
  args = (jax.ShapeDtypeStruct((rows, size, size, model.encoder.in_chans), jnp.float32, sharding=data_sharding),
          jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=data_sharding), run.abstract_key(replicated))
  train_step = run.jit_step(make_train_step(config, model, tx, schedule), state_shardings,
                            (data_sharding, data_sharding, replicated), replicated)
  return run.StepSetup(train_step, abstract_state, state_shardings, args, data_sharding, replicated)


def classifier_train_flops_per_image(model: classifier.Classifier) -> int:
  """Model FLOPs of one fine-tuning image: 3 x (encoder forward + linear head)."""
  return 3 * (flops.encoder_forward_flops(model.encoder) + 2 * model.encoder.num_features * model.num_classes)


# ----------------------------------------------------------------------------------------------------
# The loop


def describe(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, dict]:
  """(the resolved config, facts for `run.describe`): the checks `train_and_evaluate` makes before writing
  (the pretrained run's encoder and the data's classes are read, nothing is written); shapes only. Data that
  is not there yet does not stop the description: its classes and images are what it declares, and the fact
  "data_not_ready" says how to prepare it."""
  data_not_ready = None
  try:
    config = resolve_config(config, "", check_memory=False)
  except DataNotReady as e:
    data_not_ready, config = str(e), resolve_config(config, "", declared_data=True, check_memory=False)
  model = build_classifier(config)
  abstract = jax.eval_shape(lambda key: init_params(model, key), jax.random.key(0))
  return config, {"encoder_fields": models.encoder_fields(model.encoder),
                  "parameters": run.count_parameters(abstract),
                  "parameters_note": "" if config.num_classes else " without the head (its classes come from the data)",
                  "flops_per_image": classifier_train_flops_per_image(model), "data_not_ready": data_not_ready,
                  "does_not_fit": memory_problem(config)}


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
  with run.owned_workdir(workdir, config, signature(config), "simmim-finetune"):
    return _run(config, workdir, read_only=False)


def _run(config: ml_collections.ConfigDict, workdir: str, read_only: bool) -> dict[str, float]:
  from simmim_jax.data import finetune_pipeline  # pylint: disable=g-import-not-at-top  (TensorFlow)

  model = build_classifier(config)
  total_steps, _, _ = optim.steps_from_config(config)
  images_per_step = config.global_batch_size * config.optimizer.accumulation_steps
  setup = build_step(config, sharding.create_mesh(config.mesh))
  tx, _ = optim.create_finetune_optimizer(config, model.encoder)
  init_key, step_key = jax.random.split(jax.random.key(config.seed))

  def init():  # a fresh start: the pretrained encoder (read-only) and a new head
    params = jax.device_get(jax.jit(lambda key: init_params(model, key))(init_key))
    if config.pretrained:
      params, report = with_pretrained_encoder(params, load_pretrained_encoder_params(config), model.encoder)
      run.report(f"Loaded {len(report['loaded'])} pretrained encoder arrays from {config.pretrained} (resized: "
                 f"{report['resized'] or 'none'}; dropped: {report['dropped']}; fresh: {report['fresh'] + ['head']})")
    return jax.jit(lambda p: init_train_state(tx, p), out_shardings=setup.state_shardings)(params)

  if read_only:
    checkpointer, (start_step, state, meta) = None, read_latest(workdir, setup.abstract_state, setup.state_shardings)
    state = init() if state is None else state
  else:
    checkpointer, start_step, state, meta = run.restore_or_init(workdir, config, signature(config),
                                                                setup.abstract_state, setup.state_shardings, init)
  best = {"top1": meta.get("best_top1", -1.0)}
  best_checkpointer = None if read_only else checkpoint.Checkpointer(os.path.join(workdir, BEST_DIRNAME), keep=1)
  eval_step = jax.jit(lambda params, images, labels, valid: {"": evaluate.classification_sums(
      model.apply({"params": params}, images), labels, valid)})
  result = {}

  def run_eval(step, state, batch=None):
    del batch
    result.update(evaluate.evaluate(eval_step, state.params, finetune_pipeline.create_eval_iterator(
        config.data, image_size=config.img_size, global_batch_size=config.global_batch_size), setup.data_sharding))
    if result["eval_top1"] > best["top1"] and best_checkpointer:
      best["top1"] = result["eval_top1"]
      # A run killed after this save but before its checkpoint of `step` redoes the step on resume, exactly:
      # best/<step> then already holds these parameters.
      if step not in best_checkpointer.all_steps():
        best_checkpointer.save(step, {"params": state.params}, {"step": step, **result})
    result["best_top1"] = best["top1"]
    run.report(f"eval step {step}: top-1 {result['eval_top1']:.2f}% | top-5 {result['eval_top5']:.2f}% | "
               f"loss {result['eval_loss']:.4f} | best top-1 {best['top1']:.2f}%")
    return dict(result)

  try:
    if config.eval_only or start_step >= total_steps:
      if not config.eval_only:
        run.report(f"Nothing to do: the checkpoint in {workdir} is at step {start_step} >= total steps {total_steps}.")
      scalars = run_eval(start_step, state)
      if not read_only:
        writer = metrics.MetricWriter(workdir, resume_step=start_step, enabled=jax.process_index() == 0,
                                      config=config)
        writer.write(start_step, scalars)
        writer.close()
      return result
    batches = finetune_pipeline.create_train_iterator(
        config.data, image_size=config.img_size, global_batch_size=images_per_step, seed=config.seed,
        start_step=start_step, randaugment_config=config.augment.randaugment, reprob=config.augment.reprob)
    run.report(f"Fine-tuning {config.model.name} ({'from ' + config.pretrained if config.pretrained else 'random init'}) "
               f"on {config.num_train_images} images of {config.num_classes} classes for {total_steps} steps of "
               f"{images_per_step} from step {start_step}; workdir {workdir}")
    sig = signature(config)
    run.train_loop(run.Loop(
        config=config, workdir=workdir, checkpointer=checkpointer, start_step=start_step, total_steps=total_steps,
        advance=lambda state, batch: setup.train_step(state, batch["image"], batch["label"], step_key),
        batches=batches, data_sharding=setup.data_sharding, images_per_step=images_per_step,
        flops_per_image=classifier_train_flops_per_image(model),
        meta=lambda step: {"signature": sig, "best_top1": best["top1"]},
        hooks=[run.Hook(config.eval_every_steps, run_eval)]), state)
    return result
  finally:
    for c in (checkpointer, best_checkpointer):
      if c:
        c.close()


