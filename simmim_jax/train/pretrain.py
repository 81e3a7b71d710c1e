"""SimMIM pretraining, a recipe of the run core (`run.Recipe`): the jitted step, its start (random or the
weights of a simmim-convert workdir), its batches and the reconstruction-image hook; `run.train` does the rest.

The recipe (official `main_simmim.py`): every step draws fresh block masks for the batch, runs the whole
SimMIM model on all tokens, and minimizes the masked L1 loss with AdamW (`optim.py`). Here the masks and
the dropout / drop-path randomness come from `fold_in(key, step)` on device, so a run is reproducible,
independent of how the batch is split over devices and hosts, and a resumed run continues exactly.

The workdir is the source of truth: `config.json`, `checkpoints/` (Orbax), `metrics.jsonl`,
`tensorboard/` and `reconstructions/step_<N>.png`. Rerunning the same command resumes from the latest
checkpoint (a larger `total_steps` extends the run).
"""

import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from simmim_jax.models import flops
from simmim_jax import masking, models
from simmim_jax.train import optim, run, sharding, validation
from simmim_jax.storage import visualize
from simmim_jax.storage import checkpoint as checkpoint_lib
from simmim_jax.storage import workdir as workdir_lib
from simmim_jax.train.validation import ConfigError

DATA_SOURCES = ("demo", "tfds", "folder", "array_record")  # array_record: Grain (data/array_record.py)


# ----------------------------------------------------------------------------------------------------
# Model and state


build_model = models.simmim_from_config  # the SimMIM module a pretraining config describes


def init_train_state(model: models.SimMIM, tx: optax.GradientTransformation, key: jax.Array) -> run.TrainState:
  return run.TrainState.create(tx, model.init(key, *models.init_inputs(model.encoder))["params"])


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

  def train_step(state: run.TrainState, images: jax.Array, key: jax.Array):
    mask_key, dropout_key = jax.random.split(jax.random.fold_in(key, state.step))
    mask = masking.random_mask(mask_key, images.shape[0], **mask_kwargs)
    loss, grads = run.accumulated_gradients(grad_fn, state.params, (images, mask), dropout_key, accumulation)
    params, opt_state, streak, grad_norm, _ = run.guarded_update(tx, state.params, state.opt_state, grads, loss,
                                                                 state.nonfinite_streak)
    step_metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step), "nonfinite_streak": streak}
    return run.TrainState(step=state.step + 1, params=params, opt_state=opt_state, nonfinite_streak=streak), step_metrics

  return train_step


# ----------------------------------------------------------------------------------------------------
# Validation (before anything compiles)


def validate_config(config: ml_collections.ConfigDict, *, check_data: bool = True,
                    check_memory: bool | None = None) -> None:
  """Raises ConfigError naming the key, the value and the fix. Reads only: nothing is written here.
  `check_data=False` skips looking at the data source (compiling for another machine), and so does the memory
  estimate against this machine (`validation.check_memory`, before the model is traced) unless `check_memory`
  says otherwise."""
  validation.check_run(config)
  validation.check_at_least(config, {"reconstruction_every_steps": 0, "num_reconstruction_images": 0,
                                     "norm_target_window": 0, "mask_patch_size": 1, "data.num_demo_images": 1,
                                     "data.demo_image_size": 1, "data.grain_workers": 0},
                            why={"reconstruction_every_steps": "0 = only at the end"})
  validation.check_choice(config, "optimizer.schedule", optim.SCHEDULES)
  validation.check_choice(config, "data.source", DATA_SOURCES)
  model = validation.check_model(
      lambda: build_model(config), f"config.model ({config.model.to_dict()}) at img_size={config.img_size}",
      lambda m: m.init(jax.random.key(0), *models.init_inputs(m.encoder)),
      before_tracing=lambda m: validation.check_traceable(
          config, m.encoder, memory={} if (check_data if check_memory is None else check_memory) else None))
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
      raise validation.DataNotReady(f"config.data.data_dir={config.data.data_dir!r}: {e}") from None
  if check_data and config.data.source == "tfds":
    validation.check_tfds_prepared(config.data)
  if check_data and config.data.source == "array_record":
    validation.check_array_record_prepared(config.data, config.data.split)


def describe(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, dict]:
  """(the config as it will run, facts for `run.describe`) after every check `train_and_evaluate` makes
  before writing; shapes only (--print_config). Data that is not there yet does not stop the description:
  the fact "data_not_ready" says how to prepare it (the data is checked last, after every other check)."""
  data_not_ready = None
  try:
    validate_config(config, check_memory=False)
  except validation.DataNotReady as e:
    data_not_ready = str(e)
  model = build_model(config)
  abstract = jax.eval_shape(lambda key: model.init(key, *models.init_inputs(model.encoder)), jax.random.key(0))
  return config, {"encoder_fields": models.encoder_fields(model.encoder),
                  "parameters": run.count_parameters(abstract["params"]),
                  "flops_per_image": flops.train_flops_per_image(model), "data_not_ready": data_not_ready,
                  "does_not_fit": validation.memory_problem(config, model.encoder)}


# ----------------------------------------------------------------------------------------------------
# The recipe


def build_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> run.StepSetup:
  """The jitted pretraining step on `mesh`: train_step(state, images, key)."""
  return build(config, mesh).setup


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> run.Built:
  """The pretraining step on `mesh` and how it starts: from the weights of a simmim-convert workdir (a fresh
  optimizer state), else a random initialization."""
  model = build_model(config)
  tx, schedule = optim.create_optimizer(config)
  abstract_state = jax.eval_shape(lambda key: init_train_state(model, tx, key), jax.random.key(0))
  state_shardings = sharding.state_shardings(abstract_state, mesh, config.mesh.fsdp_min_size)
  data_sharding, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  images_per_step = config.global_batch_size * config.optimizer.accumulation_steps
  images = jax.ShapeDtypeStruct((images_per_step, config.img_size, config.img_size, model.in_chans), jnp.float32,
                                sharding=data_sharding)
  train_step = run.jit_step(make_train_step(config, model, tx, schedule), state_shardings,
                            (data_sharding, replicated), replicated)
  setup = run.StepSetup(train_step, abstract_state, state_shardings, (images, run.abstract_key(replicated)),
                        data_sharding, replicated)

  def init(key, workdir):
    converted = workdir_lib.read_converted_params(workdir, checkpoint_lib.abstract_with_shardings(
        abstract_state.params, state_shardings.params))
    if converted is not None:
      run.report(f"Starting from the converted weights in {workdir} (fresh optimizer state)")
      return jax.jit(lambda p: run.TrainState.create(tx, p), out_shardings=state_shardings)(converted)
    return jax.jit(lambda key: init_train_state(model, tx, key), out_shardings=state_shardings)(key)

  return run.Built(setup, init, advance=lambda state, batch, key: train_step(state, batch["image"], key),
                   images_per_step=images_per_step, flops_per_image=flops.train_flops_per_image(model))


def reconstruction_hook(config: ml_collections.ConfigDict, built: run.Built, key: jax.Array) -> run.Hook:
  """Every `config.reconstruction_every_steps`: the first images of the step's batch, masked and reconstructed,
  as the image "reconstructions" (`visualize.reconstruction_grid`)."""
  model = build_model(config)
  shown = min(config.num_reconstruction_images, built.images_per_step)
  setup = built.setup

  def reconstruct(params, images, key):  # (images, mask, reconstruction) of the first `shown` images
    images = images[:shown]
    return (images, *models.reconstruct_masked(model, params, images, key, mask_patch_size=config.mask_patch_size,
                                               mask_ratio=config.mask_ratio))

  reconstruct = jax.jit(reconstruct, in_shardings=(setup.state_shardings.params, setup.data_sharding,
                                                   setup.replicated), out_shardings=setup.replicated)

  def save_reconstructions(step, state, batch):
    if batch is None:  # a finished run: no batch of its own
      return None
    images = jax.device_get(reconstruct(state.params, batch["image"], jax.random.fold_in(key, step)))
    grid = visualize.reconstruction_grid(*images, scale=max(1, 128 // config.img_size))  # demo images at >= 128 px
    return run.HookOutput(images={workdir_lib.RECONSTRUCTIONS_DIRNAME: grid})

  return run.Hook(config.reconstruction_every_steps, save_reconstructions)


class Pretraining(run.Recipe):
  """SimMIM pretraining (official `main_simmim.py`)."""
  name = "pretrain"

  def resolve(self, config):
    validate_config(config)
    return config

  build = staticmethod(build)

  def batches(self, config, start_step, images_per_step):
    from simmim_jax import data  # pylint: disable=g-import-not-at-top  (the input pipeline)
    return data.create_pretrain_iterator(config.data, image_size=config.img_size, global_batch_size=images_per_step,
                                         seed=config.seed, start_step=start_step)

  def hooks(self, config, built, key):
    return [reconstruction_hook(config, built, key)]

  def banner(self, config):
    return f"Pretraining {config.model.name} (SimMIM)"

  def describe(self, config):
    return describe(config)


RECIPE = Pretraining()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> run.TrainState:
  """Pretrains (or resumes pretraining) as `config` says; returns the final train state (`run.train`)."""
  return run.train(RECIPE, config, workdir)[0]
