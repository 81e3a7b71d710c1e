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

Failures: W&B is optional, so after the config checks it never stops a run. A failing wandb.init, log or
finish (no login, a lost network, wandb's service process killed) is one warning, and the run continues
without W&B. Only a config that turns W&B on without wandb installed is refused, before anything is written.
"""

import os
import secrets
from typing import Any

import ml_collections
from absl import logging

from simmim_jax.storage import safe_files

RUN_ID_FILENAME = "wandb_run_id"
MODES = ("", "online", "offline")  # "": wandb's default (the WANDB_MODE environment variable, else online)
INSTALL_HINT = "pip install 'simmim_jax[wandb]'"

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


class WandbRun:
  """The W&B run of a workdir: created on the first run, continued by every rerun. Process 0 only.

  W&B is optional, so it can never stop the training: the first failure (wandb.init, a log call, finish;
  a lost network, wandb's service process gone) is one warning, and the run goes on without W&B
  (metrics.jsonl and TensorBoard keep every row)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    wandb = import_wandb()
    block = config.wandb
    self._project, self._run, self._wandb = block.project, None, wandb
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
      self._run.define_metric("step")
      self._run.define_metric("*", step_metric="step")
    except Exception as e:  # pylint: disable=broad-except  (wandb raises its own errors: login, network)
      self._give_up("wandb.init", e, "log in (`wandb login`, or set WANDB_API_KEY), or log offline "
                    "(config.wandb.mode='offline' or WANDB_MODE=offline; upload later with `wandb sync`)")
      return

  def _give_up(self, what: str, error: BaseException, fix: str = "") -> None:
    """Warns once and goes on without W&B."""
    self._run = None
    if isinstance(error, ConnectionError):  # wandb's service process is gone: release it now, not at exit
      try:  # (wandb's own exit hook would print the ConnectionResetError as a traceback)
        self._wandb.teardown()
      except (Exception, SystemExit):  # pylint: disable=broad-except  (wandb exits with the service's status)
        pass
    logging.warning("W&B (config.wandb.project=%r): %s failed (%s: %s); the run continues without W&B "
                    "(metrics.jsonl and TensorBoard keep every row)%s", self._project, what, type(error).__name__,
                    " ".join(str(error).split())[:300], f": {fix}" if fix else "")

  def log(self, step: int, values: dict[str, Any]) -> None:
    if self._run is None:
      return
    try:
      self._run.log({**values, "step": int(step)})
    except Exception as e:  # pylint: disable=broad-except  (a lost connection to wandb's service, ...)
      self._give_up(f"logging step {step}", e)

  def log_image(self, step: int, name: str, path: str) -> None:
    if self._run is None:
      return
    try:
      image = self._wandb.Image(path)
    except Exception as e:  # pylint: disable=broad-except
      self._give_up(f"reading the image of step {step}", e)
      return
    self.log(step, {name: image})

  def close(self, exit_code: int = 0, preempted: bool = False) -> None:
    """Finishes the W&B run with the training's exit code (train_loop's: 0, 1, 130 or 143)."""
    if self._run is None:
      return
    try:
      if preempted:
        self._run.mark_preempting()
      self._run.finish(exit_code=exit_code)
    except Exception as e:  # pylint: disable=broad-except
      self._give_up("finishing the run", e)

