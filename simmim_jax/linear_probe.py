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

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from simmim_jax import checkpoint, finetune, metrics, optim, sharding, validation
from simmim_jax import workdir as workdir_lib
from simmim_jax.models import classifier
from simmim_jax.validation import ConfigError


@flax.struct.dataclass
class ProbeState:
  step: jax.Array
  params: Any        # {"probe_<k>": {"head": ...}}
  batch_stats: Any   # {"probe_<k>": {"bn": {"mean", "var"}}}
  opt_state: Any


def encoder_params_for_probe(config, encoder, key) -> Any:
  """The frozen encoder's parameters: the pretrained run's (mask token dropped) or a random init."""
  if config.pretrained:
    params = dict(finetune.load_pretrained_encoder_params(config))
    params.pop("mask_token", None)
    return params
  images = jnp.zeros((1, encoder.img_size, encoder.img_size, encoder.in_chans), jnp.float32)
  return jax.device_get(jax.jit(lambda k: encoder.init(k, images)["params"])(key))


def signature(config) -> dict:
  return {**finetune.signature(config), "probe_blocks": [int(b) for b in config.probe_blocks],
          "pretrained": config.pretrained, "pretrained_step": int(config.pretrained_step)}


def make_train_step(encoder, probe, tx, schedule, blocks):
  def train_step(state: ProbeState, encoder_params, images, labels):
    features = classifier.block_features(encoder, encoder_params, images, blocks)

    def loss_fn(params):
      logits, updated = probe.apply({"params": params, "batch_stats": state.batch_stats}, features, train=True,
                                    mutable=["batch_stats"])
      losses = [optax.softmax_cross_entropy_with_integer_labels(logits[k], labels).mean() for k in blocks]
      return sum(losses), updated["batch_stats"]  # heads are independent: the sum trains each on its own

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = ProbeState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                           batch_stats=batch_stats, opt_state=opt_state)
    return new_state, {"loss": loss / len(blocks), "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}

  return train_step


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (or resumes) the linear probes; returns the last evaluation (see the module docstring).

  Every check runs before anything is written: a refused run leaves `workdir` as it was."""
  config = finetune.resolve_config(config, workdir)
  validation.check_choice(config, "optimizer.name", optim.PROBE_OPTIMIZERS)
  blocks = tuple(int(b) for b in config.probe_blocks)
  encoder = finetune.build_encoder(config.model.to_dict(), config.img_size, finetune.DTYPES[config.dtype])
  num_blocks = len(encoder.depths) if hasattr(encoder, "depths") else encoder.depth
  if not blocks or any(not 1 <= b <= num_blocks for b in blocks):
    raise ConfigError(f"config.probe_blocks={blocks}: use 1-based blocks (Swin: stages) in 1..{num_blocks}")
  lock = workdir_lib.open_for_writing(workdir, config, signature(config), "simmim-linear-probe")
  try:
    return _train(config, workdir, encoder, blocks)
  finally:
    if lock:
      lock.release()


def _train(config: ml_collections.ConfigDict, workdir: str, encoder, blocks: tuple[int, ...]) -> dict[str, float]:
  is_main = jax.process_index() == 0
  from simmim_jax.data import finetune_pipeline  # pylint: disable=g-import-not-at-top  (TensorFlow)

  probe = classifier.LinearProbe(num_classes=config.num_classes, blocks=blocks)
  tx, schedule = optim.create_lars_optimizer(config)
  total_steps, _, _ = optim.steps_from_config(config)
  mesh = sharding.create_mesh(config.mesh)
  data_sharding, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  init_key, encoder_key = jax.random.split(jax.random.key(config.seed))

  images = jnp.zeros((1, config.img_size, config.img_size, encoder.in_chans), jnp.float32)
  feature_shapes = jax.eval_shape(lambda key: classifier.block_features(
      encoder, encoder.init(key, images)["params"], images, blocks), init_key)

  def init_state(key):
    features = {k: jnp.zeros(s.shape, jnp.float32) for k, s in feature_shapes.items()}
    variables = probe.init(key, features)
    return ProbeState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                      batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]))

  abstract_state = jax.eval_shape(init_state, init_key)
  state_shardings = jax.tree.map(lambda _: replicated, abstract_state)
  encoder_params = jax.device_put(encoder_params_for_probe(config, encoder, encoder_key), replicated)

  checkpointer, start_step, state, _ = workdir_lib.resume(workdir, config.keep_checkpoints, signature(config),
                                                          abstract_state, state_shardings)
  if state is None:
    state = jax.jit(init_state, out_shardings=state_shardings)(init_key)

  def eval_logits(params, batch_stats, encoder_params, images, labels, valid):
    features = classifier.block_features(encoder, encoder_params, images, blocks)
    logits = probe.apply({"params": params, "batch_stats": batch_stats}, features)
    sums = {f"_block{k}": finetune.classification_sums(logits[k], labels, valid) for k in blocks}
    return {"": sums[f"_block{blocks[0]}"], **sums}

  eval_jit = jax.jit(eval_logits)
  writer = metrics.MetricWriter(workdir, resume_step=start_step, enabled=is_main)
  result = {}

  def run_eval(step, state):
    eval_step = lambda params, images, labels, valid: eval_jit(params, state.batch_stats, encoder_params,
                                                               images, labels, valid)
    batches = finetune_pipeline.create_eval_iterator(config.data, image_size=config.img_size,
                                                     global_batch_size=config.global_batch_size)
    result.update(finetune.evaluate(eval_step, state.params, batches, data_sharding))
    writer.write(step, result)
    if is_main:
      print(f"eval step {step}: " + " | ".join(f"block {k} top-1 {result[f'eval_top1_block{k}']:.2f}%"
                                               for k in blocks), flush=True)

  if start_step >= total_steps:
    run_eval(start_step, state)
  else:
    batches = finetune_pipeline.create_train_iterator(
        config.data, image_size=config.img_size, global_batch_size=config.global_batch_size, seed=config.seed,
        start_step=start_step)  # RandomResizedCrop + flip only (MAE linear probe)
    step_jit = jax.jit(make_train_step(encoder, probe, tx, schedule, blocks),
                       in_shardings=(state_shardings, replicated, data_sharding, data_sharding),
                       out_shardings=(state_shardings, replicated), donate_argnums=(0,))
    print(f"Linear probing blocks {blocks} of {config.model.name} "
          f"({'from ' + config.pretrained if config.pretrained else 'random init'}) on {config.num_train_images} "
          f"images of {config.num_classes} classes for {total_steps} steps from step {start_step}", flush=True)
    finetune.run_loop(config, state, lambda s, images, labels, key: step_jit(s, encoder_params, images, labels),
                      batches, data_sharding, jax.random.key(0), start_step, total_steps, writer,
                      lambda step, s: checkpointer.save(step, s, {"step": step, "signature": signature(config)}),
                      run_eval)
  checkpointer.close()
  writer.close()
  return result
