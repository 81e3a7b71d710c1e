"""Checkpoints: one small wrapper around Orbax's `CheckpointManager` (V0 API), so a later move to the V1
API touches this file only.

A checkpoint step directory holds two items: "state" (the train state: step, params, optimizer state)
and "meta" (JSON: step and the model settings the state belongs to). Saves are asynchronous; Orbax writes
into a temporary directory and renames it on success, then marks it with `commit_success.txt`. A step
directory without its markers (a copy cut short, a non-atomic file system) and Orbax's temporary
directories are never resumed from: they are moved aside to `<name>.incomplete` with a warning, so nothing
is deleted and the step can be written again.
Restores go onto an abstract target (`jax.ShapeDtypeStruct`s with shardings), which works across device
counts, process counts and mesh shapes. `restore_latest` is how a run resumes: it reads the latest meta first
and restores the state only if the meta's "signature" is the one of the config asking.
"""

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

CONFIG_FILENAME = "config.json"
CHECKPOINT_DIRNAME = "checkpoints"
COMPLETE_MARKERS = ("_CHECKPOINT_METADATA", "commit_success.txt")  # written when Orbax finalizes a step
TMP_MARKER = ".orbax-checkpoint-tmp"


class CheckpointWriteError(RuntimeError):
  """A checkpoint could not be written."""


class SignatureMismatchError(ValueError):
  """The latest checkpoint belongs to another model (its saved signature is not the expected one)."""


def set_aside_incomplete(directory: str) -> list[str]:
  """Renames incomplete step directories to `<name>.incomplete` (`<name>.incomplete.1`, ... when an earlier
  interruption left one of that name already); returns their original paths."""
  root = epath.Path(directory)
  if not root.exists():
    return []
  moved = []
  for path in sorted(root.iterdir()):
    name = path.name
    if ".incomplete" in name:
      continue
    is_tmp = TMP_MARKER in name
    is_step = name.isdigit() and path.is_dir()
    if is_tmp or (is_step and not all((path / m).exists() for m in COMPLETE_MARKERS)):
      target = _free_name(root, f"{name}.incomplete")
      logging.warning("Ignoring the incomplete checkpoint %s (moved to %s)", path, target.name)
      path.rename(target)
      moved.append(str(path))
  return moved


def _free_name(root: epath.Path, name: str) -> epath.Path:
  """`root / name`, or `root / f"{name}.{k}"` with the smallest k >= 1 that does not exist yet."""
  candidate, k = root / name, 0
  while candidate.exists():
    k += 1
    candidate = root / f"{name}.{k}"
  return candidate


class Checkpointer:
  """Saves and restores train states under `<workdir>/checkpoints`, keeping the last `keep`."""

  def __init__(self, directory: str, keep: int = 3):
    self.directory = os.path.abspath(directory) if "://" not in directory else directory
    self.set_aside = set_aside_incomplete(self.directory) if jax.process_index() == 0 else []
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("simmim_jax checkpoint directory checked")
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=True,
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
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores (state, meta) at `step` onto the shardings carried by `abstract_state`."""
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      meta=ocp.args.JsonRestore()))
    return restored.state, restored.meta

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


def abstract_with_shardings(abstract_tree: Any, shardings: Any) -> Any:
  """Attach shardings to a tree of ShapeDtypeStructs (the restore target)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_tree, shardings)


def restore_latest(checkpointer: Checkpointer, signature: dict, abstract_state: Any, shardings: Any, *,
                   include_step_zero: bool = False) -> tuple[int, Any | None, dict]:
  """Restores the latest checkpoint onto `shardings` if it was saved with meta["signature"] == `signature`.

  Returns (step, state, meta), or (0, None, {}) when there is nothing to resume: no checkpoint, or only one of
  step 0 and not `include_step_zero`. The meta is read first: on a mismatch no state is read, `checkpointer`
  is closed and SignatureMismatchError names the directory and both signatures.
  """
  step = checkpointer.latest_step()
  if step is None or (step == 0 and not include_step_zero):
    return 0, None, {}
  saved_signature = checkpointer.read_meta(step).get("signature")
  if saved_signature != signature:
    checkpointer.close()
    raise SignatureMismatchError(f"{checkpointer.directory} holds checkpoints of another model ({saved_signature}), "
                                 f"not of this config's {signature}")
  state, meta = checkpointer.restore(step, abstract_with_shardings(abstract_state, shardings))
  logging.info("Resumed from step %d of %s", step, checkpointer.directory)
  return step, state, meta


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes config.json atomically (a killed process never leaves a torn file)."""
  path = os.path.join(workdir, CONFIG_FILENAME)
  with open(path + ".tmp", "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  os.replace(path + ".tmp", path)


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILENAME)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: {workdir!r} is not a simmim-pretrain workdir")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_model(workdir: str, step: int | None = None):
  """The SimMIM model of a `simmim-pretrain` run with its trained variables and the run's config.

  Returns (model, variables, config): `model` is the `SimMIM` Linen module, `variables` = {"params": ...}
  from the latest (or the given) checkpoint, placed on the first local device.
  """
  from simmim_jax import pretrain  # pretrain imports this module

  config = read_config(workdir)
  checkpointer = Checkpointer(os.path.join(workdir, CHECKPOINT_DIRNAME), keep=config.get("keep_checkpoints", 3))
  try:
    step = checkpointer.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {checkpointer.directory}")
    model = pretrain.build_model(config)
    abstract_state = pretrain.abstract_train_state(config, model)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = abstract_with_shardings(abstract_state, jax.tree.map(lambda _: device, abstract_state))
    state, _ = checkpointer.restore(step, target)
  finally:
    checkpointer.close()
  return model, {"params": state.params}, config
