"""Scale-out paths: several processes, preemption, half-written checkpoints, cluster detection, launchers."""

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from simmim_jax.storage import checkpoint
from simmim_jax.train import distributed
from helpers import PRETRAIN, ROOT, TINY, env_one_device, run_pretrain, run_process

EVERY_STEP = "--config.log_every_steps=1"  # a row of metrics.jsonl per step, to compare losses step by step
LAUNCHER_ENV = {"PYTHON": sys.executable}  # the interpreter the launchers start


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {row["step"]: row["loss"] for row in map(json.loads, f)}


@pytest.mark.slow
def test_two_processes_match_one_process_and_their_checkpoint_resumes_on_one(tmp_path):
  """Same global batch on 2 processes (gloo on 127.0.0.1) as on 1: the demo stream is a function of the
  global sample index and masks come from fold_in(key, step), so only float reduction order differs."""
  steps = ["--config.total_steps=4", "--config.checkpoint_every_steps=2", EVERY_STEP]
  one = tmp_path / "one"
  assert run_pretrain(one, *steps).returncode == 0
  two = tmp_path / "two"
  result = run_process(["launch/cpu_multiprocess.sh", "--num_processes=2", "--", f"--workdir={two}", *TINY, *steps],
                       timeout=400, kill_after=10, env=LAUNCHER_ENV)
  assert result.returncode == 0, result.stderr[-4000:]
  assert result.stdout.count("step 4/4") == 1  # only process 0 prints and writes
  one_losses = losses(one)
  np.testing.assert_allclose([losses(two)[s] for s in range(1, 5)], [one_losses[s] for s in range(1, 5)],
                             rtol=1e-5)
  # The 2-process step-2 checkpoint restores in 1 process (another topology) and continues as the
  # 1-process run (the step-4 checkpoint is removed, as if the 2-process run had died after step 2).
  shutil.rmtree(two / "checkpoints" / "4")
  resumed = run_pretrain(two, *steps)
  assert resumed.returncode == 0, resumed.stderr[-4000:]
  assert "from step 2" in resumed.stdout
  np.testing.assert_allclose([losses(two)[s] for s in (3, 4)], [one_losses[s] for s in (3, 4)], rtol=1e-5)


@pytest.mark.slow  # end to end through subprocesses; .ci/run runs it
def test_sigterm_saves_a_checkpoint_and_the_rerun_continues_exactly(tmp_path):
  steps = ["--config.total_steps=40", "--config.checkpoint_every_steps=1000", EVERY_STEP]
  straight = tmp_path / "straight"
  assert run_pretrain(straight, *steps).returncode == 0
  workdir = tmp_path / "preempted"
  process = subprocess.Popen([*PRETRAIN, f"--workdir={workdir}", *TINY, *steps],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             env=env_one_device())
  output = []
  for line in process.stdout:  # wait until training runs, then preempt
    output.append(line)
    if line.startswith("step 3/"):
      process.send_signal(signal.SIGTERM)
      break
  output.extend(process.stdout)
  assert process.wait(timeout=120) == 143, "".join(output)
  assert "checkpoint saved" in "".join(output)
  saved = checkpoint.Checkpointer(str(workdir / "checkpoints")).all_steps()
  assert len(saved) == 1 and 3 <= saved[0] < 40
  result = run_pretrain(workdir, *steps)
  assert result.returncode == 0, result.stderr[-4000:]
  assert f"from step {saved[0]}" in result.stdout
  assert losses(workdir) == losses(straight)  # every step, bit for bit


@pytest.mark.slow  # end to end through subprocesses; .ci/run runs it
def test_half_written_checkpoints_are_set_aside_with_a_warning(tmp_path, caplog):
  workdir = tmp_path / "run"
  steps = ["--config.checkpoint_every_steps=1", EVERY_STEP]
  assert run_pretrain(workdir, "--config.total_steps=2", *steps).returncode == 0
  ckpt = workdir / "checkpoints"
  shutil.copytree(ckpt / "2", ckpt / "3")  # a step directory whose finalization never happened
  (ckpt / "3" / "commit_success.txt").unlink()
  (ckpt / "4.orbax-checkpoint-tmp-1700000000").mkdir()  # an interrupted write
  with caplog.at_level("WARNING"):
    checkpointer = checkpoint.Checkpointer(str(ckpt))
  assert checkpointer.all_steps() == [1, 2] and checkpointer.latest_step() == 2
  assert "incomplete checkpoint" in caplog.text and "/3" in caplog.text
  assert (workdir / "checkpoints_set_aside" / "3.incomplete").is_dir()  # moved aside, not deleted
  checkpointer.close()
  result = run_pretrain(workdir, "--config.total_steps=4", *steps)
  assert result.returncode == 0, result.stderr[-4000:]
  assert "from step 2" in result.stdout
  assert checkpoint.Checkpointer(str(ckpt)).all_steps()[-1] == 4


@pytest.mark.parametrize("environ, expected", [
    ({}, None),
    ({"TPU_WORKER_HOSTNAMES": "t1v-n-0"}, None),  # a single-host TPU VM
    ({"TPU_WORKER_HOSTNAMES": "t1v-n-0,t1v-n-1"}, "tpu"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}, "slurm"),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, "openmpi"),
])
def test_cluster_detection(environ, expected):
  assert distributed.detect_cluster(environ) == expected


def test_explicit_distributed_flags_must_come_together():
  with pytest.raises(ValueError, match="must be given together"):
    distributed.initialize("127.0.0.1:1234", None, None)
  with pytest.raises(ValueError, match="process_id=2"):
    distributed.initialize("127.0.0.1:1234", 2, 2)
  assert distributed.initialize() == "single"


def run_launcher(script, *args):
  return run_process(["bash", f"launch/{script}", *args], timeout=60, env=LAUNCHER_ENV)


def test_cpu_multiprocess_dry_run():
  result = run_launcher("cpu_multiprocess.sh", "--num_processes=3", "--port=4321", "--devices_per_process=2",
                        "--dry-run", "--", "--config=demo", "--workdir=/tmp/w x")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 3
  for i, line in enumerate(lines):
    assert "JAX_NUM_CPU_DEVICES=2" in line and "-m simmim_jax.main --config=demo" in line
    assert r"--workdir=/tmp/w\ x" in line  # arguments stay quoted
    assert line.endswith(f"--coordinator_address=127.0.0.1:4321 --num_processes=3 --process_id={i}")


@pytest.mark.slow  # end to end, minutes of the default suite; CI runs it (pytest -m slow)
def test_cpu_multiprocess_fails_when_a_process_fails():
  result = run_launcher("cpu_multiprocess.sh", "--num_processes=2", "--", "--config=demo",
                        "--workdir=/tmp/never", "--config.mask_ratio=7")
  assert result.returncode != 0


@pytest.mark.parametrize("script", ["tpu_vm.sh", "gpu.sh", "slurm.sbatch", "cpu_multiprocess.sh"])
def test_launchers_have_help(script):
  result = run_launcher(script, "--help")
  assert result.returncode == 0 and "Usage" in result.stdout and "--dry-run" in result.stdout


def test_tpu_vm_dry_run_prints_the_gcloud_commands():
  result = run_launcher("tpu_vm.sh", "all", "--name=simmim-v4", "--zone=us-central2-b",
                        "--accelerator_type=v4-32", "--dry-run", "--", "--config=pretrain/vit_base_800ep",
                        "--workdir=gs://bucket/run")
  assert result.returncode == 0, result.stderr
  out = result.stdout
  assert "gcloud compute tpus tpu-vm create simmim-v4 --zone=us-central2-b --accelerator-type=v4-32" in out
  assert "--worker=all" in out and "scp" in out and "delete simmim-v4" in out
  assert "simmim-pretrain --config=pretrain/vit_base_800ep --workdir=gs://bucket/run" in out


def test_gpu_and_slurm_dry_runs():
  gpu = run_launcher("gpu.sh", "--dry-run", "--", "--config=demo", "--workdir=/tmp/g")
  assert gpu.returncode == 0, gpu.stderr
  assert "simmim-pretrain --config=demo --workdir=/tmp/g" in gpu.stdout
  assert "XLA_FLAGS" in gpu.stdout
  slurm = run_launcher("slurm.sbatch", "--dry-run", "--", "--config=demo", "--workdir=/tmp/s")
  assert slurm.returncode == 0, slurm.stderr
  assert "srun" in slurm.stdout and "simmim-pretrain --config=demo --workdir=/tmp/s" in slurm.stdout
