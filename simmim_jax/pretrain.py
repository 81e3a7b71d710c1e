"""SimMIM pretraining: the train state, one jitted train step, and the loop `train_and_evaluate`.

The recipe (official `main_simmim.py`): every step draws fresh block masks for the batch, runs the whole
SimMIM model on all tokens, and minimizes the masked L1 loss with AdamW (`optim.py`). Here the masks and
the dropout / drop-path randomness come from `fold_in(key, step)` on device, so a run is reproducible,
independent of how the batch is split over devices and hosts, and a resumed run continues exactly.

The workdir is the source of truth: `config.json`, `checkpoints/` (Orbax), `metrics.jsonl`,
`tensorboard/` and `reconstructions/step_<N>.png`. Rerunning the same command resumes from the latest
checkpoint (a larger `total_steps` extends the run).
"""

import os
import signal
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from jax.experimental import multihost_utils

from simmim_jax import checkpoint, flops, losses, masking, metrics, models, optim, sharding, validation, visualize
from simmim_jax import workdir as workdir_lib
from simmim_jax.validation import ConfigError

DTYPES = models.DTYPES
DATA_SOURCES = ("demo", "tfds", "folder")


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: train steps done (skipped non-finite updates included)
  params: Any
  opt_state: Any
  nonfinite_streak: jax.Array  # int32 scalar: consecutive steps whose update was skipped (non-finite)


# ----------------------------------------------------------------------------------------------------
# Model and state


build_model = models.simmim_from_config  # the SimMIM module a pretraining config describes


def init_train_state(model: models.SimMIM, tx: optax.GradientTransformation, key: jax.Array) -> TrainState:
  params = model.init(key, *models.init_inputs(model.encoder))["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    nonfinite_streak=jnp.zeros((), jnp.int32))


def abstract_train_state(config: ml_collections.ConfigDict, model: models.SimMIM) -> TrainState:
  """The train state as ShapeDtypeStructs (no computation, no memory)."""
  tx, _ = optim.create_optimizer(config)
  return jax.eval_shape(lambda key: init_train_state(model, tx, key), jax.random.key(0))


def model_signature(config: ml_collections.ConfigDict) -> dict:
  """What a checkpoint must agree with to be resumed by this config (not remat / attention_impl)."""
  return {"model": models.parameter_fields(config.model.to_dict()), "img_size": int(config.img_size)}


# ----------------------------------------------------------------------------------------------------
# Train step


def make_train_step(config: ml_collections.ConfigDict, model: models.SimMIM,
                    tx: optax.GradientTransformation, schedule: optax.Schedule):
  """Returns train_step(state, images, key) -> (state, metrics).

  `images` is the global batch of one update, [accumulation_steps * global_batch_size, H, W, C]; masks
  and dropout rngs come from fold_in(key, state.step). A step whose loss or gradient norm is not finite
  leaves params and optimizer state untouched (no NaN ever reaches them) and counts in
  `nonfinite_streak`; the loop stops after `config.max_nonfinite_steps` such steps in a row.
  """
  accumulation = config.optimizer.accumulation_steps
  mask_kwargs = dict(input_size=config.img_size, mask_patch_size=config.mask_patch_size,
                     model_patch_size=model.encoder.patch_size, mask_ratio=config.mask_ratio)

  def loss_fn(params, images, mask, dropout_key):
    return model.apply({"params": params}, images, mask, train=True, rngs={"dropout": dropout_key})["loss"]

  grad_fn = jax.value_and_grad(loss_fn)

  def train_step(state: TrainState, images: jax.Array, key: jax.Array):
    mask_key, dropout_key = jax.random.split(jax.random.fold_in(key, state.step))
    num_images = images.shape[0]
    mask = masking.random_mask(mask_key, num_images, **mask_kwargs)
    if accumulation == 1:
      loss, grads = grad_fn(state.params, images, mask, dropout_key)
    else:
      # Micro-batch j = rows j, j + k, j + 2k, ... (k = accumulation): every device's contiguous shard
      # of the batch contributes to every micro-batch, so no data moves between devices.
      def split_micro(x):
        x = x.reshape((num_images // accumulation, accumulation) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

      def accumulate(carry, micro):
        loss_sum, grad_sum = carry
        loss, grads = grad_fn(state.params, *micro)
        return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      micro_batches = (split_micro(images), split_micro(mask), jax.random.split(dropout_key, accumulation))
      (loss, grads), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros), micro_batches)
      loss = loss / accumulation
      grads = jax.tree.map(lambda g: g / accumulation, grads)
    grad_norm = optax.tree.norm(grads)  # before clipping, as the official log
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep_if_finite = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    streak = jnp.where(finite, 0, state.nonfinite_streak + 1).astype(jnp.int32)
    step_metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step),
                    "nonfinite_streak": streak}
    new_state = TrainState(step=state.step + 1, params=keep_if_finite(params, state.params),
                           opt_state=keep_if_finite(opt_state, state.opt_state), nonfinite_streak=streak)
    return new_state, step_metrics

  return train_step


def make_reconstruct_fn(config: ml_collections.ConfigDict, model: models.SimMIM, num_images: int):
  """reconstruct(params, images, key) -> (images[:n], mask, reconstruction in pixel-normalized space)."""

  def reconstruct(params, images, key):
    images = images[:num_images]
    mask = masking.random_mask(key, num_images, input_size=config.img_size,
                               mask_patch_size=config.mask_patch_size,
                               model_patch_size=model.encoder.patch_size, mask_ratio=config.mask_ratio)
    prediction = model.apply({"params": params}, images, mask)["reconstruction"]
    if model.norm_target_window:  # the head predicts locally normalized pixels: map back to the image
      mean, std = losses.local_target_statistics(images, model.norm_target_window)
      prediction = prediction * std + mean
    return images, mask, prediction

  return reconstruct


# ----------------------------------------------------------------------------------------------------
# Validation (before anything compiles)


def validate_config(config: ml_collections.ConfigDict, workdir: str, *, check_data: bool = True) -> None:
  """Raises ConfigError naming the key, the value and the fix. Reads only: nothing is written here.
  `check_data=False` skips looking at the data source (compiling for another machine)."""
  del workdir  # checked by workdir.open_for_writing, after every config check
  validation.check_run(config)
  validation.check_at_least(config, {"reconstruction_every_steps": 0, "num_reconstruction_images": 0,
                                     "norm_target_window": 0, "mask_patch_size": 1, "data.num_demo_images": 1,
                                     "data.demo_image_size": 1},
                            why={"reconstruction_every_steps": "0 = only at the end"})
  validation.check_choice(config, "optimizer.schedule", optim.SCHEDULES)
  validation.check_choice(config, "data.source", DATA_SOURCES)
  model = validation.check_model(lambda: build_model(config), f"config.model ({config.model.to_dict()}) at "
                                 f"img_size={config.img_size}", lambda m: m.init(jax.random.key(0),
                                                                                 *models.init_inputs(m.encoder)))
  try:
    masking.mask_geometry(input_size=config.img_size, mask_patch_size=config.mask_patch_size,
                          model_patch_size=model.encoder.patch_size, mask_ratio=config.mask_ratio)
  except ValueError as e:
    raise ConfigError(f"config.img_size / mask_patch_size / mask_ratio with the encoder's patch_size="
                      f"{model.encoder.patch_size}: {e}") from None
  total_steps, _, _ = optim.steps_from_config(config)
  if total_steps <= 0:
    raise ConfigError(f"config.total_steps={config.total_steps} / num_epochs={config.num_epochs} give no steps")
  if check_data and config.data.source == "folder":
    from simmim_jax.data import decode, image_files  # pylint: disable=g-import-not-at-top  (TF-free)
    try:
      files = image_files.list_image_files(config.data.data_dir)
      decode.first_readable(files, config.data.data_dir, strict=config.data.strict,
                            max_pixels=decode.max_image_pixels(config.img_size, config.data.max_image_pixels))
    except ValueError as e:
      raise ConfigError(f"config.data.data_dir={config.data.data_dir!r}: {e}") from None
  if check_data and config.data.source == "tfds":
    _validate_tfds_source(config.data)


validate_batch_and_mesh = validation.check_batch_and_mesh


def _validate_tfds_source(data_config) -> None:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (imports TF lazily)

  try:
    builder = tfds.builder(data_config.name, data_dir=data_config.data_dir or None)
  except Exception as e:  # pylint: disable=broad-except  (tfds raises DatasetNotFoundError and others)
    raise ConfigError(f"config.data.name={data_config.name!r} (data_dir={data_config.data_dir!r}) is not a "
                      f"tensorflow-datasets dataset: {type(e).__name__}: {str(e).splitlines()[0]}") from None
  if not builder.is_prepared():
    raise ConfigError(
        f"tfds dataset {data_config.name!r} is not prepared in {builder.data_dir}: prepare it once "
        f"(`tfds build {data_config.name} --data_dir=DIR`; ImageNet needs its manually downloaded archives) "
        "and set config.data.data_dir=DIR")


# ----------------------------------------------------------------------------------------------------
# The loop

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: stopped early, resumable


class Preempted(Exception):
  """Raised after a preemption checkpoint was written; rerunning the same command resumes."""


class NonFiniteError(RuntimeError):
  """Too many consecutive steps with a non-finite loss or gradient norm."""


class StopRequest:
  """SIGTERM (a preemption or maintenance notice) -> stop at the next step boundary.

  On one process a SIGTERM handler sets a flag. On several, jax.distributed's preemption service catches
  SIGTERM and `reached_preemption_sync_point(step)` is true at the same step on every process, so all of
  them save the same step.
  """

  def __init__(self):
    self._signalled = False
    self._previous_handler = None
    if jax.process_count() == 1:
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self._signalled = True

  def should_stop(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self._signalled
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # the preemption service is not running
      return False

  def close(self) -> None:
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Pretrains (or resumes pretraining) as `config` says; returns the final train state.

  Every check runs before anything is written: a refused run leaves `workdir` as it was."""
  validate_config(config, workdir)
  lock = workdir_lib.open_for_writing(workdir, config, model_signature(config), "simmim-pretrain")
  try:
    return _train(config, workdir)
  finally:
    if lock:
      lock.release()


def _train(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  is_main = jax.process_index() == 0
  model = build_model(config)
  tx, schedule = optim.create_optimizer(config)
  total_steps, _, _ = optim.steps_from_config(config)
  images_per_step = config.global_batch_size * config.optimizer.accumulation_steps

  mesh = sharding.create_mesh(config.mesh)
  abstract_state = jax.eval_shape(lambda key: init_train_state(model, tx, key), jax.random.key(0))
  state_shardings = sharding.state_shardings(abstract_state, mesh, config.mesh.fsdp_min_size)
  data_sharding = sharding.batch_sharding(mesh)
  replicated = sharding.replicated(mesh)

  root_key = jax.random.key(config.seed)
  init_key, step_key, visual_key = jax.random.split(root_key, 3)

  # Step 0 too: a workdir written by simmim-convert starts from its weights.
  checkpointer, start_step, state, _ = workdir_lib.resume(workdir, config.keep_checkpoints, model_signature(config),
                                                          abstract_state, state_shardings, include_step_zero=True)
  if state is None:
    state = jax.jit(lambda key: init_train_state(model, tx, key), out_shardings=state_shardings)(init_key)
  if start_step >= total_steps:
    _report(f"Nothing to do: the checkpoint in {workdir} is at step {start_step} >= total steps {total_steps}.")
    checkpointer.close()
    return state

  from simmim_jax import data  # the input pipeline (TensorFlow) only when training

  batches = data.create_pretrain_iterator(config.data, image_size=config.img_size,
                                          global_batch_size=images_per_step, seed=config.seed,
                                          start_step=start_step)
  train_step = jax.jit(make_train_step(config, model, tx, schedule),
                       in_shardings=(state_shardings, data_sharding, replicated),
                       out_shardings=(state_shardings, replicated), donate_argnums=(0,))
  num_visual = min(config.num_reconstruction_images, images_per_step)
  reconstruct = jax.jit(make_reconstruct_fn(config, model, num_visual),
                        in_shardings=(state_shardings.params, data_sharding, replicated),
                        out_shardings=replicated)

  writer = metrics.MetricWriter(workdir, resume_step=start_step, enabled=is_main)
  signature = model_signature(config)
  _report(f"Pretraining {config.model.name} (SimMIM) for {total_steps} steps of {images_per_step} images "
          f"from step {start_step} on {jax.device_count()} device(s), {jax.process_count()} process(es); "
          f"workdir {workdir}")

  stop_request = StopRequest()
  step_logger = _StepLogger(config, writer, total_steps, start_step)
  try:
    for step in range(start_step + 1, total_steps + 1):
      images = data.make_global_batch(next(batches), data_sharding)["image"]
      state, step_metrics = train_step(state, images, step_key)
      step_logger.push(step, step_metrics)
      preempted = stop_request.should_stop(step)
      if step % config.checkpoint_every_steps == 0 or step == total_steps or preempted:
        step_logger.flush()
        _check_finite(state, step)
        checkpointer.save(step, state, {"step": step, "signature": signature})
      if preempted:
        checkpointer.wait()
        raise Preempted(f"Stopped by SIGTERM after step {step}: checkpoint saved in {checkpointer.directory}; "
                        "rerun the same command to resume.")
      if step == total_steps or (config.reconstruction_every_steps
                                 and step % config.reconstruction_every_steps == 0):
        shown = jax.device_get(reconstruct(state.params, images, jax.random.fold_in(visual_key, step)))
        if is_main:
          visualize.save_png(visualize.reconstruction_grid(*shown),
                             os.path.join(workdir, "reconstructions", f"step_{step}.png"),
                             scale=max(1, 128 // config.img_size))  # small demo images at >= 128 px
    checkpointer.wait()
  finally:
    stop_request.close()
    writer.close()
    checkpointer.close()
  _report(f"Done: {total_steps} steps; checkpoints in {checkpointer.directory}")
  return state


def _report(message: str) -> None:
  """Every process logs; process 0 also prints to stdout."""
  logging.info(message)
  if jax.process_index() == 0:
    print(message, flush=True)


class _StepLogger:
  """Fetches each step's metrics one step after dispatch (which bounds the asynchronous queue: CPU meshes
  of 4+ devices deadlock otherwise), stops on repeated non-finite steps, and logs on log steps, the first
  step of a run and the last (progress line on process 0, metrics.jsonl + TensorBoard)."""

  def __init__(self, config: ml_collections.ConfigDict, writer: metrics.MetricWriter, total_steps: int,
               start_step: int):
    self.writer, self.total_steps, self.start_step = writer, total_steps, start_step
    self.log_every = max(config.log_every_steps, 1)
    self.max_nonfinite_steps = config.max_nonfinite_steps
    self.images_per_step = config.global_batch_size * config.optimizer.accumulation_steps
    # Model FLOPs per image (computed once) and the device's peak: tflops_per_device and mfu per log.
    self.flops_per_image = flops.train_flops_per_image(build_model(config))
    self.peak_flops = flops.peak_flops_per_device(jax.devices()[0].device_kind, config.dtype)
    self.clock = metrics.Throughput()
    self.pending = None
    self.skipped_steps = 0

  def push(self, step: int, step_metrics: dict) -> None:
    self.flush()
    self.pending = (step, step_metrics)
    if step == self.start_step + 1:
      jax.block_until_ready(step_metrics)  # exclude compilation from the throughput clock
      self.clock.start(step)

  def flush(self) -> None:
    if self.pending is not None:
      step, step_metrics = self.pending
      self.pending = None
      self._finish(step, jax.device_get(step_metrics))

  def _finish(self, step: int, step_metrics: dict) -> None:
    streak = int(step_metrics.pop("nonfinite_streak"))
    if streak:
      self.skipped_steps += 1
      logging.warning("Step %d: loss %s, gradient norm %s: update skipped (%d in a row)", step,
                      step_metrics["loss"], step_metrics["grad_norm"], streak)
      if streak >= self.max_nonfinite_steps:
        raise NonFiniteError(
            f"the loss or gradient norm was not finite for {streak} consecutive steps (up to step {step}; "
            f"config.max_nonfinite_steps={self.max_nonfinite_steps}). The parameters were left untouched by "
            "those steps and no checkpoint was written after them. Lower config.optimizer.base_lr, raise "
            "config.warmup_steps, compute in config.dtype='float32', or check the input data.")
    if step % self.log_every and step not in (self.start_step + 1, self.total_steps):
      return
    from simmim_jax import data  # pylint: disable=g-import-not-at-top

    scalars = {k: float(v) for k, v in step_metrics.items()}
    steps_per_sec, _ = self.clock.rate(step)
    scalars.update(flops.throughput_metrics(steps_per_sec * self.images_per_step, jax.device_count(),
                                            self.flops_per_image, self.peak_flops))
    scalars["skipped_steps"] = self.skipped_steps  # non-finite updates skipped in this run
    scalars["skipped_images"] = data.skipped_image_count()  # undecodable images skipped by this process
    eta = (self.total_steps - step) / steps_per_sec if steps_per_sec else None
    self.writer.write(step, scalars)
    if jax.process_index() == 0:
      print(metrics.progress_line(step, self.total_steps, scalars, eta), flush=True)


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def _check_finite(state: TrainState, step: int) -> None:
  """Never write a checkpoint with non-finite parameters."""
  if not bool(_all_finite(state.params)):
    raise FloatingPointError(f"non-finite parameters at step {step}: not writing a checkpoint")
