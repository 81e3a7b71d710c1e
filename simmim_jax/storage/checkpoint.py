"""Checkpoints: Orbax only. Writers save through `Checkpointer` (Orbax's `CheckpointManager`, V0 API, so a
later move to the V1 API touches this file only); readers use the module functions, which never write.

A checkpoint step directory holds two items: "state" (the train state: step, params, optimizer state)
and "meta" (JSON: step and the model settings the state belongs to). Saves are asynchronous; Orbax writes
into a temporary directory and renames it on success, then marks it with `commit_success.txt`.

Readers (`complete_steps`, `read_meta`, `read_state`) only list and open files: a workdir that another
process is training in is never changed by reading it, and only complete step directories (both markers
present) are ever read.

The writer that owns a run (it holds the workdir's lock, see `workdir.py`) sets aside what cannot be resumed
from: it moves it into the sibling folder `<directory>_set_aside/` (`checkpoints_set_aside/` in a workdir),
under a free name. Nothing set aside is deleted, and the step can be written again. The folder lies outside
the one Orbax manages because Orbax counts any name holding `.orbax-checkpoint-tmp` as an uncommitted save of
its step: a set-aside `<N>.orbax-checkpoint-tmp...` beside the steps was deleted in place of step N.
  * step directories without their markers (a copy cut short, a non-atomic file system) and Orbax's
    temporary directories, as `<name>.incomplete`, when the `Checkpointer` opens;
  * a complete step whose files cannot be read (a truncated data file), as `<step>.damaged`, when
    `restore_latest` falls back to the previous complete step.
Only complete steps count for `keep`: after each save is verified complete, exactly the newest `keep` complete
steps remain (the `Checkpointer` deletes older ones itself; Orbax's own `max_to_keep` is off, as it deleted
old steps even after a failed save). A save that fails (a full disk) is reported naming its step as soon as
the asynchronous write ends, with one line instead of the storage library's tracebacks.
Restores go onto an abstract target (`jax.ShapeDtypeStruct`s with shardings), which works across device
counts, process counts and mesh shapes. `restore_latest` is how a run resumes: it reads the latest meta first
and restores the state only if the meta's "signature" is the one of the config asking.
"""

import logging as logging_std
import os
import sys
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

COMPLETE_MARKERS = ("_CHECKPOINT_METADATA", "commit_success.txt")  # written when Orbax finalizes a step
TMP_MARKER = ".orbax-checkpoint-tmp"


class CheckpointWriteError(RuntimeError):
  """A checkpoint could not be written."""


class SignatureMismatchError(ValueError):
  """The latest checkpoint belongs to another model (its saved signature is not the expected one)."""


class DamagedCheckpointError(ValueError):
  """No complete checkpoint can be read (every complete step is damaged)."""


# ----------------------------------------------------------------------------------------------------
# Reading (never writes)


def _is_complete(path: epath.Path) -> bool:
  return path.is_dir() and all((path / m).exists() for m in COMPLETE_MARKERS)


def complete_steps(directory: str) -> list[int]:
  """The steps under `directory` whose directories Orbax finalized, ascending; [] if there is none."""
  root = epath.Path(directory)
  if not root.is_dir():
    return []
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and _is_complete(p))


def _read(directory: str, step: int, items: dict) -> Any:
  directory = directory if "://" in directory else os.path.abspath(directory)  # Orbax wants absolute paths
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(
      epath.Path(directory) / str(step), args=ocp.args.Composite(**items))


def read_meta(directory: str, step: int) -> dict:
  """The JSON metadata saved with `step` (cheap: the train state is not read)."""
  return _read(directory, step, {"meta": ocp.args.JsonRestore()}).meta


def read_state(directory: str, step: int, abstract_state: Any, *, partial: bool = False) -> tuple[Any, dict]:
  """(state, meta) of `step`, placed as the shardings of the ShapeDtypeStructs in `abstract_state` say.

  `partial=True` reads only the subtree `abstract_state` names (e.g. {"params": ...} of a train state).
  """
  restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
  restored = _read(directory, step, {
      "state": ocp.args.PyTreeRestore(abstract_state, restore_args=restore_args, partial_restore=partial)
      if partial else ocp.args.StandardRestore(abstract_state),
      "meta": ocp.args.JsonRestore()})
  return restored.state, restored.meta


# ----------------------------------------------------------------------------------------------------
# Writing (the process that owns the run)

SET_ASIDE_SUFFIX = "_set_aside"  # <directory>_set_aside/: what cannot be resumed from, out of Orbax's sight
_LEGACY_SET_ASIDE = (".incomplete", ".damaged")  # set aside beside the steps by earlier versions


def set_aside_dir(directory: str) -> str:
  """Where the writer of `directory` moves what cannot be resumed from (`checkpoints` -> `checkpoints_set_aside`)."""
  return str(directory).rstrip("/") + SET_ASIDE_SUFFIX


def set_aside_incomplete(directory: str) -> list[str]:
  """Moves incomplete step directories and Orbax's temporary directories into `set_aside_dir(directory)` as
  `<name>.incomplete` (`<name>.incomplete.1`, ... when an earlier interruption left one of that name); returns
  their original paths. Folders that earlier versions set aside beside the steps move there too, under their
  own names. Only the run's owner calls it."""
  root = epath.Path(directory)
  if not root.exists():
    return []
  moved = []
  for path in sorted(root.iterdir()):
    name = path.name
    if any(suffix in name for suffix in _LEGACY_SET_ASIDE):
      _move_aside(path, name, "Moving a checkpoint set aside earlier")
      continue
    is_tmp = TMP_MARKER in name
    is_step = name.isdigit() and path.is_dir()
    if is_tmp or (is_step and not _is_complete(path)):
      moved.append(str(_move_aside(path, f"{name}.incomplete", "Ignoring the incomplete checkpoint")))
  return moved


def _move_aside(path: epath.Path, name: str, why: str) -> epath.Path:
  """Moves `path` to a free `name` in the set-aside folder of its parent; returns `path`."""
  folder = epath.Path(set_aside_dir(str(path.parent)))
  folder.mkdir(parents=True, exist_ok=True)
  target = _free_name(folder, name)
  logging.warning("%s %s (moved to %s)", why, path, target)
  path.rename(target)
  return path


def _free_name(root: epath.Path, name: str) -> epath.Path:
  """`root / name`, or `root / f"{name}.{k}"` with the smallest k >= 1 that does not exist yet."""
  candidate, k = root / name, 0
  while candidate.exists():
    k += 1
    candidate = root / f"{name}.{k}"
  return candidate


class _SaveErrors(logging_std.Filter):
  """While a save is in flight: the storage library's error records (Orbax's tracebacks, one per failed
  write) go to run.log at INFO instead of the console, and the first error is kept for the one-line report.
  asyncio's "<Future class> exception was never retrieved" (about a thousand after one failed write) drops to
  DEBUG."""

  def __init__(self):
    super().__init__()
    self.active = False
    self.first_error = None

  def filter(self, record: logging_std.LogRecord) -> bool:
    if _demote_unretrieved(record):
      pass
    elif self.active and record.levelno >= logging_std.ERROR and "orbax" in record.pathname:
      if self.first_error is None:
        error = record.exc_info[1] if record.exc_info else None
        self.first_error = f"{type(error).__name__}: {error}" if error else record.getMessage()
      record.levelno, record.levelname = logging_std.INFO, "INFO"
    return True


_LOGGERS = ("absl", "asyncio")  # Orbax logs through absl


def _demote_unretrieved(record: logging_std.LogRecord) -> bool:
  """asyncio's "<class> exception was never retrieved" ("Future", "_GatheringFuture", "Task"), about a thousand
  after one failed write, also when the failed writes' tasks are collected after the run closed its
  checkpointer: to DEBUG (run.log at --verbosity=2). True when it was one."""
  if record.name == "asyncio" and "exception was never retrieved" in str(record.msg):
    record.levelno, record.levelname = logging_std.DEBUG, "DEBUG"
    return True
  return False


def _quiet_closed_loop_callbacks() -> None:
  """After one failed write, the storage library's remaining write callbacks reach an asyncio loop Orbax has
  closed, and Python prints each "RuntimeError: Event loop is closed" as an unraisable exception: those go to
  DEBUG, and so do asyncio's unretrieved-exception records (`_demote_unretrieved`); every other unraisable
  exception is printed as before. Installed once per process."""
  previous = sys.unraisablehook
  if getattr(previous, "quiets_closed_loops", False):
    return
  # For the life of the process, as the hook; every record passes (a filter returning False would drop it).
  logging_std.getLogger("asyncio").addFilter(lambda record: _demote_unretrieved(record) or True)

  def hook(unraisable):
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
      logging.debug("a write callback reached a closed event loop (after a failed checkpoint write)")
      return
    previous(unraisable)

  hook.quiets_closed_loops = True
  sys.unraisablehook = hook


class Checkpointer:
  """Saves and restores train states under `<workdir>/checkpoints`, keeping the newest `keep` complete steps.

  Only the process that owns the run (it holds the workdir's lock) opens one: opening sets incomplete
  step directories aside. Readers use `complete_steps` / `read_meta` / `read_state` instead.
  """

  def __init__(self, directory: str, keep: int = 3):
    if keep < 1:
      raise ValueError(f"keep={keep}: at least the latest checkpoint must be kept")
    self.directory = os.path.abspath(directory) if "://" not in directory else directory
    if jax.process_index() == 0:
      set_aside_incomplete(self.directory)
    _sync("simmim_jax checkpoint directory checked")
    self._keep = keep
    self._pending = None  # the step whose asynchronous save is in flight
    self._errors = _SaveErrors()
    for name in _LOGGERS:
      logging_std.getLogger(name).addFilter(self._errors)
    _quiet_closed_loop_callbacks()
    self._manager = self._open_manager()

  def _open_manager(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=None,  # `_remove_old_steps` keeps `keep`, counting verified complete steps only
            create=True, enable_async_checkpointing=True,
            # Directories are created in save() itself, so a failure (lost mount, permissions, full disk)
            # is raised there; created asynchronously, it left background threads waiting minutes at exit.
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False)),
        item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict, *, force: bool = True) -> bool:
    """Starts an asynchronous save of `state` at `step`; returns whether a save was started.

    Waits for the previous save first (Orbax would too). Raises CheckpointWriteError naming the step whose
    save failed (a full disk, a lost permission): training must not go on silently without checkpoints.
    """
    self._finish_pending()
    self._pending, self._errors.active, self._errors.first_error = step, True, None
    try:
      started = self._manager.save(
          step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
          force=force)
    except Exception as e:  # pylint: disable=broad-except  (Orbax and the file system raise many kinds)
      self._pending, self._errors.active = None, False
      raise self._write_error(step, e) from e
    if not started:
      self._pending, self._errors.active = None, False
    return started

  def poll(self) -> None:
    """Between steps: when the save in flight has ended, checks it (CheckpointWriteError naming its step) and
    deletes the steps beyond `keep`. Costs nothing while it runs. On several processes the check waits for
    the next save or `wait()`, where every process reaches it at the same point."""
    if self._pending is not None and jax.process_count() == 1 and not self._manager.is_saving_in_progress():
      self._finish_pending()

  def _finish_pending(self) -> None:
    step = self._pending
    if step is None:
      return
    try:
      self._manager.wait_until_finished()
      self._manager.check_for_errors()
      error = None
    except Exception as e:  # pylint: disable=broad-except
      error = e
    self._pending, self._errors.active = None, False
    complete = _all_processes_ok(error is None and _is_complete(epath.Path(self.directory) / str(step)))
    if not complete:
      raise self._write_error(step, error)
    self._remove_old_steps()

  def _write_error(self, step: int, error: BaseException | None) -> CheckpointWriteError:
    reason = self._errors.first_error or (f"{type(error).__name__}: {error}" if error else
                                          "Orbax did not finalize it (see run.log)")
    self._errors.first_error = None
    return CheckpointWriteError(f"could not write the checkpoint of step {step} to {self.directory}: "
                                f"{' '.join(str(reason).split())[:500]} (free space or fix the folder, then rerun "
                                "the same command: it resumes from the last complete checkpoint)")

  def _remove_old_steps(self) -> None:
    """Exactly the newest `keep` complete steps remain."""
    steps = sorted(self._manager.all_steps())
    for step in steps[:-self._keep]:
      self._manager.delete(step)

  def read_meta(self, step: int) -> dict:
    """The JSON metadata saved with `step` (cheap: the train state is not read)."""
    return read_meta(self.directory, step)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores (state, meta) at `step` onto the shardings carried by `abstract_state`."""
    return read_state(self.directory, step, abstract_state)

  def set_aside_damaged(self, step: int, reason: str) -> None:
    """Moves the unreadable step `step` to `<step>.damaged` in the set-aside folder (process 0) and forgets it."""
    if jax.process_index() == 0:
      _move_aside(epath.Path(self.directory) / str(step), f"{step}.damaged",
                  f"The checkpoint of step {step} cannot be read ({reason}); ignoring")
    _sync(f"simmim_jax damaged checkpoint {step} set aside")
    self._manager.close()
    self._manager = self._open_manager()

  def wait(self) -> None:
    """Blocks until pending saves are written; raises CheckpointWriteError naming the step if one failed."""
    if self._pending is not None:
      self._finish_pending()
      return
    try:
      self._manager.wait_until_finished()
      self._manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointWriteError(f"could not write a checkpoint to {self.directory}: "
                                 f"{type(e).__name__}: {e}") from e

  def close(self) -> None:
    """Waits for the save in flight (CheckpointWriteError if it failed), then closes, however the wait ends."""
    try:
      self.wait()
    finally:
      self._manager.close()
      for name in _LOGGERS:
        logging_std.getLogger(name).removeFilter(self._errors)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _all_processes_ok(ok: bool) -> bool:
  """Whether `ok` holds on every process (a damaged file may be read by one process only)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def abstract_with_shardings(abstract_tree: Any, shardings: Any) -> Any:
  """Attach shardings to a tree of ShapeDtypeStructs (the restore target)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_tree, shardings)


def _equal(saved: Any, expected: Any) -> bool:
  return saved == expected


def restore_latest(checkpointer: Checkpointer, signature: dict, abstract_state: Any, shardings: Any, *,
                   same_model: Callable[[Any, dict], bool] = _equal) -> tuple[int, Any | None, dict]:
  """Restores the latest readable checkpoint onto `shardings` if its meta["signature"] belongs to `signature`'s
  model: `same_model(saved, signature)` says so (the caller's check; default: equal as JSON reads them back).

  Returns (step, state, meta), or (0, None, {}) when there is nothing to resume: no checkpoint, or only one of
  step 0 (a simmim-convert workdir's weights: the recipe's `init` reads them, with a fresh optimizer state).
  The meta is read first: on a mismatch no state is read, `checkpointer` is closed and SignatureMismatchError
  names the directory and both signatures. A step that cannot be read is
  set aside with a warning and the previous complete step is tried; when every step was damaged,
  DamagedCheckpointError names them (`checkpointer` closed).
  """
  damaged = []
  while True:
    step = checkpointer.latest_step()
    if step is None or step == 0:
      break
    try:
      saved_signature = checkpointer.read_meta(step).get("signature")
    except Exception as e:  # pylint: disable=broad-except  (a damaged meta file)
      saved_signature, error = signature, e
    else:
      error = None
    if error is None and not same_model(saved_signature, signature):
      checkpointer.close()
      raise SignatureMismatchError(f"{checkpointer.directory} holds checkpoints of another model "
                                   f"({saved_signature}), not of this config's {signature}")
    state = meta = None
    if error is None:
      try:
        state, meta = checkpointer.restore(step, abstract_with_shardings(abstract_state, shardings))
      except Exception as e:  # pylint: disable=broad-except  (tensorstore / Orbax raise many kinds)
        error = e
    if _all_processes_ok(error is None):
      logging.info("Resumed from step %d of %s", step, checkpointer.directory)
      return step, state, meta
    reason = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}" if error else "unreadable elsewhere"
    checkpointer.set_aside_damaged(step, reason)
    damaged.append(step)
  if damaged:
    checkpointer.close()
    raise DamagedCheckpointError(
        f"the checkpoint(s) of step {', '.join(map(str, damaged))} in {checkpointer.directory} cannot be read "
        "(set aside as <step>.damaged) and no older complete checkpoint is left: start over with another "
        "--workdir, or restore the files")
  return 0, None, {}
