"""The run core: what every recipe shares, written once. A recipe (`Recipe`: `pretrain.py`, `finetune.py`,
`linear_probe.py`, or one of your own) gives its checks, its signature, its step (`Built`), its batches and its
hooks; `train(recipe, config, workdir)` does the rest, so a guarantee proven for one recipe holds for all:
  * `owned_workdir`: every config check has passed; the workdir is checked, locked and `config.json` written
    (with the recipe's name);
  * `restore_or_init`: the latest readable checkpoint of the same model, or a fresh state (`workdir.resume`);
    the signature goes into every checkpoint's meta;
  * `jit_step`: a step jitted with its shardings, the state donated (the AOT compile uses it too);
  * `accumulated_gradients` / `guarded_update`: gradient accumulation over micro-batches, and an update that
    leaves parameters and optimizer state untouched when the loss or gradient norm is not finite;
  * `train_loop`: the loop. Metrics are fetched one step after dispatch (which also bounds the asynchronous
    queue: CPU meshes of 4+ devices deadlock otherwise); non-finite steps are skipped and
    `config.max_nonfinite_steps` of them in a row stop the run; SIGTERM saves a checkpoint at a step
    boundary agreed by every process and raises `Preempted` (exit 143), Ctrl-C does the same and raises
    `Interrupted` (exit 130; a second Ctrl-C stops at once), and before the first step either stops with
    nothing to save (`StopRequest`); parameters are checked finite before every save; periodic and final
    checkpoints, each checked written at the first step boundary after its asynchronous write ends;
    metrics.jsonl + TensorBoard + the progress line with ETA, img/s, TFLOP/s and MFU; hooks (evaluation,
    reconstruction images) at their cadence and at the end, whose scalars and images the metric writer
    writes; `best/` after the step's checkpoint when a hook reaches a new best; running out of device memory
    is one line naming the step and the ways out;
  * a finished run does no step: its hooks run once on the final state; `config.eval_only` only reads.
"""

import contextlib
import dataclasses
import math
import os
import signal
import sys
import threading
from typing import Any, Callable, Iterator, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from jax.experimental import multihost_utils

from simmim_jax.storage import checkpoint, logs, metrics
from simmim_jax.models import flops
from simmim_jax.train import optim, sharding, validation
from simmim_jax.storage import workdir as workdir_lib

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: stopped early after saving, resumable
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT: Ctrl-C


class Preempted(Exception):
  """Raised after SIGTERM once the last step's checkpoint was written; rerunning the same command resumes."""
  exit_code = PREEMPTED_EXIT_CODE


class Interrupted(Exception):
  """Raised after Ctrl-C (SIGINT) once the last step's checkpoint was written, or before the first step when
  there was nothing to save; rerunning the same command resumes."""
  exit_code = INTERRUPTED_EXIT_CODE


class StoppedBeforeStart(RuntimeError):
  """SIGTERM before the first step: nothing new to save, so not "saved and preempted" (a plain stop, exit 1)."""


class OutOfMemoryError(RuntimeError):
  """The accelerator ran out of memory during the run (XLA's RESOURCE_EXHAUSTED)."""


class NonFiniteError(RuntimeError):
  """Too many consecutive steps with a non-finite loss or gradient norm."""


# ----------------------------------------------------------------------------------------------------
# Start: the workdir, the state, the step


@contextlib.contextmanager
def owned_workdir(workdir: str, config: ml_collections.ConfigDict, signature: dict, program: str, *, recipe: str):
  """Takes `workdir` for this run (checks, lock, config.json; see `workdir.open_for_writing`) and releases
  the lock when the block ends, however it ends. Call it after every config check has passed. SIGTERM and
  SIGINT are caught from here on (`StopRequest`): the run stops at a step boundary, saving that step."""
  stop_request = StopRequest()
  try:
    lock = workdir_lib.open_for_writing(workdir, config, signature, program, recipe=recipe)
  except BaseException:
    stop_request.close()
    raise
  # run.log (logs.py): process 0, local folders (an object store has no append).
  log_file = logs.write_to(workdir) if jax.process_index() == 0 and "://" not in workdir else None
  try:
    yield
  finally:
    stop_request.close()
    if log_file:
      logs.stop_writing(log_file)
    if lock:
      lock.release()


def restore_or_init(workdir: str, config: ml_collections.ConfigDict, signature: dict, abstract_state: Any,
                    state_shardings: Any, init: Callable[[], Any]):
  """(checkpointer, start_step, state, meta): the latest readable checkpoint of `signature`'s model, or
  `init()` (a state placed on `state_shardings`) at step 0 when there is none."""
  checkpointer, step, state, meta = workdir_lib.resume(workdir, config.keep_checkpoints, signature,
                                                       abstract_state, state_shardings)
  if state is None:
    state = init()
  return checkpointer, step, state, meta


def jit_step(step: Callable, state_shardings: Any, arg_shardings: Sequence[Any], metrics_sharding: Any):
  """`step(state, *args) -> (state, metrics)` jitted with its shardings; the input state is donated."""
  return jax.jit(step, in_shardings=(state_shardings, *arg_shardings),
                 out_shardings=(state_shardings, metrics_sharding), donate_argnums=(0,))


@dataclasses.dataclass(frozen=True)
class StepSetup:
  """A recipe's jitted step `train_step(state, *args) -> (state, metrics)` and what it runs on. The same
  object trains (the recipe's loop), compiles ahead of time (`aot.py`) and lowers for other platforms."""
  train_step: Callable
  abstract_state: Any   # the train state as ShapeDtypeStructs
  state_shardings: Any
  abstract_args: tuple  # the arguments after the state, as ShapeDtypeStructs with their shardings
  data_sharding: Any
  replicated: Any

  def abstract_inputs(self) -> tuple:
    """(state, *args) as ShapeDtypeStructs with shardings: nothing allocated, ready for `.lower(...)`."""
    return (checkpoint.abstract_with_shardings(self.abstract_state, self.state_shardings), *self.abstract_args)


def abstract_key(sharding: Any) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding)


@flax.struct.dataclass
class TrainState:
  """The train state of every recipe."""
  step: jax.Array  # int32 scalar: optimizer updates done (skipped non-finite updates included)
  params: Any      # what the optimizer trains
  opt_state: Any
  nonfinite_streak: jax.Array  # int32 scalar: consecutive steps whose update was skipped (non-finite)
  batch_stats: Any = None  # statistics a step updates without the optimizer (the probe's BatchNorm); else None

  @classmethod
  def create(cls, tx: optax.GradientTransformation, params: Any, batch_stats: Any = None) -> "TrainState":
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
               nonfinite_streak=jnp.zeros((), jnp.int32), batch_stats=batch_stats)


@dataclasses.dataclass(frozen=True)
class Built:
  """What `Recipe.build` returns: the jitted step with its abstract state and shardings (`setup`), and how the
  core starts and advances it.

  `init(key, workdir)` returns a fresh state placed on `setup.state_shardings` (it may read the workdir's
  converted weights, never write); `advance(state, batch, key)` runs one update on a global batch and returns
  (state, metrics with at least loss, grad_norm, lr and nonfinite_streak); `params(state)` is what must be
  finite before a save and what `best/` keeps.
  """
  setup: StepSetup
  init: Callable[[jax.Array, str], Any]
  advance: Callable[[Any, dict, jax.Array], tuple[Any, dict]]
  images_per_step: int
  flops_per_image: float | None = None
  params: Callable[[Any], Any] = lambda state: state.params
  context: Any = None  # what the recipe's hooks share with its step (the probe's frozen encoder)


class Recipe:
  """A training recipe: what `train` needs from it. Everything else (mesh, keys, restore-or-init, the loop,
  checkpoints with the signature in their meta, preemption, the non-finite skip, metrics, `best/`, "nothing to
  do", evaluation of a finished run) is the core's.

  name: recorded in config.json; the program is `simmim-<name>` (underscores as dashes).
  best_metric: a hook scalar (higher is better) whose best parameters are kept in `<workdir>/best/`; or None.
  """
  name: str = ""
  best_metric: str | None = None

  @property
  def program(self) -> str:
    return "simmim-" + self.name.replace("_", "-")

  def resolve(self, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Every check of the config, before anything is written (ConfigError naming the key, the value and the
    fix); returns the config as it will run. The workdir is checked after it, by `owned_workdir`."""
    validation.check_run(config)
    return config

  def signature(self, config: ml_collections.ConfigDict) -> dict:
    """What a checkpoint must agree with to be resumed by `config` (saved in every checkpoint's meta)."""
    return workdir_lib.signature(config)

  def build(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Built:
    raise NotImplementedError

  def batches(self, config: ml_collections.ConfigDict, start_step: int, images_per_step: int) -> Iterator[dict]:
    """Host batches from the one of step `start_step + 1` on (an exact resume)."""
    raise NotImplementedError

  def hooks(self, config: ml_collections.ConfigDict, built: Built, key: jax.Array) -> "Sequence[Hook]":
    return ()

  def banner(self, config: ml_collections.ConfigDict) -> str:
    """What runs, for the start line."""
    return f"{self.program} {config.model.name}"

  def describe(self, config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, dict]:
    """(the config as it will run, facts for `describe`) for `--print_config`: shapes only, nothing written."""
    config = self.resolve(config)
    built = self.build(config, sharding.create_mesh(config.mesh))
    return config, {"parameters": count_parameters(built.params(built.setup.abstract_state)),
                    "flops_per_image": built.flops_per_image}


def train(recipe: Recipe, config: ml_collections.ConfigDict, workdir: str) -> tuple[Any, dict]:
  """Runs `recipe` as `config` says in `workdir` (or resumes it); returns (the final state, the last scalars
  of its hooks). Every check runs before anything is written: a refused run leaves `workdir` as it was. With
  `config.eval_only` the workdir is only read: its latest checkpoint (or a fresh state) goes through the hooks
  once, printed, nothing written. A finished run (its checkpoint at the last step) does no step: its hooks run
  once on the final state and their outputs are written at that step."""
  config = recipe.resolve(config)
  signature = recipe.signature(config)
  if config.get("eval_only"):
    return _evaluate_only(recipe, config, workdir, signature)
  with owned_workdir(workdir, config, signature, recipe.program, recipe=recipe.name):
    return _train(recipe, config, workdir, signature)


def _start(recipe: Recipe, config: ml_collections.ConfigDict):
  built = recipe.build(config, sharding.create_mesh(config.mesh))
  init_key, step_key, hook_key = jax.random.split(jax.random.key(config.seed), 3)
  return built, init_key, step_key, recipe.hooks(config, built, hook_key)


def _train(recipe: Recipe, config: ml_collections.ConfigDict, workdir: str, signature: dict) -> tuple[Any, dict]:
  total_steps, _, _ = optim.steps_from_config(config)
  built, init_key, step_key, hooks = _start(recipe, config)
  checkpointer, start_step, state, meta = restore_or_init(workdir, config, signature, built.setup.abstract_state,
                                                          built.setup.state_shardings,
                                                          lambda: built.init(init_key, workdir))
  loop = Loop(config=config, workdir=workdir, checkpointer=checkpointer, start_step=start_step,
              total_steps=total_steps, advance=lambda state, batch: built.advance(state, batch, step_key),
              batches=iter(()), data_sharding=built.setup.data_sharding, images_per_step=built.images_per_step,
              flops_per_image=built.flops_per_image, meta=lambda step: {"signature": signature}, hooks=hooks,
              params=built.params, best=Best(recipe.best_metric, workdir, meta) if recipe.best_metric else None)
  if start_step >= total_steps:
    report(f"Nothing to do: the checkpoint in {workdir} is at step {start_step} >= total steps {total_steps}; "
           "evaluating it." if hooks else
           f"Nothing to do: the checkpoint in {workdir} is at step {start_step} >= total steps {total_steps}.")
    writer = metrics.MetricWriter(workdir, resume_step=start_step, enabled=jax.process_index() == 0, config=config)
    try:
      run_hooks(hooks, start_step, state, None, writer, dataclasses.replace(loop, best=None))
    finally:
      _close_all([("the checkpointer", checkpointer.close), ("the best/ checkpointer", loop.best.checkpointer.close)
                  if loop.best else ("", lambda: None), ("the metric writer", writer.close)], raise_first=True)
    return state, loop.outputs
  loop.batches = recipe.batches(config, start_step, built.images_per_step)
  report(f"{recipe.banner(config)}: {total_steps} steps of {built.images_per_step} images from step {start_step} on "
         f"{jax.device_count()} device(s), {jax.process_count()} process(es); workdir {workdir}")
  state = train_loop(loop, state)
  report(f"Done: {total_steps} steps; checkpoints in {checkpointer.directory}")
  return state, loop.outputs


def _evaluate_only(recipe: Recipe, config: ml_collections.ConfigDict, workdir: str,
                   signature: dict) -> tuple[Any, dict]:
  """`config.eval_only`: the hooks on the workdir's latest checkpoint (a fresh state when it has none); reads only."""
  built, init_key, _, hooks = _start(recipe, config)
  step, state, _ = workdir_lib.read_latest_state(workdir, signature, built.setup.abstract_state,
                                                 built.setup.state_shardings)
  state = built.init(init_key, workdir) if state is None else state
  outputs = {}
  for hook in hooks:
    produced = hook.fn(step, state, None)
    outputs.update(produced.scalars if produced else {})
  return state, outputs


# ----------------------------------------------------------------------------------------------------
# What every step shares


def accumulated_gradients(grad_fn: Callable, params: Any, arrays: tuple, key: jax.Array, accumulation: int):
  """(loss, grads) of `grad_fn(params, *arrays, key)` averaged over `accumulation` micro-batches.

  Micro-batch j takes rows j, j + k, j + 2k, ... (k = accumulation) of every array, so every device's
  contiguous shard of the batch contributes to every micro-batch and no data moves between devices; each
  micro-batch gets its own key (`split(key, k)`). With k = 1 it is `grad_fn(params, *arrays, key)`.
  """
  if accumulation == 1:
    return grad_fn(params, *arrays, key)
  num_rows = arrays[0].shape[0]

  def split_micro(x):
    x = x.reshape((num_rows // accumulation, accumulation) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)

  def accumulate(carry, micro):
    loss_sum, grad_sum = carry
    loss, grads = grad_fn(params, *micro)
    return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  micro_batches = (*(split_micro(x) for x in arrays), jax.random.split(key, accumulation))
  (loss, grads), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros), micro_batches)
  return loss / accumulation, jax.tree.map(lambda g: g / accumulation, grads)


def keep_if(finite: jax.Array, new: Any, old: Any) -> Any:
  """`new` where `finite`, else `old` (leaf by leaf)."""
  return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def guarded_update(tx: optax.GradientTransformation, params: Any, opt_state: Any, grads: Any, loss: jax.Array,
                   nonfinite_streak: jax.Array):
  """One optimizer update that no NaN ever reaches: (params, opt_state, nonfinite_streak, grad_norm, finite).

  When the loss or the gradient norm (before clipping, as the official log) is not finite, params and
  optimizer state come back untouched and the streak grows by one; otherwise the streak is 0."""
  grad_norm = optax.tree.norm(grads)
  updates, new_opt_state = tx.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  streak = jnp.where(finite, 0, nonfinite_streak + 1).astype(jnp.int32)
  return keep_if(finite, new_params, params), keep_if(finite, new_opt_state, opt_state), streak, grad_norm, finite


# ----------------------------------------------------------------------------------------------------
# The loop


class StopRequest:
  """SIGTERM (a preemption or maintenance notice) and SIGINT (Ctrl-C) -> stop at the next step boundary, after
  saving that step; one mechanism for both. A second Ctrl-C stops at once (exit 130, nothing more saved).

  `owned_workdir` installs one for the whole run (so a signal during the restore or the compilation is not
  lost) and `train_loop` uses it (`StopRequest.current()`). The handlers are installed whatever SIGINT's
  disposition was (default, or ignored by a shell for a background job and reset); the previous ones come
  back on `close()`. On one process the handlers set a flag. On several, jax.distributed's preemption service
  catches SIGTERM and `reached_preemption_sync_point(step)` is true at the same step on every process, so
  all of them save the same step; SIGINT reaches only the processes it is sent to and cannot be agreed on
  without a collective per step, so there Ctrl-C stops that process at once (exit 130): stop a multi-process
  run with SIGTERM to save.
  """

  def __init__(self):
    self.signum = None  # the first stop signal received
    self._multi_process = jax.process_count() > 1
    self._previous = {}
    if threading.current_thread() is not threading.main_thread():
      return  # only the main thread may install handlers: stop signals keep their effect
    for signum in (signal.SIGINT,) if self._multi_process else (signal.SIGINT, signal.SIGTERM):
      self._previous[signum] = signal.signal(signum, self._on_signal)

  @staticmethod
  def current() -> "StopRequest | None":
    """The StopRequest whose handlers are installed in this process, if any."""
    owner = getattr(signal.getsignal(signal.SIGINT), "__self__", None)
    return owner if isinstance(owner, StopRequest) else None

  def _on_signal(self, signum, frame):
    del frame
    if signum == signal.SIGINT and (self.signum is not None or self._multi_process):
      _exit_at_once("Stopped at once by Ctrl-C" + (" (a multi-process run saves on SIGTERM)" if self._multi_process
                                                   else " again") +
                    ": nothing more was saved; rerun the same command to resume from the last checkpoint.")
    if self.signum is None:
      self.signum = signum
      _write_stderr(f"{_signal_name(signum)}: stopping at the next step boundary, once that step is saved"
                    + (" (Ctrl-C again stops at once, without saving)" if signum == signal.SIGINT else ""))

  @property
  def signalled(self) -> bool:
    return self.signum is not None

  def should_stop(self, step: int) -> bool:
    if not self._multi_process:
      return self.signalled
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # the preemption service is not running
      return False

  def stopped(self, step: int | None, directory: str) -> Exception:
    """The exception that ends the run after `step` was saved (None: before the first step, nothing new to
    save): Preempted (SIGTERM, 143), Interrupted (Ctrl-C, 130), or StoppedBeforeStart (SIGTERM, exit 1)."""
    interrupted = self.signum == signal.SIGINT
    name = "Ctrl-C" if interrupted else "SIGTERM"
    if step is not None:
      message = (f"Stopped by {name} after step {step}: checkpoint saved in {directory}; rerun the same command "
                 "to resume.")
      return Interrupted(message) if interrupted else Preempted(message)
    message = (f"Stopped by {name} before the first step: no step ran, so nothing was saved (the checkpoints "
               f"in {directory} are as they were); rerun the same command to continue.")
    return Interrupted(message) if interrupted else StoppedBeforeStart(message)

  def close(self) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
    self._previous = {}


def _signal_name(signum: int) -> str:
  return "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"


def _write_stderr(line: str) -> None:
  """One line to stderr, safe inside a signal handler (no buffered stream that the interrupted code may hold)."""
  try:
    os.write(2, (line + "\n").encode())
  except OSError:
    pass


def _exit_at_once(line: str) -> None:
  """Flushes what is buffered, prints `line`, and ends the process now with 130: threads that are not daemons
  (the input pipeline's, a writer's) cannot keep it alive."""
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except Exception:  # pylint: disable=broad-except  (a stream held by the interrupted code)
      pass
  _write_stderr(line)
  logging.flush()
  os._exit(INTERRUPTED_EXIT_CODE)  # pylint: disable=protected-access


@dataclasses.dataclass(frozen=True)
class HookOutput:
  """What a hook produces at a step: scalars (metrics.jsonl, TensorBoard, W&B) and images (uint8 [H, W, 3]
  arrays by name: `<workdir>/<name>/step_<step>.png`, TensorBoard and W&B). The metric writer writes both."""
  scalars: dict = dataclasses.field(default_factory=dict)
  images: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Hook:
  """`fn(step, state, batch) -> HookOutput | None` every `every_steps` steps (0: only at the end) and at the last
  step (`batch`: the step's global batch, None when the hook runs on a finished run)."""
  every_steps: int
  fn: Callable[[int, Any, dict | None], HookOutput | None]

  def due(self, step: int, total_steps: int) -> bool:
    return step == total_steps or bool(self.every_steps and step % self.every_steps == 0)


class Best:
  """The best value so far of a hook scalar (`Recipe.best_metric`, higher is better) and, in `<workdir>/best/`,
  the parameters that reached it. Its value and step travel in every checkpoint's meta, so a resumed run keeps
  them. A new best forces the step's checkpoint, and `best/` is written after it: `best/` never holds
  parameters that no checkpoint's meta accounts for."""

  def __init__(self, metric: str, workdir: str, meta: dict):
    self.metric, self.key = metric, f"best_{metric.removeprefix('eval_')}"
    self.value, self.step = meta.get(self.key, -math.inf), meta.get(f"{self.key}_step")
    self.checkpointer = checkpoint.Checkpointer(os.path.join(workdir, workdir_lib.BEST_DIRNAME), keep=1)

  def update(self, step: int, scalars: dict) -> bool:
    """Takes the step's hook scalars; True when they hold a new best (then `scalars` gains it too)."""
    improved = self.metric in scalars and scalars[self.metric] > self.value
    if improved:
      self.value, self.step = float(scalars[self.metric]), step
    if self.metric in scalars:
      scalars[self.key] = self.value
    return improved

  def meta(self) -> dict:
    return {self.key: self.value, f"{self.key}_step": self.step} if self.step is not None else {}

  def save(self, step: int, params: Any, scalars: dict) -> None:
    if step not in self.checkpointer.all_steps():  # a resumed run that redoes the step finds it written
      self.checkpointer.save(step, {"params": params}, {"step": step, **scalars})


@dataclasses.dataclass
class Loop:
  """What `train` hands to `train_loop`.

  `advance(state, batch) -> (state, metrics)` runs one update on a global batch (metrics: at least loss,
  grad_norm, lr and nonfinite_streak); `batches` yields host batches; `meta(step)` is saved with each
  checkpoint (it always gets "step"); `params(state)` is what must be finite before a save (and what `best`
  keeps).
  """
  config: ml_collections.ConfigDict
  workdir: str
  checkpointer: checkpoint.Checkpointer
  start_step: int
  total_steps: int
  advance: Callable[[Any, dict], tuple[Any, dict]]
  batches: Iterator[dict]
  data_sharding: Any
  images_per_step: int
  flops_per_image: float | None
  meta: Callable[[int], dict]
  hooks: Sequence[Hook] = ()
  params: Callable[[Any], Any] = lambda state: state.params
  best: Best | None = None
  outputs: dict = dataclasses.field(default_factory=dict)  # the last scalars of every hook, filled by the loop


def describe(config: ml_collections.ConfigDict, facts: dict) -> str:
  """What `--print_config` adds to the resolved config: the model (every encoder field as it will run, its
  parameters and FLOPs per training image, from a recipe's `describe`), the steps and epochs, the images per
  update, the batch per device and the mesh, and last whether the data is ready (facts["data_not_ready"]: how
  to prepare it, else None) and whether the run fits this machine's memory (facts["does_not_fit"]: what to
  change, else None). Computes shapes only: nothing is compiled or written."""
  total, warmup, per_epoch = optim.steps_from_config(config)
  accumulation = config.optimizer.get("accumulation_steps", 1)
  devices = jax.device_count()
  data, fsdp = sharding.mesh_shape(config.mesh, devices)
  fields = ", ".join(f"{k}={v}" for k, v in facts.get("encoder_fields", {}).items())
  steps = f"{total:,} updates ({total / per_epoch:.4g} epochs of {per_epoch:,} updates; {warmup:,} warmup)"
  if not config.get("num_train_images", 1) and not config.total_steps:  # the data sets it, and is not there
    steps = "set by the data's train images once it is ready (or by config.num_train_images / total_steps)"
  not_ready = facts.get("data_not_ready")
  return "\n".join([
      "---",
      f"model: {config.model.name} at {config.img_size} px: {facts['parameters']:,} parameters"
      f"{facts.get('parameters_note', '')}",
      *([f"encoder fields: {fields}"] if fields else []),
      *([f"model FLOPs per training image: {facts['flops_per_image'] / 1e9:.3g} GFLOPs"]
        if facts.get("flops_per_image") else []),
      f"steps: {steps}",
      f"images per update: {config.global_batch_size * accumulation:,} (global_batch_size "
      f"{config.global_batch_size} x accumulation_steps {accumulation})",
      f"batch per device: {config.global_batch_size // devices} images per micro-batch",
      f"mesh: data {data} x fsdp {fsdp} = {devices} {jax.devices()[0].platform} device(s) of this process "
      f"(jax.process_count() = {jax.process_count()}: a multi-host run splits the batch over every host's devices)",
      f"data: not ready, the run would be refused: {not_ready}" if not_ready else "data: ready",
      f"memory: does not fit this machine, the run would be refused: {facts['does_not_fit']}"
      if facts.get("does_not_fit") else "memory: fits this machine (by a lower-bound estimate)",
  ])


def count_parameters(tree: Any) -> int:
  """Elements of every array (or ShapeDtypeStruct) of `tree`."""
  return sum(int(math.prod(x.shape)) for x in jax.tree.leaves(tree))


def report(message: str) -> None:
  """Process 0 prints to stdout (and run.log); the others log at INFO."""
  if jax.process_index() == 0:
    logs.echo(message)
  else:
    logging.info(message)


def train_loop(loop: Loop, state: Any) -> Any:
  """Runs steps start_step + 1 .. total_steps of `loop` from `state`; returns the final state.

  However it ends, the checkpointer is closed first (waiting for the save in flight), then the metric writer;
  a failure in one close never skips the other. A stop signal (see `StopRequest`) saves the step that ends
  and raises Preempted (SIGTERM) or Interrupted (Ctrl-C); before the first step there is nothing to save.
  A failed checkpoint write stops the run at the first step boundary after it (CheckpointWriteError naming
  its step); running out of device memory is an OutOfMemoryError naming the step and the ways out."""
  from simmim_jax import data  # pylint: disable=g-import-not-at-top  (TF-free; TF loads in create_pretrain_iterator)

  config = loop.config
  stop_request = StopRequest.current()
  own_stop_request = stop_request is None  # called outside `owned_workdir` (a test, a notebook)
  if own_stop_request:
    stop_request = StopRequest()
  writer = None
  exit_code = 1  # how the loop ended, for the metric writer (W&B records it)
  step = loop.start_step
  try:
    if stop_request.signalled:  # during the restore or before: nothing new to save
      raise stop_request.stopped(None, loop.checkpointer.directory)
    writer = metrics.MetricWriter(loop.workdir, resume_step=loop.start_step, enabled=jax.process_index() == 0,
                                  config=config)  # config.wandb: the optional Weights & Biases run
    step_logger = _StepLogger(config, writer, loop)
    for step in range(loop.start_step + 1, loop.total_steps + 1):
      batch = data.make_global_batch(next(loop.batches), loop.data_sharding)
      state, step_metrics = loop.advance(state, batch)
      step_logger.push(step, step_metrics)
      loop.checkpointer.poll()  # a save that failed since the last step stops the run now, naming its step
      stopping = stop_request.should_stop(step)
      due = [hook for hook in loop.hooks if hook.due(step, loop.total_steps)] if not stopping else []
      if due:
        step_logger.flush()  # the step's own row first
      new_best = run_hooks(due, step, state, batch, writer, loop)
      if step % config.checkpoint_every_steps == 0 or step == loop.total_steps or stopping or new_best:
        step_logger.flush()
        _check_finite(loop.params(state), step)
        loop.checkpointer.save(step, state, {**loop.meta(step), **(loop.best.meta() if loop.best else {}),
                                             "step": step})
        if new_best:
          loop.best.save(step, loop.params(state), loop.outputs)
      if stopping:
        loop.checkpointer.wait()
        raise stop_request.stopped(step, loop.checkpointer.directory)
    step_logger.flush()
    loop.checkpointer.wait()
    exit_code = 0
  except BaseException as e:
    exit_code = getattr(e, "exit_code", 1)
    if _out_of_memory(e):
      raise OutOfMemoryError(
          f"out of accelerator memory at step {step} ({_first_line(e)}): lower config.global_batch_size "
          "(config.optimizer.accumulation_steps keeps the images per update), set config.model.remat=True, or "
          "shard the parameters with config.mesh.fsdp") from None
    raise
  finally:
    closers = [("the checkpointer", loop.checkpointer.close)]  # first: the save in flight must end written
    if loop.best is not None:
      closers.append(("the best/ checkpointer", loop.best.checkpointer.close))
    if writer is not None:
      closers.append(("the metric writer",
                      lambda: writer.close(exit_code, preempted=exit_code == PREEMPTED_EXIT_CODE)))
    if own_stop_request:
      closers.append(("the signal handlers", stop_request.close))
    _close_all(closers, raise_first=exit_code == 0)
  return state


def run_hooks(hooks: Sequence[Hook], step: int, state: Any, batch: dict | None, writer: metrics.MetricWriter,
              loop: Loop) -> bool:
  """Runs `hooks` at `step` and writes what they produce (scalars and images) through `writer`; their scalars
  also go to `loop.outputs`. True when they hold a new best of `loop.best`."""
  new_best = False
  for hook in hooks:
    produced = hook.fn(step, state, batch)
    if produced is None:
      continue
    scalars = dict(produced.scalars)
    if loop.best is not None:
      new_best = loop.best.update(step, scalars) or new_best
    loop.outputs.update(scalars)
    if scalars:
      writer.write(step, scalars)
    for name, image in produced.images.items():
      writer.write_image(step, name, image)
  return new_best


def _close_all(closers: Sequence[tuple[str, Callable[[], None]]], *, raise_first: bool) -> None:
  """Calls every closer in order, whatever the others raise. The first failure is raised when `raise_first`
  (the run had succeeded); otherwise the run's own error is the one reported and these are logged."""
  first = None
  for name, close in closers:
    try:
      close()
    except Exception as e:  # pylint: disable=broad-except
      if first is None and raise_first:
        first = e
      else:
        logging.warning("While stopping, closing %s failed: %s: %s", name, type(e).__name__, _first_line(e))
  if first is not None:
    raise first


def _out_of_memory(error: BaseException) -> bool:
  return isinstance(error, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(error)


def _first_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return " ".join(lines[0].split())[:300] if lines else type(error).__name__


class _StepLogger:
  """Fetches each step's metrics one step after dispatch, stops on repeated non-finite steps, and logs on
  log steps, the first step of a run and the last (progress line on process 0, metrics.jsonl + TensorBoard)."""

  def __init__(self, config: ml_collections.ConfigDict, writer: metrics.MetricWriter, loop: Loop):
    self.writer, self.total_steps, self.start_step = writer, loop.total_steps, loop.start_step
    self.log_every = config.log_every_steps
    self.max_nonfinite_steps = config.max_nonfinite_steps
    self.images_per_step = loop.images_per_step
    self.batches = loop.batches  # the run's own input iterator: its skipped-image count
    self.flops_per_image = loop.flops_per_image  # model FLOPs per image: tflops_per_device and mfu per log
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

    scalars = {k: float(v) for k, v in step_metrics.items()}
    steps_per_sec, _ = self.clock.rate(step)
    scalars.update(flops.throughput_metrics(steps_per_sec * self.images_per_step, jax.device_count(),
                                            self.flops_per_image, self.peak_flops))
    scalars["skipped_steps"] = self.skipped_steps  # non-finite updates skipped in this run
    scalars["skipped_images"] = getattr(self.batches, "skipped_images", 0)  # undecodable images this run skipped
    eta = (self.total_steps - step) / steps_per_sec if steps_per_sec else None
    self.writer.write(step, scalars)
    if jax.process_index() == 0:
      logs.echo(metrics.progress_line(step, self.total_steps, scalars, eta))


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def _check_finite(params: Any, step: int) -> None:
  """Never write a checkpoint with non-finite parameters."""
  if not bool(_all_finite(params)):
    raise FloatingPointError(f"non-finite parameters at step {step}: not writing a checkpoint")
