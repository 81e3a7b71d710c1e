"""Optional Weights & Biases logging (`config.wandb`, the `wandb` extra), next to metrics.jsonl and TensorBoard.

Off while `config.wandb.project` is "". When on, process 0 (the writer) logs the resolved config, every row
of metrics.jsonl with the same step numbers, and the pretraining reconstruction grids as images. wandb is
imported here only, and only when a config turns it on: the package runs without it.

Steps: each row carries the train step as the metric "step", which every other metric uses as its x axis
(`define_metric("*", step_metric="step")`); wandb's own `_step` just counts rows. So a resumed run (whose
offline part restarts `_step` at 0) and the rows an interrupted run logged after its last checkpoint
(dropped from metrics.jsonl, kept by wandb) never make wandb discard a row.

Resume: the run id lives in `<workdir>/wandb_run_id`, written by the writer when its run starts (after
every config and workdir check); a rerun in the same workdir continues that W&B run (`resume="allow"`).
"""

import os
import secrets
from typing import Any

import ml_collections

from simmim_jax import safe_files

RUN_ID_FILENAME = "wandb_run_id"
MODES = ("", "online", "offline")  # "": wandb's default (the WANDB_MODE environment variable, else online)
INSTALL_HINT = "pip install 'simmim_jax[wandb]'"

_active = None  # the WandbRun of this process, while one is open (for `log_image`)


def enabled(config: ml_collections.ConfigDict) -> bool:
  block = config.get("wandb")
  return bool(block is not None and block.get("project"))


def import_wandb():
  """The wandb module; ImportError with the install line when it is missing."""
  try:
    import wandb  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"wandb is not installed ({e}): {INSTALL_HINT}") from None
  return wandb


def read_run_id(workdir: str) -> str | None:
  path = os.path.join(workdir, RUN_ID_FILENAME)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return f.read().strip() or None


def _write_run_id(workdir: str, run_id: str) -> None:
  safe_files.write_atomic(os.path.join(workdir, RUN_ID_FILENAME), run_id + "\n", inside=workdir)  # no link


class WandbError(RuntimeError):
  """wandb.init failed (login, network): a runtime failure of the tracker, after the config checks."""


class WandbRun:
  """The W&B run of a workdir: created on the first run, continued by every rerun. Process 0 only."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    global _active
    wandb = import_wandb()
    block = config.wandb
    run_id = read_run_id(workdir)
    if run_id is None:
      run_id = secrets.token_hex(4)  # wandb's own ids are 8 characters of [a-z0-9] too
      _write_run_id(workdir, run_id)  # before init: a run killed during init still resumes the same id
    try:
      self._run = wandb.init(
          project=block.project, entity=block.entity or None, name=block.name or None,
          mode=block.mode or None,  # None: WANDB_MODE, else online
          id=run_id, resume="allow", dir=os.path.abspath(workdir), config=config.to_dict(),
          settings=wandb.Settings(quiet=True))  # keep the progress lines readable
    except Exception as e:  # pylint: disable=broad-except  (wandb raises its own errors: login, network)
      raise WandbError(f"config.wandb.project={block.project!r}: wandb.init failed: {' '.join(str(e).split())}. "
                        "Log in (`wandb login`, or set WANDB_API_KEY), or log offline (config.wandb.mode="
                        "'offline' or WANDB_MODE=offline; upload later with `wandb sync`), or set "
                        "config.wandb.project='' to turn W&B off") from None
    self._run.define_metric("step")
    self._run.define_metric("*", step_metric="step")
    self._wandb = wandb
    _active = self

  def log(self, step: int, values: dict[str, Any]) -> None:
    self._run.log({**values, "step": int(step)})

  def log_image(self, step: int, name: str, path: str) -> None:
    self.log(step, {name: self._wandb.Image(path)})

  def close(self, exit_code: int = 0, preempted: bool = False) -> None:
    """Finishes the W&B run with the training's exit code (train_loop's: 0, 1, or 143 when preempted)."""
    global _active
    if _active is self:
      _active = None
    if preempted:
      self._run.mark_preempting()
    self._run.finish(exit_code=exit_code)


def log_image(step: int, name: str, path: str) -> None:
  """Logs the image file at `path` as `name` at `step` to this process's open W&B run; a no-op without one."""
  if _active is not None:
    _active.log_image(step, name, path)
