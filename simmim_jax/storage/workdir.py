"""The workdir as a record: `config.json`, `checkpoints/` (Orbax, `checkpoint.py`), the writer's lock, and
the read-only loading of a trained model.

Two roles, never mixed:
  * **Readers** open files and nothing else: no rename, move, delete or create inside the workdir, so reading
    a workdir that a run is writing cannot disturb it. There is one reader of checkpoints, `read_checkpoint`,
    with one policy for a damaged step (the latest complete step that restores; an explicitly requested step
    that cannot be read is an error naming it); `load_model` (the public API, `simmim-reconstruct`,
    `simmim-convert --export`, `config.pretrained`), `read_latest_state` (`config.eval_only`) and
    `read_converted_params` read through it. `load_model` builds the model by the recipe `config.json`
    records (`recipe_of`: SimMIM for "pretrain" and "convert", Classifier for "finetune"), never by its keys.
  * **The writer** (the run that trains in the workdir) calls `open_for_writing` once every config check
    has passed: it checks that the workdir's latest checkpoint belongs to the same model, takes the workdir's
    lock, and only then creates the folder and writes `config.json` with its recipe. A refused run leaves the
    workdir as it was, byte for byte. Only the writer sets damaged checkpoints aside (`resume`).

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
# Reading: one reader, one policy for a damaged step


# The recipes of this package, as config.json records them ("recipe"; a recipe of your own records its own name).
# `simmim-convert` writes a workdir that `simmim-pretrain` continues, recording "pretrain" from then on.
RECIPES = ("pretrain", "finetune", "linear_probe", "convert")
RECIPE_KEY = "recipe"
SIMMIM_RECIPES = ("pretrain", "convert")  # their workdirs hold a SimMIM model; "finetune" a Classifier
_MODEL_FROM_CONFIG = {"pretrain": models.simmim_from_config, "convert": models.simmim_from_config,
                      "finetune": models.classifier_from_config}


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILENAME)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: {workdir!r} is not a simmim_jax workdir")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def recipe_of(config: ml_collections.ConfigDict) -> str:
  """The recipe that wrote `config` (a workdir's config.json): its "recipe" entry (RECIPES, or the name of a
  recipe of your own).

  Legacy path, for config.json written before the entry existed (and only there): the recipe is inferred
  from what only its config holds: `probe_blocks` a linear probe, `num_classes` a fine-tuning, else a
  pretraining (a `simmim-convert` workdir of that time reads as the pretraining workdir it is)."""
  recipe = config.get(RECIPE_KEY)
  if recipe is None:  # legacy: written before config.json recorded its recipe
    return "linear_probe" if "probe_blocks" in config else "finetune" if "num_classes" in config else "pretrain"
  return str(recipe)


def _program(recipe: str) -> str:
  """The program that runs `recipe` ("linear_probe" -> "simmim-linear-probe", as run.Recipe names it)."""
  return "simmim-" + recipe.replace("_", "-")


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, CHECKPOINT_DIRNAME)


def signature(config: ml_collections.ConfigDict, **extra) -> dict:
  """What a checkpoint must agree with to be resumed by `config`: the model's parameter fields (not remat /
  attention_impl) and the image size, plus a recipe's `extra` (e.g. num_classes)."""
  return {"model": models.parameter_fields(config.model.to_dict()), "img_size": int(config.img_size), **extra}


def _one_line(error: BaseException) -> str:
  return f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"


def read_checkpoint(workdir: str, target: Any, step: int | None = None, *, partial: bool = False,
                    attempts: int = 5) -> tuple[int, Any, dict]:
  """(step, state, meta) of a checkpoint of `workdir`, placed as the ShapeDtypeStructs of `target` say
  (`partial=True`: only the subtree `target` names, e.g. {"params": ...}). Reads only, complete steps only.

  The one policy for a damaged step, which every reader of a workdir follows:
    * `step=None`: the latest complete step that restores. A complete step whose files cannot be read is
      skipped for the previous one, with a warning, and left where it is (never renamed or deleted: only the
      writer sets it aside). A step that a live run deletes while it is read is skipped the same way, up to
      `attempts` times.
    * `step=N`: that step; FileNotFoundError when it is not a complete step, DamagedCheckpointError naming it
      when it cannot be read.
  FileNotFoundError when there is no complete checkpoint (yet); DamagedCheckpointError naming the steps when
  every complete step is damaged.
  """
  directory = checkpoint_dir(workdir)
  if step is not None:
    steps = checkpoint.complete_steps(directory)
    if step not in steps:
      raise FileNotFoundError(f"no complete checkpoint of step {step} in {directory} (complete: {steps})")
    try:
      return step, *checkpoint.read_state(directory, step, target, partial=partial)
    except Exception as e:  # pylint: disable=broad-except  (tensorstore / Orbax raise many kinds)
      if step not in checkpoint.complete_steps(directory):
        raise FileNotFoundError(f"the checkpoint of step {step} in {directory} was deleted while it was read "
                                "(a live run keeps only its last few)") from None
      raise checkpoint.DamagedCheckpointError(f"the checkpoint of step {step} in {directory} cannot be read "
                                              f"({_one_line(e)})") from None
  damaged = []
  for _ in range(attempts):
    steps = [s for s in checkpoint.complete_steps(directory) if s not in damaged]
    if not steps:
      break
    try:
      return steps[-1], *checkpoint.read_state(directory, steps[-1], target, partial=partial)
    except Exception as e:  # pylint: disable=broad-except  (the step vanished, or it is damaged)
      if steps[-1] in checkpoint.complete_steps(directory):  # still there, so damaged: try the previous step
        logging.warning("The checkpoint of step %d in %s cannot be read (%s); trying the previous one",
                        steps[-1], directory, _one_line(e))
        damaged.append(steps[-1])
  else:
    raise FileNotFoundError(f"no checkpoint of {directory} could be read in {attempts} attempts")
  if damaged:
    raise checkpoint.DamagedCheckpointError(
        f"the checkpoint(s) of step {', '.join(map(str, damaged))} in {directory} cannot be read and no older "
        "complete checkpoint is left")
  raise FileNotFoundError(f"no complete checkpoint in {directory} (yet)")


def _on_first_device(abstract: Any) -> Any:
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), abstract)


def load_model(workdir: str, step: int | None = None, *, recipes: tuple[str, ...] | None = None):
  """The model of a workdir with its trained parameters and the run's config, chosen by the recipe its
  config.json records (`recipe_of`): the `SimMIM` module of a `simmim-pretrain` / `simmim-convert` workdir, the
  `Classifier` of a `simmim-finetune` workdir. Read-only: safe on the workdir of a live run.

  Returns (model, variables, config): `variables` = {"params": ...} of the latest complete checkpoint that
  restores (or of `step`), placed on the first local device (`read_checkpoint`: the damaged-step policy).
  `recipes`: the recipes the caller accepts (default: every recipe whose workdir holds a model); another is a
  ValueError naming it, and so is a linear-probe workdir (its probe heads are no model of their own).
  FileNotFoundError when there is no config.json or no complete checkpoint (yet).
  """
  config = read_config(workdir)
  recipe = recipe_of(config)
  accepted = tuple(_MODEL_FROM_CONFIG) if recipes is None else recipes
  if recipe not in accepted or recipe not in _MODEL_FROM_CONFIG:
    what = " (probe heads on the frozen features of its config.pretrained)" if recipe == "linear_probe" else ""
    wanted = " / ".join(_program(r) for r in accepted if r in _MODEL_FROM_CONFIG)
    raise ValueError(f"{workdir} is a {_program(recipe)} workdir{what}: give a {wanted} workdir")
  model = _MODEL_FROM_CONFIG[recipe](config)
  inputs = models.init_inputs(model.encoder)
  inputs = inputs if isinstance(model, models.SimMIM) else inputs[:1]  # a Classifier takes images only
  abstract = jax.eval_shape(lambda key: model.init(key, *inputs), jax.random.key(0))["params"]
  _, state, _ = read_checkpoint(workdir, {"params": _on_first_device(abstract)}, step, partial=True)
  return model, {"params": state["params"]}, config


def read_latest_state(workdir: str, signature: dict, abstract_state: Any,
                      shardings: Any) -> tuple[int, Any | None, dict]:
  """(step, state, meta) of the latest complete checkpoint of `workdir` that restores, placed on `shardings`
  (`read_checkpoint`), or (0, None, {}) when there is none yet (`config.eval_only`). A latest checkpoint of
  another model than `signature`'s is a ConfigError. Reads only."""
  try:
    if check_resumable(workdir, signature) is None:
      return 0, None, {}
  except checkpoint.SignatureMismatchError as e:
    raise ConfigError(f"--workdir={workdir}: {e}; use the config of that run") from None
  return read_checkpoint(workdir, checkpoint.abstract_with_shardings(abstract_state, shardings))


def read_converted_params(workdir: str, abstract_params: Any) -> Any | None:
  """The parameters of a `simmim-convert` workdir (its step-0 checkpoint, meta "converted_from") placed as
  `abstract_params` (ShapeDtypeStructs with shardings) says, or None when the workdir holds none. Reads only;
  a damaged step 0 is a DamagedCheckpointError naming it (`read_checkpoint`)."""
  directory = checkpoint_dir(workdir)
  if 0 not in checkpoint.complete_steps(directory):
    return None
  try:
    converted = "converted_from" in checkpoint.read_meta(directory, 0)
  except Exception as e:  # pylint: disable=broad-except  (a damaged meta file)
    raise checkpoint.DamagedCheckpointError(f"the checkpoint of step 0 in {directory} cannot be read "
                                            f"({_one_line(e)})") from None
  if not converted:
    return None
  _, state, _ = read_checkpoint(workdir, {"params": abstract_params}, 0, partial=True)
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
  if not models.same_signature(saved, signature):
    raise checkpoint.SignatureMismatchError(f"{checkpoint_dir(workdir)} holds checkpoints of another model "
                                            f"({saved}), not of this config's {signature}")
  return steps[-1]


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
                     program: str, *, recipe: str) -> WriterLock | None:
  """Checks the workdir, then takes it: lock (process 0, local folders), folder, `config.json` (recording
  `recipe`, one of RECIPES, for the readers).

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
      write_config(workdir, config, recipe=recipe)
    except BaseException as e:
      if lock:
        lock.release()
      if isinstance(e, checkpoint.SignatureMismatchError):
        raise ConfigError(f"--workdir={workdir}: {e}") from None
      raise
  return lock


def resume(workdir: str, keep: int, signature: dict, abstract_state: Any,
           shardings: Any) -> tuple[checkpoint.Checkpointer, int, Any | None, dict]:
  """The writer's checkpointer of `workdir` and what it resumes from: (checkpointer, step, state, meta), see
  `checkpoint.restore_latest`. A checkpoint of another model, or no readable one left, is a ConfigError."""
  checkpointer = checkpoint.Checkpointer(checkpoint_dir(workdir), keep=keep)
  try:
    step, state, meta = checkpoint.restore_latest(checkpointer, signature, abstract_state, shardings,
                                                  same_model=models.same_signature)
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


def config_text(config: ml_collections.ConfigDict, recipe: str) -> str:
  """config.json's text: the config and the recipe that writes it (its "recipe" entry, which the readers
  choose by: `recipe_of`), as strict JSON (a non-finite float is null, see safe_files.json_text)."""
  if not recipe or not isinstance(recipe, str):
    raise ValueError(f"recipe={recipe!r}: name the recipe that writes the workdir (e.g. one of {RECIPES})")
  return safe_files.json_text({**json.loads(config.to_json_best_effort()), RECIPE_KEY: recipe}, indent=2,
                              sort_keys=True)


def write_config(workdir: str, config: ml_collections.ConfigDict, *, recipe: str) -> None:
  """Writes config.json, recording `recipe`, atomically and durably (safe_files: never through a link; a killed
  process or a full disk never leaves a torn file)."""
  safe_files.write_atomic(os.path.join(workdir, CONFIG_FILENAME), config_text(config, recipe), inside=workdir)


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
    theirs = signature(saved)
    recipe = recipe_of(saved)
  except FileNotFoundError:
    raise FileExistsError(f"--workdir={workdir} is not empty and not a simmim_jax workdir (no {CONFIG_FILENAME}); "
                          f"{new_folder_hint}") from None
  except Exception:  # pylint: disable=broad-except  (any other JSON: a Hugging Face export, the user's file)
    raise FileExistsError(f"--workdir={workdir}: its {CONFIG_FILENAME} is not a simmim_jax config (a Hugging Face "
                          f"export, or your own file?); {new_folder_hint}") from None
  if recipe not in SIMMIM_RECIPES:
    raise FileExistsError(f"--workdir={workdir} is a {_program(recipe)} workdir; {new_folder_hint}")
  if not models.same_signature(theirs, signature(config)):
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
    write_config(workdir, config, recipe="convert")
    checkpointer = checkpoint.Checkpointer(checkpoint_dir(workdir))
    try:
      checkpointer.save(0, state, meta)
    finally:
      checkpointer.close()
  finally:
    if lock:
      lock.release()
