"""The run core: what pretraining, fine-tuning and linear probing share, written once.

A recipe (`pretrain.py`, `finetune.py`, `linear_probe.py`) defines its state, its step and its evaluation;
this module does the rest, so a guarantee proven for one recipe holds for all three:
  * `owned_workdir`: every config check has passed; the workdir is checked, locked and `config.json` written;
  * `restore_or_init`: the latest readable checkpoint of the same model, or a fresh state (`workdir.resume`);
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
    reconstruction images) at their cadence and at the end; running out of device memory is one line naming
    the step and the ways out.
"""

import contextlib
import dataclasses
import math
import os
import signal
import sys
import threading
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from jax.experimental import multihost_utils

from simmim_jax.storage import checkpoint, logs, metrics
from simmim_jax.models import flops
from simmim_jax.train import optim, sharding
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
def owned_workdir(workdir: str, config: ml_collections.ConfigDict, signature: dict, program: str):
  """Takes `workdir` for this run (checks, lock, config.json; see `workdir.open_for_writing`) and releases
  the lock when the block ends, however it ends. Call it after every config check has passed. SIGTERM and
  SIGINT are caught from here on (`StopRequest`): the run stops at a step boundary, saving that step."""
  stop_request = StopRequest()
  try:
    lock = workdir_lib.open_for_writing(workdir, config, signature, program)
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
                    state_shardings: Any, init: Callable[[], Any], *, include_step_zero: bool = False):
  """(checkpointer, start_step, state, meta): the latest readable checkpoint of `signature`'s model, or
  `init()` (a state placed on `state_shardings`) at step 0 when there is none."""
  checkpointer, step, state, meta = workdir_lib.resume(workdir, config.keep_checkpoints, signature,
                                                       abstract_state, state_shardings,
                                                       include_step_zero=include_step_zero)
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
class Hook:
  """`fn(step, state, batch)` every `every_steps` steps (0: only at the end) and at the last step; the scalars
  it returns (an evaluation) go to metrics.jsonl and TensorBoard at that step."""
  every_steps: int
  fn: Callable[[int, Any, dict], dict | None]

  def due(self, step: int, total_steps: int) -> bool:
    return step == total_steps or bool(self.every_steps and step % self.every_steps == 0)


@dataclasses.dataclass
class Loop:
  """What a recipe hands to `train_loop`.

  `advance(state, batch) -> (state, metrics)` runs one update on a global batch (metrics: at least loss,
  grad_norm, lr and nonfinite_streak); `batches` yields host batches; `meta(step)` is saved with each
  checkpoint (it always gets "step"); `params(state)` is what must be finite before a save.
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
  fields = ", ".join(f"{k}={v}" for k, v in facts["encoder_fields"].items())
  steps = f"{total:,} updates ({total / per_epoch:.4g} epochs of {per_epoch:,} updates; {warmup:,} warmup)"
  if not config.get("num_train_images", 1) and not config.total_steps:  # the data sets it, and is not there
    steps = "set by the data's train images once it is ready (or by config.num_train_images / total_steps)"
  not_ready = facts.get("data_not_ready")
  return "\n".join([
      "---",
      f"model: {config.model.name} at {config.img_size} px: {facts['parameters']:,} parameters"
      f"{facts.get('parameters_note', '')}",
      f"encoder fields: {fields}",
      f"model FLOPs per training image: {facts['flops_per_image'] / 1e9:.3g} GFLOPs",
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
      for hook in due:
        scalars = hook.fn(step, state, batch)
        if scalars:
          writer.write(step, scalars)
      if step % config.checkpoint_every_steps == 0 or step == loop.total_steps or stopping:
        step_logger.flush()
        _check_finite(loop.params(state), step)
        loop.checkpointer.save(step, state, {**loop.meta(step), "step": step})
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
    if writer is not None:
      closers.append(("the metric writer",
                      lambda: writer.close(exit_code, preempted=exit_code == PREEMPTED_EXIT_CODE)))
    if own_stop_request:
      closers.append(("the signal handlers", stop_request.close))
    _close_all(closers, raise_first=exit_code == 0)
  return state


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
      logs.echo(metrics.progress_line(step, self.total_steps, scalars, eta))


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def _check_finite(params: Any, step: int) -> None:
  """Never write a checkpoint with non-finite parameters."""
  if not bool(_all_finite(params)):
    raise FloatingPointError(f"non-finite parameters at step {step}: not writing a checkpoint")
