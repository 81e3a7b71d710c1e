"""The workdir as a record: `config.json`, `checkpoints/` (Orbax, `checkpoint.py`), the writer's lock, and
the read-only loading of a trained model.

Two roles, never mixed:
  * **Readers** (`read_config`, `load_model`, `check_resumable`; `simmim-reconstruct`, `simmim-convert
    --export`, `config.pretrained`, `config.eval_only`) open files and nothing else: no rename, move, delete
    or create inside the workdir, so reading a workdir that a run is writing cannot disturb it. They read
    only complete checkpoints.
  * **The writer** (the run that trains in the workdir) calls `open_for_writing` once every config check
    has passed: it checks that the workdir's latest checkpoint belongs to the same model, takes the workdir's
    lock, and only then creates the folder and writes `config.json`. A refused run leaves the workdir as it
    was, byte for byte.

The lock is `run.lock`, held with `fcntl.flock` by process 0 for the life of the run (the kernel releases it
when the process ends, however it ends). A second writer on a local workdir in use is refused with the
holder's pid, host and command. On object stores (`gs://...`) there is no lock: run one writer per workdir
(readers stay safe).

Writes never leave a local workdir: every file is written through `safe_files` (never through a symbolic
link), and a link at any name the writer writes refuses the run before anything is written (`refuse_links`,
exit 2 naming the link).
"""

import fcntl
import json
import os
import socket
import sys
import time
from typing import Any

import jax
import ml_collections
from absl import logging

from simmim_jax.storage import checkpoint, logs, metrics, safe_files, wandb_logging
from simmim_jax import models
from simmim_jax.configs import ConfigError

CONFIG_FILENAME = "config.json"
CHECKPOINT_DIRNAME = "checkpoints"
LOCK_FILENAME = "run.lock"
RECONSTRUCTIONS_DIRNAME = "reconstructions"  # pretrain.py's reconstruction grids
# Every name a run writes directly in its workdir (files, with their NAME.tmp, and folders): a symbolic link at
# any of them, or in reconstructions/, refuses the run before anything is written (safe_files: no write ever
# follows a link, so a link that appears later is refused at its write).
WRITTEN_FILES = (CONFIG_FILENAME, LOCK_FILENAME, logs.LOG_FILENAME, metrics.METRICS_FILENAME,
                 wandb_logging.RUN_ID_FILENAME)
BEST_DIRNAME = "best"  # the parameters of the best evaluation (run.Best)
_ORBAX_FOLDERS = (CHECKPOINT_DIRNAME, BEST_DIRNAME)
WRITTEN_FOLDERS = (*_ORBAX_FOLDERS, *(f"{name}_set_aside" for name in _ORBAX_FOLDERS),  # checkpoint.set_aside
                   RECONSTRUCTIONS_DIRNAME, metrics.TENSORBOARD_DIRNAME)


class WorkdirBusyError(RuntimeError):
  """Another live process writes to this workdir."""


# ----------------------------------------------------------------------------------------------------
# Reading


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILENAME)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: {workdir!r} is not a simmim_jax workdir")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, CHECKPOINT_DIRNAME)


def signature(config: ml_collections.ConfigDict, **extra) -> dict:
  """What a checkpoint must agree with to be resumed by `config`: the model's parameter fields (not remat /
  attention_impl) and the image size, plus a recipe's `extra` (e.g. num_classes)."""
  return {"model": models.parameter_fields(config.model.to_dict()), "img_size": int(config.img_size), **extra}


def read_converted_params(workdir: str, abstract_params: Any) -> Any | None:
  """The parameters of a `simmim-convert` workdir (its step-0 checkpoint, meta "converted_from") placed as
  `abstract_params` (ShapeDtypeStructs with shardings) says, or None when the workdir holds none. Reads only."""
  directory = checkpoint_dir(workdir)
  if 0 not in checkpoint.complete_steps(directory) or "converted_from" not in checkpoint.read_meta(directory, 0):
    return None
  state, _ = checkpoint.read_state(directory, 0, {"params": abstract_params}, partial=True)
  return state["params"]


def check_resumable(workdir: str, signature: dict) -> int | None:
  """The latest complete step of `workdir` if its checkpoint belongs to `signature`'s model (None when there
  is no checkpoint); raises checkpoint.SignatureMismatchError otherwise. Reads only."""
  steps = checkpoint.complete_steps(checkpoint_dir(workdir))
  if not steps:
    return None
  try:
    saved = checkpoint.read_meta(checkpoint_dir(workdir), steps[-1]).get("signature")
  except Exception:  # pylint: disable=broad-except  (a damaged meta: the writer's restore sets it aside)
    return steps[-1]
  if models.canonical_signature(saved) != models.canonical_signature(signature):
    raise checkpoint.SignatureMismatchError(f"{checkpoint_dir(workdir)} holds checkpoints of another model "
                                            f"({saved}), not of this config's {signature}")
  return steps[-1]


def load_model(workdir: str, step: int | None = None, *, attempts: int = 5):
  """The SimMIM model of a `simmim-pretrain` (or `simmim-convert`) workdir with its trained variables and the
  run's config. Read-only: safe on the workdir of a live run.

  Returns (model, variables, config): `model` is the `SimMIM` Linen module, `variables` = {"params": ...}
  from the latest complete (or the given) checkpoint, placed on the first local device. When the live run
  deletes the step being read (it keeps only the last few), the next latest complete step is read
  (up to `attempts` times). FileNotFoundError when there is no complete checkpoint (yet).
  """
  config = read_config(workdir)
  model = models.simmim_from_config(config)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.eval_shape(lambda key: model.init(key, *models.init_inputs(model.encoder)), jax.random.key(0))
  target = {"params": jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                                   abstract["params"])}
  directory = checkpoint_dir(workdir)
  damaged = set()
  for _ in range(attempts):
    steps = [s for s in checkpoint.complete_steps(directory) if s not in damaged]
    chosen = (steps[-1] if steps else None) if step is None else step
    if chosen is None:
      raise FileNotFoundError(f"no complete checkpoint in {directory} (yet)" +
                              (f"; step(s) {sorted(damaged)} cannot be read" if damaged else ""))
    if chosen not in steps:
      raise FileNotFoundError(f"no complete checkpoint of step {chosen} in {directory} (complete: {steps})")
    try:
      state, _ = checkpoint.read_state(directory, chosen, target, partial=True)
      return model, {"params": state["params"]}, config
    except Exception as e:  # pylint: disable=broad-except  (the step vanished, or it is damaged)
      if step is not None:
        raise
      if chosen in checkpoint.complete_steps(directory):  # still there, so damaged: try the previous step
        logging.warning("The checkpoint of step %d in %s cannot be read (%s: %s); trying the previous one",
                        chosen, directory, type(e).__name__, " ".join(str(e).split())[:300])
        damaged.add(chosen)
  raise FileNotFoundError(f"no checkpoint of {directory} could be read in {attempts} attempts")


# ----------------------------------------------------------------------------------------------------
# Writing


def _creatable(path: str) -> str | None:
  """None if `path` is (or can be made) a writable folder, else why not. Creates nothing."""
  if os.path.isdir(path):
    return None if os.access(path, os.W_OK | os.X_OK) else "is not writable"
  if os.path.exists(path):
    return "exists and is not a folder"
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
    return f"cannot be created ({parent} is not a writable folder)"
  return None


class WriterLock:
  """The workdir's `run.lock`, held by this process until `release()` (or its end)."""

  def __init__(self, workdir: str, program: str):
    self.path = os.path.join(workdir, LOCK_FILENAME)
    self._fd = safe_files.open_file(self.path, os.O_RDWR | os.O_CREAT, inside=workdir)  # never through a link
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = os.pread(self._fd, 4096, 0).decode("utf-8", "replace").strip() or "an unknown process"
      os.close(self._fd)
      raise WorkdirBusyError(f"--workdir={workdir} is in use by another run ({' '.join(holder.split())}): wait "
                             "for it to end, or use another --workdir") from None
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "program": program,
              "command": " ".join(sys.argv)[:500], "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
      os.ftruncate(self._fd, 0)
      os.pwrite(self._fd, json.dumps(holder).encode(), 0)
    except OSError as e:  # a full disk
      self.release()
      raise safe_files.WriteFailedError(f"cannot write {self.path}: {e.strerror or e}") from None

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # closing releases the flock; the file stays (the next writer reuses it)
      self._fd = None


def open_for_writing(workdir: str, config: ml_collections.ConfigDict, signature: dict,
                     program: str) -> WriterLock | None:
  """Checks the workdir, then takes it: lock (process 0, local folders), folder, `config.json`.

  Raises ConfigError before writing anything when the workdir cannot be written
  or its latest checkpoint is of another model; WorkdirBusyError when another run holds it. Returns the
  lock (None on other processes and on object stores): release it when the run ends.
  """
  local = safe_files.is_local(workdir)
  if local:
    problem = _creatable(workdir)
    if problem:
      raise ConfigError(f"--workdir={workdir!r} {problem}")
    for folder in (checkpoint_dir(workdir), checkpoint.set_aside_dir(checkpoint_dir(workdir))):
      problem = _creatable(folder)  # found now, not at the first save
      if problem:
        raise ConfigError(f"{folder!r} {problem}: the run saves its checkpoints there")
    refuse_links(workdir)
  try:
    check_resumable(workdir, signature)
  except checkpoint.SignatureMismatchError as e:
    raise ConfigError(f"--workdir={workdir}: {e}; use another --workdir, or the config of that run to "
                     "resume it") from None
  lock = None
  if jax.process_index() == 0:
    if local:
      os.makedirs(workdir, exist_ok=True)
      lock = WriterLock(workdir, program)
    try:
      check_resumable(workdir, signature)  # again, now that no other writer can change it
      write_config(workdir, config)
    except BaseException as e:
      if lock:
        lock.release()
      if isinstance(e, checkpoint.SignatureMismatchError):
        raise ConfigError(f"--workdir={workdir}: {e}") from None
      raise
  return lock


def resume(workdir: str, keep: int, signature: dict, abstract_state: Any, shardings: Any, *,
           include_step_zero: bool = False) -> tuple[checkpoint.Checkpointer, int, Any | None, dict]:
  """The writer's checkpointer of `workdir` and what it resumes from: (checkpointer, step, state, meta), see
  `checkpoint.restore_latest`. A checkpoint of another model, or no readable one left, is a ConfigError."""
  checkpointer = checkpoint.Checkpointer(checkpoint_dir(workdir), keep=keep)
  try:
    step, state, meta = checkpoint.restore_latest(checkpointer, signature, abstract_state, shardings,
                                                  include_step_zero=include_step_zero)
  except checkpoint.SignatureMismatchError as e:
    raise ConfigError(f"--workdir={workdir}: {e}; use another --workdir, or the config of that run to "
                      "resume it") from None
  except checkpoint.DamagedCheckpointError as e:
    raise ConfigError(f"--workdir={workdir}: {e}") from None
  return checkpointer, step, state, meta


def refuse_links(workdir: str) -> None:
  """safe_files.PathRefusedError (exit 2) naming the first symbolic link at a name the writer writes
  (WRITTEN_FILES and their .tmp, WRITTEN_FOLDERS, anything in reconstructions/). Reads only."""
  names = [*WRITTEN_FILES, *(name + safe_files.TMP_SUFFIX for name in WRITTEN_FILES), *WRITTEN_FOLDERS]
  safe_files.refuse_links(os.path.join(workdir, name) for name in names)
  reconstructions = os.path.join(workdir, RECONSTRUCTIONS_DIRNAME)
  if os.path.isdir(reconstructions):
    safe_files.refuse_links(os.path.join(reconstructions, name) for name in sorted(os.listdir(reconstructions)))


def config_text(config: ml_collections.ConfigDict) -> str:
  """config.json's text: strict JSON (a non-finite float is null, see safe_files.json_text)."""
  return safe_files.json_text(json.loads(config.to_json_best_effort()), indent=2, sort_keys=True)


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes config.json atomically and durably (safe_files: never through a link; a killed process or a full
  disk never leaves a torn file)."""
  safe_files.write_atomic(os.path.join(workdir, CONFIG_FILENAME), config_text(config), inside=workdir)


def check_convert_target(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Where `simmim-convert --workdir` may write, checked before anything is written. Reads only.

  Accepted: a missing or empty folder, or a simmim_jax workdir of the same model that holds no complete
  checkpoint yet (what a conversion or a first run killed before its first save leaves): its config.json
  reads as a simmim_jax config whose model signature (`signature`: parameter fields and img_size) equals
  `config`'s. Refused (FileExistsError, exit 2), before anything is written: any other folder, e.g. a
  Hugging Face export or a folder holding the user's own config.json, a workdir of another model, and a
  workdir with a complete checkpoint (convert into a new folder). A symbolic link at a name the conversion
  writes is refused too (`refuse_links`)."""
  if not safe_files.is_local(workdir):  # an object store: no links; an existing run's checkpoints are kept
    if checkpoint.complete_steps(checkpoint_dir(workdir)):
      raise FileExistsError(f"{workdir} already holds checkpoints; convert into a new folder")
    return
  problem = _creatable(workdir)
  if problem:
    raise FileExistsError(f"--workdir={workdir} {problem}")
  if not os.path.isdir(workdir) or set(os.listdir(workdir)) <= {LOCK_FILENAME}:  # empty, or the lock of a conversion
    return
  refuse_links(workdir)
  steps = checkpoint.complete_steps(checkpoint_dir(workdir))
  if steps:
    raise FileExistsError(f"--workdir={workdir} already holds checkpoints (steps {steps}); convert into a new folder")
  new_folder_hint = "nothing is overwritten: convert into a new or empty folder"
  try:
    saved = read_config(workdir)
    theirs = models.canonical_signature(signature(saved))
  except FileNotFoundError:
    raise FileExistsError(f"--workdir={workdir} is not empty and not a simmim_jax workdir (no {CONFIG_FILENAME}); "
                          f"{new_folder_hint}") from None
  except Exception:  # pylint: disable=broad-except  (any other JSON: a Hugging Face export, the user's file)
    raise FileExistsError(f"--workdir={workdir}: its {CONFIG_FILENAME} is not a simmim_jax config (a Hugging Face "
                          f"export, or your own file?); {new_folder_hint}") from None
  if theirs != models.canonical_signature(signature(config)):
    raise FileExistsError(f"--workdir={workdir} is the workdir of another model ({saved.model.name}, img_size "
                          f"{saved.img_size}, or other fields); {new_folder_hint}")


def write_converted(workdir: str, config: ml_collections.ConfigDict, state: Any, meta: dict) -> None:
  """`config.json` and `state` as the step-0 checkpoint of `workdir` (simmim-convert), which
  `check_convert_target` accepts: checked before anything is written."""
  check_convert_target(workdir, config)
  os.makedirs(workdir, exist_ok=True)
  lock = WriterLock(workdir, "simmim-convert") if safe_files.is_local(workdir) else None
  try:
    check_convert_target(workdir, config)  # again, now that no other writer can change it
    write_config(workdir, config)
    checkpointer = checkpoint.Checkpointer(checkpoint_dir(workdir))
    try:
      checkpointer.save(0, state, meta)
    finally:
      checkpointer.close()
  finally:
    if lock:
      lock.release()
