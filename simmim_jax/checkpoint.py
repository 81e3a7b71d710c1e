"""Checkpoints: Orbax only. Writers save through `Checkpointer` (Orbax's `CheckpointManager`, V0 API, so a
later move to the V1 API touches this file only); readers use the module functions, which never write.

A checkpoint step directory holds two items: "state" (the train state: step, params, optimizer state)
and "meta" (JSON: step and the model settings the state belongs to). Saves are asynchronous; Orbax writes
into a temporary directory and renames it on success, then marks it with `commit_success.txt`.

Readers (`complete_steps`, `read_meta`, `read_state`) only list and open files: a workdir that another
process is training in is never changed by reading it, and only complete step directories (both markers
present) are ever read.

The writer that owns a run (it holds the workdir's lock, see `workdir.py`) sets aside what cannot be resumed
from, renaming it under a free name (nothing is deleted, and the step can be written again):
  * step directories without their markers (a copy cut short, a non-atomic file system) and Orbax's
    temporary directories, as `<name>.incomplete`, when the `Checkpointer` opens;
  * a complete step whose files cannot be read (a truncated data file), as `<name>.damaged`, when
    `restore_latest` falls back to the previous complete step.
Restores go onto an abstract target (`jax.ShapeDtypeStruct`s with shardings), which works across device
counts, process counts and mesh shapes. `restore_latest` is how a run resumes: it reads the latest meta first
and restores the state only if the meta's "signature" is the one of the config asking.
"""

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from simmim_jax import models

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


def set_aside_incomplete(directory: str) -> list[str]:
  """Renames incomplete step directories to `<name>.incomplete` (`<name>.incomplete.1`, ... when an earlier
  interruption left one of that name already); returns their original paths. Only the run's owner calls it."""
  root = epath.Path(directory)
  if not root.exists():
    return []
  moved = []
  for path in sorted(root.iterdir()):
    name = path.name
    if ".incomplete" in name or ".damaged" in name:
      continue
    is_tmp = TMP_MARKER in name
    is_step = name.isdigit() and path.is_dir()
    if is_tmp or (is_step and not _is_complete(path)):
      moved.append(str(_set_aside(path, "incomplete", "Ignoring the incomplete checkpoint")))
  return moved


def _set_aside(path: epath.Path, suffix: str, why: str) -> epath.Path:
  target = _free_name(path.parent, f"{path.name}.{suffix}")
  logging.warning("%s %s (moved to %s)", why, path, target.name)
  path.rename(target)
  return path


def _free_name(root: epath.Path, name: str) -> epath.Path:
  """`root / name`, or `root / f"{name}.{k}"` with the smallest k >= 1 that does not exist yet."""
  candidate, k = root / name, 0
  while candidate.exists():
    k += 1
    candidate = root / f"{name}.{k}"
  return candidate


class Checkpointer:
  """Saves and restores train states under `<workdir>/checkpoints`, keeping the last `keep`.

  Only the process that owns the run (it holds the workdir's lock) opens one: opening sets incomplete
  step directories aside. Readers use `complete_steps` / `read_meta` / `read_state` instead.
  """

  def __init__(self, directory: str, keep: int = 3):
    if keep < 1:
      raise ValueError(f"keep={keep}: at least the latest checkpoint must be kept")
    self.directory = os.path.abspath(directory) if "://" not in directory else directory
    self.set_aside = set_aside_incomplete(self.directory) if jax.process_index() == 0 else []
    _sync("simmim_jax checkpoint directory checked")
    self._keep = keep
    self._manager = self._open_manager()

  def _open_manager(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=self._keep, create=True, enable_async_checkpointing=True,
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

    Raises CheckpointWriteError if this save, or the previous asynchronous one, failed (a full disk, a lost
    permission): training must not go on silently without checkpoints.
    """
    try:
      self._manager.check_for_errors()
      return self._manager.save(
          step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
          force=force)
    except Exception as e:  # pylint: disable=broad-except  (Orbax and the file system raise many kinds)
      raise CheckpointWriteError(f"could not write the checkpoint of step {step} to {self.directory}: "
                                 f"{type(e).__name__}: {e}") from e

  def read_meta(self, step: int) -> dict:
    """The JSON metadata saved with `step` (cheap: the train state is not read)."""
    return read_meta(self.directory, step)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores (state, meta) at `step` onto the shardings carried by `abstract_state`."""
    return read_state(self.directory, step, abstract_state)

  def set_aside_damaged(self, step: int, reason: str) -> None:
    """Moves the unreadable step `step` to `<step>.damaged` (process 0) and forgets it."""
    if jax.process_index() == 0:
      _set_aside(epath.Path(self.directory) / str(step), "damaged",
                 f"The checkpoint of step {step} cannot be read ({reason}); ignoring")
    _sync(f"simmim_jax damaged checkpoint {step} set aside")
    self._manager.close()
    self._manager = self._open_manager()

  def wait(self) -> None:
    """Blocks until pending saves are written; raises CheckpointWriteError if one failed."""
    try:
      self._manager.wait_until_finished()
      self._manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointWriteError(f"could not write a checkpoint to {self.directory}: "
                                 f"{type(e).__name__}: {e}") from e

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._manager.close()


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


def restore_latest(checkpointer: Checkpointer, signature: dict, abstract_state: Any, shardings: Any, *,
                   include_step_zero: bool = False) -> tuple[int, Any | None, dict]:
  """Restores the latest readable checkpoint onto `shardings` if it was saved with meta["signature"] ==
  `signature`.

  Returns (step, state, meta), or (0, None, {}) when there is nothing to resume: no checkpoint, or only one of
  step 0 and not `include_step_zero`. The meta is read first: on a mismatch no state is read, `checkpointer`
  is closed and SignatureMismatchError names the directory and both signatures. A step that cannot be read is
  set aside with a warning and the previous complete step is tried; when every step was damaged,
  DamagedCheckpointError names them (`checkpointer` closed).
  """
  damaged = []
  while True:
    step = checkpointer.latest_step()
    if step is None or (step == 0 and not include_step_zero):
      break
    try:
      saved_signature = checkpointer.read_meta(step).get("signature")
    except Exception as e:  # pylint: disable=broad-except  (a damaged meta file)
      saved_signature, error = signature, e
    else:
      error = None
    if models.canonical_signature(saved_signature) != models.canonical_signature(signature):
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
