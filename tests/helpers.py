"""What several test modules share: the one subprocess runner, the tiny run (as flags and as a config), and
the fixtures of data and faults. Test modules import from here, never from one another
(tests/test_tests.py checks it)."""

import errno
import json
import os
import pathlib
import struct
import subprocess
import sys
import textwrap
import zlib

import jax
import numpy as np
from PIL import Image

from simmim_jax.configs import default_config

ROOT = pathlib.Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------------------
# Running a program in a fresh process

# simmim-pretrain as `python -m`, with the smallest demo run: a 32-wide, 2-block ViT, batch 16 of 64 demo images.
PRETRAIN = [sys.executable, "-m", "simmim_jax.main"]
TINY = ["--config=demo", "--config.model.embed_dim=32", "--config.model.depth=2",
        "--config.model.num_heads=2", "--config.global_batch_size=16", "--config.data.num_demo_images=64",
        "--config.warmup_steps=1", "--config.reconstruction_every_steps=0"]


def env_one_device(extra: dict | None = None, unset=()) -> dict[str, str]:
  """This process's environment for a child on one CPU device, as a user's laptop: without XLA_FLAGS (the 8
  fake devices of conftest.py) and WANDB_SERVICE (an in-process test's wandb service: a child starts, and owns,
  its own); TF_CPP_MIN_LOG_LEVEL=2; then the names in `unset` removed and `extra` set."""
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
  for name in ("XLA_FLAGS", "WANDB_SERVICE", *unset):
    env.pop(name, None)
  return {**env, **(extra or {})}


def run_process(command, *, cwd=ROOT, timeout: float = 600, env: dict | None = None, unset=(),
                kill_after: float | None = None) -> subprocess.CompletedProcess:
  """Runs `command` (a list) to its end in the environment of `env_one_device(env, unset)`; stdout and stderr
  come back as text. `kill_after`: under coreutils `timeout -k kill_after timeout`, which signals the command's
  whole process group (a launcher's children included) at `timeout` and kills it `kill_after` s later."""
  command = [str(part) for part in command]
  if kill_after is not None:
    command = ["timeout", "-k", str(kill_after), str(timeout), *command]
    timeout += kill_after + 60  # the coreutils timeout ends it first
  return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                        env=env_one_device(env, unset))


def run_pretrain(workdir, *extra, timeout: float = 600) -> subprocess.CompletedProcess:
  """The tiny demo run (TINY, then `extra`: a later flag wins) of simmim-pretrain in `workdir`."""
  return run_process([*PRETRAIN, f"--workdir={workdir}", *TINY, *extra], timeout=timeout)


_BLOCK_TENSORFLOW = """
import importlib.abc, sys
class BlockTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "tensorflow_datasets", "tf_keras", "keras"):
            raise ImportError("TensorFlow is blocked in this test: " + name)
sys.meta_path.insert(0, BlockTensorFlow())
"""
_NO_TENSORFLOW_IMPORTED = """
assert not any(n.startswith("tensorflow") for n in sys.modules), "TensorFlow was imported"
print("OK")
"""


def assert_runs_without_tensorflow(snippet: str, timeout: float = 300) -> None:
  """Runs a Python snippet in a fresh interpreter in which every TensorFlow import fails."""
  script = _BLOCK_TENSORFLOW + textwrap.dedent(snippet) + _NO_TENSORFLOW_IMPORTED
  result = run_process([sys.executable, "-c", script], timeout=timeout)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith("OK")


# ----------------------------------------------------------------------------------------------------
# A workdir's outputs


def read_metrics(workdir) -> list[dict]:
  """The rows of `workdir`/metrics.jsonl."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def snapshot(root) -> dict[str, bytes | None]:
  """A folder as data: every path under it with its bytes (folders as None), to assert a folder is unchanged."""
  root = pathlib.Path(root)
  if not root.exists():
    return {}
  result = {}
  for folder, dirs, files in os.walk(root):
    for name in dirs:
      result[os.path.relpath(os.path.join(folder, name), root)] = None
    for name in files:
      path = os.path.join(folder, name)
      result[os.path.relpath(path, root)] = pathlib.Path(path).read_bytes()
  return result


# ----------------------------------------------------------------------------------------------------
# The tiny run in process


def tiny_config(total_steps: int = 4, **changes):
  """The smallest pretraining config: vit_test_tiny (the model of TINY) at 32 px on 64 demo images, batch 16,
  on one device (config.mesh.data=1: this test process has 8 fake ones), a row of metrics every step, a
  checkpoint every 2 steps, no reconstructions, a stop after 3 non-finite steps. `changes`: dotted keys
  ({"mesh.data": -1} spreads over the devices)."""
  config = default_config.get_config()
  config.model.name, config.img_size, config.mask_patch_size = "vit_test_tiny", 32, 8
  config.data.source, config.data.num_demo_images = "demo", 64
  config.global_batch_size, config.total_steps, config.warmup_steps = 16, total_steps, 1
  config.log_every_steps, config.checkpoint_every_steps = 1, 2
  config.reconstruction_every_steps, config.max_nonfinite_steps = 0, 3
  config.mesh.data = 1
  for key, value in changes.items():
    *parents, leaf = key.split(".")
    target = config
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config


def one_device(monkeypatch) -> None:
  """The run core sees one device (of this process's 8 fake ones)."""
  from simmim_jax.train import sharding  # pylint: disable=g-import-not-at-top
  original = sharding.create_mesh
  monkeypatch.setattr(sharding, "create_mesh", lambda mesh_config, devices=None: original(
      mesh_config, jax.devices()[:1]))
  monkeypatch.setattr(jax, "device_count", lambda: 1)


def inject_nan_batches(monkeypatch, nan_steps) -> None:
  """Make the global batches of the given (1-based) steps all-NaN."""
  from simmim_jax import data  # pylint: disable=g-import-not-at-top
  counter = {"step": 0}
  original = data.make_global_batch

  def poisoned(local_batch, batch_sharding):
    counter["step"] += 1
    if counter["step"] in nan_steps:
      local_batch = {**local_batch, "image": np.full_like(local_batch["image"], np.nan)}
    return original(local_batch, batch_sharding)

  monkeypatch.setattr(data, "make_global_batch", poisoned)


def full_disk(monkeypatch, after_bytes: int = 0) -> None:
  """Every write of safe_files fails with ENOSPC once `after_bytes` were written."""
  from simmim_jax.storage import safe_files  # pylint: disable=g-import-not-at-top
  written = {"n": 0}
  original = safe_files._write  # pylint: disable=protected-access

  def write(fd, data):
    if written["n"] + len(data) > after_bytes:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    written["n"] += len(data)
    return original(fd, data)

  monkeypatch.setattr(safe_files, "_write", write)


# ----------------------------------------------------------------------------------------------------
# Images


def fixed_images(n: int = 16, seed: int = 0) -> np.ndarray:
  """[n, 32, 32, 3] smooth images (low-frequency patterns), which a masked-image model can learn to inpaint."""
  rng = np.random.default_rng(seed)
  yy, xx = np.meshgrid(np.linspace(0, 1, 32), np.linspace(0, 1, 32), indexing="ij")
  freq = rng.uniform(1, 3, size=(n, 1, 1, 3))
  phase = rng.uniform(0, 6, size=(n, 1, 1, 3))
  return np.sin(freq * 6 * yy[None, ..., None] + phase) * np.cos(freq * 4 * xx[None, ..., None]).astype(np.float32)


def write_folder(root, num_classes=3, train_per_class=6, test_counts=(3, 4, 3)):
  """A tiny ImageFolder: class c is a noisy image of colour c (variable sizes)."""
  rng = np.random.default_rng(0)
  colours = [(220, 30, 30), (30, 200, 40), (40, 40, 220)]
  for split, counts in (("train", [train_per_class] * num_classes), ("test", test_counts)):
    for c in range(num_classes):
      os.makedirs(root / split / f"class_{c}", exist_ok=True)
      for i in range(counts[c]):
        size = (int(rng.integers(36, 60)), int(rng.integers(36, 60)))
        pixels = np.clip(np.array(colours[c]) + rng.normal(0, 25, size + (3,)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / split / f"class_{c}" / f"{i}.png")
  return root


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
  return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_bomb(width: int, height: int, complete: bool = False) -> bytes:
  """An 8-bit RGB PNG declaring width x height. complete=False: a ~70-byte file (a few zero rows, then the
  data ends); complete=True: every row, all zeros (10000 x 10000 is a 290 KB file that decodes to 300 MB)."""
  header = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
  if complete:
    compressor, row = zlib.compressobj(9), b"\0" * (1 + 3 * width)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
  else:
    data = zlib.compress(b"\0" * 64)
  return b"\x89PNG\r\n\x1a\n" + header + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")
