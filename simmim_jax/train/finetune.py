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

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from simmim_jax.storage import pos_interpolation
from simmim_jax.train import downstream, evaluate, mixup, optim, run, sharding
from simmim_jax.models import flops
from simmim_jax import models
from simmim_jax.models import classifier
from simmim_jax.train.downstream import (build_classifier, load_pretrained_encoder_params, memory_problem,
                                         resolve_config, signature)
from simmim_jax.train.validation import DataNotReady


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

  def train_step(state: run.TrainState, images: jax.Array, labels: jax.Array, key: jax.Array):
    loss, grads = run.accumulated_gradients(grad_fn, state.params, (images, labels),
                                            jax.random.fold_in(key, state.step), config.optimizer.accumulation_steps)
    params, opt_state, streak, grad_norm, _ = run.guarded_update(tx, state.params, state.opt_state, grads, loss,
                                                                 state.nonfinite_streak)
    step_metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step), "nonfinite_streak": streak}
    return run.TrainState(step=state.step + 1, params=params, opt_state=opt_state, nonfinite_streak=streak), step_metrics

  return train_step


def build_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> run.StepSetup:
  """The jitted fine-tuning step of a *resolved* config on `mesh`: train_step(state, images, labels, key)."""
  return build(config, mesh).setup


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> run.Built:
  """The fine-tuning step of a *resolved* config on `mesh`, starting from the pretrained encoder (read only,
  remapped) and a new head."""
  model = build_classifier(config)
  tx, schedule = optim.create_finetune_optimizer(config, model.encoder)
  abstract_state = jax.eval_shape(lambda key: run.TrainState.create(tx, init_params(model, key)), jax.random.key(0))
  state_shardings = sharding.state_shardings(abstract_state, mesh, config.mesh.fsdp_min_size)
  data_sharding, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  rows, size = config.global_batch_size * config.optimizer.accumulation_steps, config.img_size
  args = (jax.ShapeDtypeStruct((rows, size, size, model.encoder.in_chans), jnp.float32, sharding=data_sharding),
          jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=data_sharding), run.abstract_key(replicated))
  train_step = run.jit_step(make_train_step(config, model, tx, schedule), state_shardings,
                            (data_sharding, data_sharding, replicated), replicated)

  def init(key, workdir):
    del workdir  # the pretrained weights come from config.pretrained, read only on a fresh start (as official)
    params = jax.device_get(jax.jit(lambda key: init_params(model, key))(key))
    if config.pretrained:
      params, report = with_pretrained_encoder(params, load_pretrained_encoder_params(config), model.encoder)
      run.report(f"Loaded {len(report['loaded'])} pretrained encoder arrays from {config.pretrained} (resized: "
                 f"{report['resized'] or 'none'}; dropped: {report['dropped']}; fresh: {report['fresh'] + ['head']})")
    return jax.jit(lambda p: run.TrainState.create(tx, p), out_shardings=state_shardings)(params)

  return run.Built(run.StepSetup(train_step, abstract_state, state_shardings, args, data_sharding, replicated), init,
                   advance=lambda state, batch, key: train_step(state, batch["image"], batch["label"], key),
                   images_per_step=rows, flops_per_image=classifier_train_flops_per_image(model))


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
    config = resolve_config(config, check_memory=False)
  except DataNotReady as e:
    data_not_ready, config = str(e), resolve_config(config, declared_data=True, check_memory=False)
  model = build_classifier(config)
  abstract = jax.eval_shape(lambda key: init_params(model, key), jax.random.key(0))
  return config, {"encoder_fields": models.encoder_fields(model.encoder),
                  "parameters": run.count_parameters(abstract),
                  "parameters_note": "" if config.num_classes else " without the head (its classes come from the data)",
                  "flops_per_image": classifier_train_flops_per_image(model), "data_not_ready": data_not_ready,
                  "does_not_fit": memory_problem(config)}


class FineTuning(run.Recipe):
  """Fine-tuning of a pretrained (or random) encoder for classification (official `main_finetune.py`)."""
  name = "finetune"
  best_metric = "eval_top1"  # best/: the parameters of the best eval top-1 so far (official max_accuracy)

  def resolve(self, config):
    return resolve_config(config)

  signature, build = staticmethod(signature), staticmethod(build)

  def batches(self, config, start_step, images_per_step):
    return downstream.train_batches(config, start_step, images_per_step,
                                    randaugment_config=config.augment.randaugment, reprob=config.augment.reprob)

  def hooks(self, config, built, key):
    model = build_classifier(config)
    eval_step = jax.jit(lambda params, images, labels, valid: {"": evaluate.classification_sums(
        model.apply({"params": params}, images), labels, valid)})
    return [evaluate.hook(config, eval_step, built.setup.data_sharding, line=lambda step, r: (
        f"eval step {step}: top-1 {r['eval_top1']:.2f}% | top-5 {r['eval_top5']:.2f}% | loss {r['eval_loss']:.4f}"))]

  def banner(self, config):
    return (f"Fine-tuning {config.model.name} ({'from ' + config.pretrained if config.pretrained else 'random init'})"
            f" on {config.num_train_images} images of {config.num_classes} classes")

  def describe(self, config):
    return describe(config)


RECIPE = FineTuning()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Fine-tunes (or resumes, or with `config.eval_only` evaluates) as `config` says (`run.train`); returns the
  last evaluation {"eval_top1", "eval_top5", "eval_loss", and "best_top1" unless eval_only}."""
  return run.train(RECIPE, config, workdir)[1]
