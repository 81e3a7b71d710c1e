"""Checkpoints (checkpoint.py): what is set aside stays out of Orbax's reach, keep-N counts complete steps
exactly, and a failed write is reported at its own step in one line."""

import contextlib
import json
import logging
import pathlib
import re
import resource
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simmim_jax.storage import checkpoint
from simmim_jax.storage import workdir as workdir_lib
from helpers import ROOT, TINY, env_one_device


def steps_and_leftovers(root: pathlib.Path) -> tuple[list[int], list[str]]:
  names = sorted(p.name for p in root.iterdir())
  return sorted(int(n) for n in names if n.isdigit()), [n for n in names if not n.isdigit()]


def test_set_aside_folders_survive_garbage_collection_and_keep_n_is_exact(tmp_path):
  """Orbax takes any `<N>.orbax-checkpoint-tmp*` name for step N's uncommitted save, so deleting step N
  deleted a folder set aside beside the steps instead (and left step N: keep=2 kept 3 steps)."""
  root = tmp_path / "checkpoints"
  (root / "5.orbax-checkpoint-tmp").mkdir(parents=True)  # a save of step 5 cut short
  (root / "5.orbax-checkpoint-tmp" / "data").write_text("step 5, half written")
  (root / "3.orbax-checkpoint-tmp.incomplete").mkdir()  # set aside beside the steps by an earlier version
  checkpointer = checkpoint.Checkpointer(str(root), keep=2)
  aside = pathlib.Path(checkpoint.set_aside_dir(str(root)))
  assert aside == tmp_path / "checkpoints_set_aside"
  assert sorted(p.name for p in aside.iterdir()) == ["3.orbax-checkpoint-tmp.incomplete",
                                                     "5.orbax-checkpoint-tmp.incomplete"]
  for step in range(1, 9):  # steps 3 and 5 are written again, then deleted as old
    checkpointer.save(step, {"w": jnp.full((3,), step)}, {"step": step})
    checkpointer.poll()
  checkpointer.close()
  assert steps_and_leftovers(root) == ([7, 8], [])  # exactly the newest 2 complete steps
  assert (aside / "5.orbax-checkpoint-tmp.incomplete" / "data").read_text() == "step 5, half written"
  assert (aside / "3.orbax-checkpoint-tmp.incomplete").is_dir()


def test_keep_n_counts_complete_steps_after_a_reopen(tmp_path):
  root = tmp_path / "checkpoints"
  checkpointer = checkpoint.Checkpointer(str(root), keep=3)
  for step in (1, 2):
    checkpointer.save(step, {"w": jnp.zeros(3)}, {})
  checkpointer.close()
  (root / "3.orbax-checkpoint-tmp").mkdir()  # killed while saving step 3
  checkpointer = checkpoint.Checkpointer(str(root), keep=3)
  for step in (3, 4, 5):
    checkpointer.save(step, {"w": jnp.zeros(3)}, {})
  checkpointer.close()
  assert steps_and_leftovers(root) == ([3, 4, 5], [])


@contextlib.contextmanager
def file_size_limit(limit: int):
  """Writes past `limit` bytes fail (EFBIG) in this process, as on a full disk; SIGXFSZ is ignored for it."""
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
  try:
    yield
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, previous)


def test_a_failed_write_is_reported_at_its_own_step_in_one_line(tmp_path, capfd):
  """The failure surfaces at the first step boundary after the write ended (poll), names step 2, not the next
  save's step, and the storage library's tracebacks and asyncio's notices stay off the console."""
  root = tmp_path / "checkpoints"
  checkpointer = checkpoint.Checkpointer(str(root), keep=3)
  checkpointer.save(1, {"w": jnp.zeros(3)}, {})
  checkpointer.wait()
  with file_size_limit(64 * 1024):
    noise = jax.random.normal(jax.random.key(0), (512, 1024))  # 2 MiB that do not compress
    checkpointer.save(2, {"w": noise}, {})  # its data file cannot be written
    with pytest.raises(checkpoint.CheckpointWriteError, match=r"checkpoint of step 2 to .*checkpoints: .*large"):
      deadline = time.monotonic() + 30
      while time.monotonic() < deadline:
        checkpointer.poll()
        time.sleep(0.05)
  checkpointer.close()
  assert checkpoint.complete_steps(str(root)) == [1]
  err = capfd.readouterr().err
  assert "Traceback" not in err and "Event loop is closed" not in err and "never retrieved" not in err, err


def test_asyncio_notices_of_a_failed_write_stay_off_the_console(tmp_path, caplog):
  """A full disk gave about a thousand "<class> exception was never retrieved" errors, during the save and
  when the failed writes' tasks are collected after the checkpointer closed: they drop to DEBUG; other asyncio
  records keep their level."""
  checkpointer = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
  notices = ["Future exception was never retrieved", "_GatheringFuture exception was never retrieved",
             "Task exception was never retrieved"]
  with caplog.at_level("DEBUG"):
    logging.getLogger("asyncio").error(notices[0] + "\nfuture: <Future finished exception=OSError(28)>")
    checkpointer.close()
    for notice in notices[1:]:
      logging.getLogger("asyncio").error(notice + "\nfuture: <Task finished exception=ValueError()>")
    logging.getLogger("asyncio").error("Exception in callback")
  levels = {r.getMessage().split("\n")[0]: r.levelno for r in caplog.records if r.name == "asyncio"}
  assert levels == {**{notice: logging.DEBUG for notice in notices}, "Exception in callback": logging.ERROR}


# ----------------------------------------------------------------------------------------------------
# End to end: simmim-pretrain killed during a save, and on a disk that fills up

HOLD_FINALIZE = """
import os, sys, time
from orbax.checkpoint._src.path import atomicity
_finalize = atomicity.AtomicRenameTemporaryPath.finalize
async def finalize(self):  # the steps in $HOLD_STEPS stay half-saved until the process is killed
  if self.get().name.split(".")[0] in os.environ.get("HOLD_STEPS", "").split(","):
    print("saving " + self.get().name, flush=True)
    time.sleep(3600)
  return await _finalize(self)
atomicity.AtomicRenameTemporaryPath.finalize = finalize
"""


def pretrain(workdir, *extra, prelude="", env=None):
  entry = prelude + "\nimport sys; from simmim_jax.cli import pretrain_main; sys.exit(pretrain_main())"
  return subprocess.Popen([sys.executable, "-c", entry, f"--workdir={workdir}", *TINY, *extra], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**env_one_device(), **(env or {})})


@pytest.mark.slow  # end to end through subprocesses; .ci/run runs it
def test_kill_9_during_saves_keeps_exactly_n_steps_and_every_set_aside_folder(tmp_path):
  """Two runs killed with SIGKILL while a save is being finalized (steps 6, then 10), then the same command
  to the end with keep_checkpoints=2: exactly steps 14 and 16 remain, both half-saved steps are kept in
  checkpoints_set_aside/ (Orbax deleted them in place of steps 6 and 10 when they were beside the steps, and
  left those steps: `6 10 14 16`), and the result equals an uninterrupted run's."""
  steps = ["--config.total_steps=16", "--config.checkpoint_every_steps=2", "--config.keep_checkpoints=2",
           "--config.log_every_steps=1"]
  straight = tmp_path / "straight"
  out, err = pretrain(straight, *steps).communicate(timeout=600)
  assert "step 16/16" in out, err[-3000:]
  workdir = tmp_path / "killed"
  for held in ("6", "10"):
    process = pretrain(workdir, *steps, prelude=HOLD_FINALIZE, env={"HOLD_STEPS": held})
    for line in process.stdout:
      if line.startswith(f"saving {held}.orbax-checkpoint-tmp"):
        break
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert (workdir / "checkpoints" / f"{held}.orbax-checkpoint-tmp").is_dir()
  out, err = pretrain(workdir, *steps).communicate(timeout=600)
  assert "step 16/16" in out, err[-3000:]
  assert steps_and_leftovers(workdir / "checkpoints") == ([14, 16], [])
  aside = sorted(p.name for p in (workdir / "checkpoints_set_aside").iterdir())
  assert aside == ["10.orbax-checkpoint-tmp.incomplete", "6.orbax-checkpoint-tmp.incomplete"]
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert [r["step"] for r in rows] == list(range(1, 17))
  _, final, _ = workdir_lib.load_model(str(workdir))
  _, expected, _ = workdir_lib.load_model(str(straight))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(final), jax.device_get(expected))


FULL_DISK = """
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, resource.RLIM_INFINITY))
"""


@pytest.mark.slow  # end to end through a subprocess; .ci/run runs it
def test_a_disk_that_fills_up_during_a_save_stops_the_run_at_that_step_in_one_line(tmp_path):
  """Before: about a thousand lines of asyncio and Orbax tracebacks, and the failure noticed only at the next
  save, blaming step 4 while step 2 was lost. Now: exit 1 with one line naming the step whose save failed (the
  first that crosses the file-size limit: Orbax's file sizes vary from run to run), every earlier save
  complete, and the run stopped before another save could be attempted (the failure is noticed at the first
  step boundary after the asynchronous write ended)."""
  workdir = tmp_path / "run"
  process = pretrain(workdir, "--config.total_steps=6", "--config.checkpoint_every_steps=2",
                     "--config.log_every_steps=1", prelude=FULL_DISK)
  out, err = process.communicate(timeout=600)
  assert process.returncode == 1, err[-3000:]
  lines = err.strip().splitlines()
  assert len(lines) == 1, err[-3000:]
  match = re.match(r"simmim-pretrain: stopped: could not write the checkpoint of step (\d+) to ", lines[0])
  assert match, lines[0]
  failed = int(match.group(1))
  assert steps_and_leftovers(workdir / "checkpoints")[0] == [s for s in (2, 4, 6) if s < failed]
  assert f"step {failed + 3}/6" not in out and "Done" not in out


def test_the_caller_decides_which_signatures_are_the_same_model(tmp_path):
  """checkpoint.py knows no model: `restore_latest` asks the caller's `same_model` (the workdir passes
  models.same_signature, which ignores runtime fields such as remat)."""
  checkpointer = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
  checkpointer.save(1, {"w": jnp.ones(3)}, {"signature": {"model": "a", "remat": True}})
  checkpointer.wait()
  abstract = {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}
  shardings = {"w": jax.sharding.SingleDeviceSharding(jax.devices()[0])}
  step, state, _ = checkpoint.restore_latest(checkpointer, {"model": "a"}, abstract, shardings,
                                             same_model=lambda saved, expected: saved["model"] == expected["model"])
  assert step == 1 and state["w"].tolist() == [1, 1, 1]
  with pytest.raises(checkpoint.SignatureMismatchError, match="another model"):
    checkpoint.restore_latest(checkpointer, {"model": "a"}, abstract, shardings)  # default: equal signatures
  assert "simmim_jax.models" not in pathlib.Path(checkpoint.__file__).read_text()
