"""Linear probing of a frozen encoder (MAE `main_linprobe.py` protocol on SimMIM features).

The paper probes ViT-B's 8th block, average-pooled patch tokens (official issue #14); here any list of
1-based blocks (`config.probe_blocks`; Swin: stages) is probed at once, each by its own
BatchNorm(affine=False) + linear head (`models.classifier.LinearProbe`) trained with LARS (MAE: lr 0.1 per
256 images, no weight decay, cosine with warmup) on RandomResizedCrop + flip images. The encoder is the
pretrained run's architecture and weights as they are (`config.pretrained`), or a random initialization
of the configured encoder (the baseline). Its parameters are never trained or checkpointed; the workdir's
checkpoints hold the probe heads (resume: rerun the same command).

metrics.jsonl eval rows carry `eval_top1` / `eval_top5` / `eval_loss` of the first probed block and
`eval_top1_block<k>`, ... of every probed block.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from simmim_jax.train import downstream, evaluate, optim, run, sharding, validation
from simmim_jax.models import flops
from simmim_jax import models
from simmim_jax.models import classifier
from simmim_jax.train.validation import ConfigError


def encoder_params_for_probe(config, encoder, key) -> Any:
  """The frozen encoder's parameters: the pretrained run's (mask token dropped; read-only) or a random init."""
  if config.pretrained:
    params = dict(downstream.load_pretrained_encoder_params(config))
    params.pop("mask_token", None)
    return params
  images = jnp.zeros((1, encoder.img_size, encoder.img_size, encoder.in_chans), jnp.float32)
  return jax.device_get(jax.jit(lambda k: encoder.init(k, images)["params"])(key))


def signature(config) -> dict:
  return {**downstream.signature(config), "probe_blocks": [int(b) for b in config.probe_blocks],
          "pretrained": config.pretrained, "pretrained_step": int(config.pretrained_step)}


def make_train_step(encoder, probe, tx, schedule, blocks):
  """train_step(state, encoder_params, images, labels) -> (state, metrics): the frozen encoder's features
  of `blocks`, one BatchNorm + linear head each; a non-finite loss or gradient norm leaves the heads, their
  batch statistics and the optimizer state untouched."""

  def train_step(state: run.TrainState, encoder_params, images, labels):
    features = classifier.block_features(encoder, encoder_params, images, blocks)

    def loss_fn(params):
      logits, updated = probe.apply({"params": params, "batch_stats": state.batch_stats}, features, train=True,
                                    mutable=["batch_stats"])
      losses = [optax.softmax_cross_entropy_with_integer_labels(logits[k], labels).mean() for k in blocks]
      return sum(losses), updated["batch_stats"]  # heads are independent: the sum trains each on its own

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    params, opt_state, streak, grad_norm, finite = run.guarded_update(tx, state.params, state.opt_state, grads, loss,
                                                                      state.nonfinite_streak)
    new_state = run.TrainState(step=state.step + 1, params=params, opt_state=opt_state, nonfinite_streak=streak,
                               batch_stats=run.keep_if(finite, batch_stats, state.batch_stats))
    return new_state, {"loss": loss / len(blocks), "grad_norm": grad_norm, "lr": schedule(state.step),
                       "nonfinite_streak": streak}

  return train_step


def build_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, encoder, blocks: tuple[int, ...]):
  """(the jitted probe step of a *resolved* config on `mesh`, the abstract encoder parameters, the init
  function of the probe state): train_step(state, encoder_params, images, labels), heads replicated."""
  probe = classifier.LinearProbe(num_classes=config.num_classes, blocks=blocks)
  tx, schedule = optim.create_lars_optimizer(config)
  data_sharding, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  images = jnp.zeros((1, config.img_size, config.img_size, encoder.in_chans), jnp.float32)
  abstract_encoder = jax.eval_shape(lambda key: encoder.init(key, images)["params"], jax.random.key(0))
  feature_shapes = jax.eval_shape(lambda p: classifier.block_features(encoder, p, images, blocks), abstract_encoder)

  def init_state(key):
    variables = probe.init(key, {k: jnp.zeros(s.shape, jnp.float32) for k, s in feature_shapes.items()})
    return run.TrainState.create(tx, variables["params"], batch_stats=variables["batch_stats"])

  abstract_state = jax.eval_shape(init_state, jax.random.key(0))
  state_shardings = jax.tree.map(lambda _: replicated, abstract_state)
  rows, size = config.global_batch_size, config.img_size
  args = (replicated_abstract(abstract_encoder, replicated),
          jax.ShapeDtypeStruct((rows, size, size, encoder.in_chans), jnp.float32, sharding=data_sharding),
          jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=data_sharding))
  train_step = run.jit_step(make_train_step(encoder, probe, tx, schedule, blocks), state_shardings,
                            (replicated, data_sharding, data_sharding), replicated)
  setup = run.StepSetup(train_step, abstract_state, state_shardings, args, data_sharding, replicated)
  return setup, probe, init_state


def replicated_abstract(tree: Any, sharding_: Any) -> Any:
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding_), tree)


def resolve_probe_config(config: ml_collections.ConfigDict, *, declared_data: bool = False,
                         check_memory: bool = True):
  """`downstream.resolve_config` plus the probe's checks; returns (config, encoder, blocks)."""
  config = downstream.resolve_config(config, trains_encoder=False, declared_data=declared_data,
                                     check_memory=check_memory)
  validation.check_choice(config, "optimizer.name", optim.PROBE_OPTIMIZERS)
  if config.optimizer.accumulation_steps != 1:
    raise ConfigError(f"config.optimizer.accumulation_steps={config.optimizer.accumulation_steps}: the linear "
                      "probe updates BatchNorm statistics per batch and supports 1 (raise global_batch_size)")
  encoder, blocks = probe_encoder(config)
  num_blocks = len(encoder.depths) if hasattr(encoder, "depths") else encoder.depth
  if not blocks or any(not 1 <= b <= num_blocks for b in blocks):
    raise ConfigError(f"config.probe_blocks={blocks}: use 1-based blocks (Swin: stages) in 1..{num_blocks}")
  return config, encoder, blocks


def describe(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, dict]:
  """(the resolved config, facts for `run.describe`) after the checks `train_and_evaluate` makes before
  writing; shapes only. The parameters counted are the frozen encoder's. Data that is not there yet does not
  stop the description (see `finetune.describe`)."""
  data_not_ready = None
  try:
    config, encoder, _ = resolve_probe_config(config, check_memory=False)
  except validation.DataNotReady as e:
    data_not_ready = str(e)
    config, encoder, _ = resolve_probe_config(config, declared_data=True, check_memory=False)
  abstract = jax.eval_shape(lambda key: encoder.init(key, models.init_inputs(encoder)[0]), jax.random.key(0))
  return config, {"encoder_fields": models.encoder_fields(encoder),
                  "parameters": run.count_parameters(abstract["params"]), "parameters_note": " (frozen)",
                  "flops_per_image": flops.encoder_forward_flops(encoder), "data_not_ready": data_not_ready,
                  "does_not_fit": downstream.memory_problem(config, trains_encoder=False)}


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> run.Built:
  """The probe step of a *resolved* config on `mesh`. The frozen encoder's parameters (read or drawn once, on the
  first step or evaluation: `build` allocates nothing) are replicated beside the heads."""
  encoder, blocks = probe_encoder(config)
  setup, _, init_state = build_step(config, mesh, encoder, blocks)
  encoder_key = jax.random.split(jax.random.key(config.seed))[1]
  frozen = functools.cache(lambda: jax.device_put(encoder_params_for_probe(config, encoder, encoder_key),
                                                  setup.replicated))
  # Model FLOPs per image: the frozen encoder's forward (no backward through it); the heads are negligible.
  return run.Built(setup, init=lambda key, workdir: jax.jit(init_state, out_shardings=setup.state_shardings)(key),
                   advance=lambda state, batch, key: setup.train_step(state, frozen(), batch["image"], batch["label"]),
                   images_per_step=config.global_batch_size, flops_per_image=flops.encoder_forward_flops(encoder),
                   context=frozen)


def probe_encoder(config: ml_collections.ConfigDict) -> tuple[Any, tuple[int, ...]]:
  """(the frozen encoder, the probed blocks) of a *resolved* config."""
  encoder = downstream.build_encoder(config.model.to_dict(), config.img_size, models.DTYPES[config.dtype])
  return encoder, tuple(int(b) for b in config.probe_blocks)


class LinearProbing(run.Recipe):
  """Linear probing of a frozen encoder (MAE `main_linprobe.py` protocol on SimMIM features)."""
  name = "linear_probe"

  def resolve(self, config):
    return resolve_probe_config(config)[0]

  signature, build = staticmethod(signature), staticmethod(build)

  def batches(self, config, start_step, images_per_step):
    return downstream.train_batches(config, start_step, images_per_step)  # RandomResizedCrop + flip (MAE)

  def hooks(self, config, built, key):
    encoder, blocks = probe_encoder(config)
    probe = classifier.LinearProbe(num_classes=config.num_classes, blocks=blocks)
    frozen = built.context

    @jax.jit
    def eval_step(variables, images, labels, valid):
      params, batch_stats = variables
      features = classifier.block_features(encoder, frozen(), images, blocks)
      logits = probe.apply({"params": params, "batch_stats": batch_stats}, features)
      sums = {f"_block{k}": evaluate.classification_sums(logits[k], labels, valid) for k in blocks}
      return {"": sums[f"_block{blocks[0]}"], **sums}

    return [evaluate.hook(config, eval_step, built.setup.data_sharding,
                          inputs=lambda state: (state.params, state.batch_stats),
                          line=lambda step, r: f"eval step {step}: " + " | ".join(
                              f"block {k} top-1 {r[f'eval_top1_block{k}']:.2f}%" for k in blocks))]

  def banner(self, config):
    return (f"Linear probing blocks {tuple(config.probe_blocks)} of {config.model.name} "
            f"({'from ' + config.pretrained if config.pretrained else 'random init'}) on {config.num_train_images} "
            f"images of {config.num_classes} classes")

  def describe(self, config):
    return describe(config)


RECIPE = LinearProbing()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (or resumes) the linear probes (`run.train`); returns the last evaluation (see the module docstring)."""
  return run.train(RECIPE, config, workdir)[1]
