"""Host-0 metric writers (JSON lines + TensorBoard + optional Weights & Biases) and the progress line /
throughput clock.

`metrics.jsonl` holds one JSON object per log step (strict JSON: a non-finite value, e.g. the loss of a
skipped step, is null). On resume from step k, rows after k (written by the
interrupted run after its last checkpoint) and a torn last line are dropped, so the file never repeats a
step. TensorBoard event files are written through `tf.summary` when TensorFlow is installed (the `data`
extra); without it only the JSON lines are written. With `config.wandb.project` set, the same rows also go
to a Weights & Biases run (`wandb_logging.py`).
"""

import json
import os
import time

import ml_collections
import numpy as np
from absl import logging

from simmim_jax.storage import safe_files, visualize
from simmim_jax.storage import wandb_logging  # imports wandb itself only when a config turns it on

METRICS_FILENAME = "metrics.jsonl"
TENSORBOARD_DIRNAME = "tensorboard"


class MetricWriter:
  """Appends metrics to `<workdir>/metrics.jsonl`, TensorBoard and (when `config` turns it on) Weights & Biases;
  a no-op on processes other than 0."""

  def __init__(self, workdir: str, *, resume_step: int = 0, enabled: bool = True,
               config: ml_collections.ConfigDict | None = None):
    self.enabled = enabled
    self._tb_writer = None
    self._wandb = None
    if not enabled:
      return
    if config is not None and wandb_logging.enabled(config):
      self._wandb = wandb_logging.WandbRun(config, workdir)  # first: a refused init leaves nothing open
    self.workdir = workdir
    self.path = os.path.join(workdir, METRICS_FILENAME)
    _truncate_after(self.path, resume_step, workdir)
    self._file = safe_files.open_append(self.path, inside=workdir)  # never through a link
    try:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      tf.config.set_visible_devices([], "GPU")
      self._tb_writer = tf.summary.create_file_writer(os.path.join(workdir, TENSORBOARD_DIRNAME))
    except ImportError:
      logging.info("TensorFlow is not installed: metrics go to %s only (no TensorBoard).", self.path)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    try:
      self._file.write(safe_files.json_text(row) + "\n")  # a non-finite value is null (strict JSON)
      self._file.flush()
    except OSError as e:  # a full disk: the run stops (exit 1) with the reason
      safe_files.close_quietly(self._file)  # drops the unwritten row: close() then has nothing to flush
      raise safe_files.WriteFailedError(f"cannot write {self.path}: {e.strerror or e}") from None
    if self._tb_writer is not None:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      with self._tb_writer.as_default():
        for name, value in scalars.items():
          tf.summary.scalar(name, float(value), step=int(step))
      self._tb_writer.flush()
    if self._wandb is not None:
      self._wandb.log(step, {k: float(v) for k, v in scalars.items()})

  def write_image(self, step: int, name: str, image: np.ndarray) -> None:
    """`image` (uint8 [H, W, 3]) as `<workdir>/<name>/step_<step>.png` (never through a link), to TensorBoard
    and to the W&B run."""
    if not self.enabled:
      return
    path = os.path.join(self.workdir, name, f"step_{int(step)}.png")
    visualize.save_png(image, path, inside=self.workdir)
    if self._tb_writer is not None:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      with self._tb_writer.as_default():
        tf.summary.image(name, image[None], step=int(step))
      self._tb_writer.flush()
    if self._wandb is not None:
      self._wandb.log_image(step, name, path)

  def close(self, exit_code: int = 0, preempted: bool = False) -> None:
    """`exit_code` / `preempted`: how the training ended (the W&B run records it). Every output is closed even
    when another one fails (a full disk); the first failure is raised after."""
    if not self.enabled:
      return
    first = None
    for close in (self._file.close, self._tb_writer.close if self._tb_writer is not None else None,
                  (lambda: self._wandb.close(exit_code, preempted)) if self._wandb is not None else None):
      try:
        if close is not None:
          close()
      except Exception as e:  # pylint: disable=broad-except
        first = first or e
    if first is not None:
      raise first


def _truncate_after(path: str, step: int, workdir: str) -> None:
  """Keep only complete rows with row["step"] <= step (rewritten atomically, never through a link)."""
  safe_files.refuse_links([path])
  if not os.path.exists(path):
    return
  kept = []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue  # a torn line from a killed process
      if isinstance(row, dict) and row.get("step", step + 1) <= step:
        kept.append(line if line.endswith("\n") else line + "\n")
  safe_files.write_atomic(path, "".join(kept), inside=workdir)


class Throughput:
  """Steps per second between log steps (the caller multiplies by images per step); the trainer `start`s it
  after the first, compiling step, so compilation is not counted."""

  def __init__(self):
    self._start_time = None
    self._start_step = None

  def start(self, step: int) -> None:
    self._start_time, self._start_step = time.perf_counter(), step

  def rate(self, step: int) -> tuple[float, float]:
    """(steps per second since the last `start`, seconds elapsed); restarts the clock at `step`."""
    if self._start_time is None or step <= self._start_step:
      return 0.0, 0.0
    elapsed = time.perf_counter() - self._start_time
    steps_per_sec = (step - self._start_step) / elapsed
    self.start(step)
    return steps_per_sec, elapsed


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def progress_line(step: int, total_steps: int, scalars: dict[str, float], eta_seconds: float | None) -> str:
  parts = [f"step {step}/{total_steps}", f"loss {scalars['loss']:.4f}", f"lr {scalars['lr']:.3e}",
           f"grad_norm {scalars['grad_norm']:.3f}"]
  if scalars.get("img_per_sec"):
    parts.append(f"{scalars['img_per_sec']:.1f} img/s")
  if eta_seconds is not None:
    parts.append(f"ETA {format_duration(eta_seconds)}")
  return " | ".join(parts)
