"""The run core (run.py) gives every trainer the same guarantees: non-finite steps skipped, SIGTERM -> save ->
Preempted -> an exact resume, gradient accumulation equal to the full batch."""

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simmim_jax.storage import checkpoint, metrics, wandb_logging
from simmim_jax import cli
from simmim_jax.train import downstream, finetune, linear_probe, optim, pretrain, run, sharding
from simmim_jax.configs import finetune_config
from helpers import ROOT, TINY, env_one_device, inject_nan_batches, one_device, tiny_config, write_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return write_folder(tmp_path_factory.mktemp("folder"))


def downstream_config(program, folder, total_steps=4):
  config = finetune_config.get_config() if program == "finetune" else finetune_config.get_linear_probe_config()
  config.model.update(name="vit_base_patch16", patch_size=4, embed_dim=32, depth=2, num_heads=2)
  config.update(img_size=32, global_batch_size=8, total_steps=total_steps, warmup_steps=1, probe_blocks=(1, 2),
                log_every_steps=1, eval_every_steps=2, checkpoint_every_steps=2, max_nonfinite_steps=3)
  config.data.update(source="folder", data_dir=str(folder), eval_split="test")
  config.mesh.data = 1
  return config


def train(program, config, workdir):
  module = {"pretrain": pretrain, "finetune": finetune, "linear_probe": linear_probe}[program]
  return module.train_and_evaluate(config, str(workdir))


def config_for(program, folder, total_steps):
  return tiny_config(total_steps) if program == "pretrain" else downstream_config(program, folder, total_steps)


def losses(workdir):
  return [(r["step"], r["loss"]) for r in map(json.loads, open(workdir / "metrics.jsonl")) if "loss" in r]


def saved_steps(workdir):
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.mark.slow  # every recipe: test_recipe_contract proves the core's preemption and exact resume by default
@pytest.mark.parametrize("program", ["pretrain", "finetune", "linear_probe"])
def test_sigterm_saves_raises_preempted_and_the_rerun_continues_exactly(program, folder, tmp_path, monkeypatch):
  one_device(monkeypatch)
  straight, preempted = tmp_path / "straight", tmp_path / "preempted"
  train(program, config_for(program, folder, 4), straight)
  with monkeypatch.context() as m:
    m.setattr(run.StopRequest, "should_stop", lambda self, step: step == 3)  # SIGTERM during step 3
    with pytest.raises(run.Preempted, match="after step 3"):
      train(program, config_for(program, folder, 4), preempted)
  assert 3 in saved_steps(preempted)  # saved at once, not at the next checkpoint step
  train(program, config_for(program, folder, 4), preempted)
  assert losses(preempted) == losses(straight)  # every step, bit for bit
  assert [s for s, _ in losses(preempted)] == [1, 2, 3, 4]


@pytest.mark.slow  # end to end, minutes of the default suite; CI runs it (pytest -m slow)
@pytest.mark.parametrize("program", ["finetune", "linear_probe"])
def test_a_nan_batch_is_skipped_and_repeated_nans_stop_the_run(program, folder, tmp_path, monkeypatch):
  one_device(monkeypatch)
  inject_nan_batches(monkeypatch, {2})
  train(program, downstream_config(program, folder, 4), tmp_path / "one")
  rows = [r for r in map(json.loads, open(tmp_path / "one" / "metrics.jsonl")) if "loss" in r]
  assert rows[1]["loss"] is None and rows[1]["skipped_steps"] == 1 and rows[3]["skipped_steps"] == 1  # NaN: null
  assert np.isfinite(rows[3]["loss"])
  inject_nan_batches(monkeypatch, set(range(2, 100)))
  with pytest.raises(run.NonFiniteError, match="3 consecutive steps"):
    train(program, downstream_config(program, folder, 20), tmp_path / "many")


def tiny_classifier_config(accumulation, batch):
  config = finetune_config.get_config()
  config.model.update(name="vit_base_patch16", patch_size=4, embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.0)
  config.update(img_size=32, global_batch_size=batch, num_classes=3, num_train_images=64, total_steps=4,
                warmup_steps=1)
  config.augment.update(mixup=0.0, cutmix=0.0)  # no random mixing: the same data in both runs
  config.optimizer.accumulation_steps = accumulation
  config.mesh.data = 1
  return config


@pytest.mark.slow  # end to end, minutes of the default suite; CI runs it (pytest -m slow)
def test_finetune_accumulation_of_two_batches_of_b_equals_one_batch_of_2b():
  images = jax.random.normal(jax.random.key(0), (16, 32, 32, 3))
  labels = jnp.arange(16) % 3
  mesh = sharding.create_mesh(tiny_classifier_config(1, 16).mesh, jax.devices()[:1])
  results = []
  for accumulation, batch in ((1, 16), (2, 8)):
    config = tiny_classifier_config(accumulation, batch)
    with config.unlocked():
      config.model = downstream.resolve_model_fields(config)
    setup = finetune.build_step(config, mesh)
    model = downstream.build_classifier(config)
    tx, _ = optim.create_finetune_optimizer(config, model.encoder)
    state = run.TrainState.create(tx, finetune.init_params(model, jax.random.key(1)))
    for _ in range(2):
      state, step_metrics = setup.train_step(state, images, labels, jax.random.key(2))
    results.append((jax.device_get(state.params), float(step_metrics["loss"])))
  (full, full_loss), (accumulated, accumulated_loss) = results
  np.testing.assert_allclose(accumulated_loss, full_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), accumulated, full)


def test_guarded_update_leaves_params_and_optimizer_state_untouched_on_a_nan():
  import optax
  tx = optax.adamw(1e-3)
  params = {"w": jnp.ones((3,))}
  opt_state = tx.init(params)
  grads = {"w": jnp.array([1.0, jnp.nan, 0.0])}
  new_params, new_opt_state, streak, _, finite = run.guarded_update(tx, params, opt_state, grads, jnp.float32(1.0),
                                                                    jnp.int32(2))
  assert not bool(finite) and int(streak) == 3
  jax.tree.map(np.testing.assert_array_equal, (new_params, new_opt_state), (params, opt_state))


@pytest.mark.slow  # subprocesses killed at random moments; .ci/run runs it
@pytest.mark.parametrize("program", ["finetune", "linear_probe"])
def test_kill_9_at_random_moments_resumes_to_the_uninterrupted_result(program, folder, tmp_path):
  """As the pretraining kill -9 test (test_robustness.py), for fine-tuning and probing: two runs killed with
  SIGKILL while training, then the same command to the end: the losses equal an uninterrupted run's."""
  config = {"finetune": "finetune/demo", "linear_probe": "linear_probe/demo"}[program]
  args = [f"--config={config}", "--config.data.source=folder", f"--config.data.data_dir={folder}",
          "--config.data.eval_split=test",
          "--config.model.embed_dim=32", "--config.model.depth=2", "--config.model.num_heads=2",
          "--config.global_batch_size=8", "--config.total_steps=12", "--config.warmup_steps=1",
          "--config.log_every_steps=1", "--config.eval_every_steps=6", "--config.checkpoint_every_steps=2"]
  if program == "linear_probe":
    args.append("--config.probe_blocks=(1,2)")
  entry = f"import sys; from simmim_jax.cli import {program}_main; sys.exit({program}_main())"
  command = lambda workdir: [sys.executable, "-c", entry, f"--workdir={workdir}", *args]
  straight = tmp_path / "straight"
  result = subprocess.run(command(straight), cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=env_one_device())
  assert result.returncode == 0, result.stderr[-3000:]
  workdir = tmp_path / "killed"
  rng = random.Random(0)
  for _ in range(2):
    process = subprocess.Popen(command(workdir), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True, env=env_one_device())
    for line in process.stdout:  # wait until this run trains, so every kill lands in training
      if line.startswith("step "):
        break
    time.sleep(rng.uniform(0.0, 2.0))
    process.send_signal(signal.SIGKILL)
    process.stdout.close()
    process.wait(timeout=60)
  result = subprocess.run(command(workdir), cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=env_one_device())
  assert result.returncode == 0, result.stderr[-3000:]
  assert losses(workdir) == losses(straight)
  assert [s for s, _ in losses(workdir)] == list(range(1, 13))


# ----------------------------------------------------------------------------------------------------
# The loop's guarantees on a stand-in recipe (no model: a state of four numbers), so each test runs in seconds


def stand_in_loop(workdir, *, total_steps=4, advance=None, wandb_project=""):
  """A `run.Loop` whose step adds 1 to a 4-vector: checkpoints every 2 steps, metrics every step."""
  config = tiny_config(total_steps)
  config.wandb.project = wandb_project
  checkpointer = checkpoint.Checkpointer(str(workdir / "checkpoints"), keep=config.keep_checkpoints)
  return run.Loop(config=config, workdir=str(workdir), checkpointer=checkpointer, start_step=0,
                  total_steps=total_steps, advance=advance or add_one,
                  batches=iter(lambda: {"image": np.zeros((2, 2), np.float32)}, None),
                  data_sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]), images_per_step=2,
                  flops_per_image=None, meta=lambda step: {}, params=lambda state: state["params"])


def add_one(state, batch):
  del batch
  return {"params": state["params"] + 1.0}, {"loss": jnp.float32(1.0), "grad_norm": jnp.float32(1.0),
                                             "lr": jnp.float32(0.1), "nonfinite_streak": jnp.int32(0)}


def stand_in_state():
  return {"params": jnp.zeros((4,))}


def tmp_dirs(workdir):
  return sorted(p.name for p in (workdir / "checkpoints").iterdir() if not p.name.isdigit())


class FakeWandb:
  """The few calls wandb_logging makes; `fail` names the one that raises (as when wandb-core is killed)."""

  def __init__(self, fail):
    self.fail, self.logged = fail, []
    self.Settings = lambda **kwargs: kwargs
    self.Image = lambda path: path

  def init(self, **kwargs):
    if self.fail == "init":
      raise ConnectionRefusedError("wandb-core is not running")
    return self

  def define_metric(self, *args, **kwargs):
    pass

  def log(self, row):
    if self.fail == "log" and len(self.logged) == 1:
      raise ConnectionResetError(104, "Connection reset by peer")
    self.logged.append(row)

  def mark_preempting(self):
    pass

  def teardown(self):
    pass

  def finish(self, exit_code=0):
    if self.fail in ("log", "finish"):  # a dead service fails again at the end
      raise ConnectionResetError(104, "Connection reset by peer")


@pytest.mark.parametrize("fail", ["init", "log", "finish"])
def test_a_failing_wandb_warns_once_and_training_goes_on_with_every_checkpoint(fail, tmp_path, monkeypatch,
                                                                                 caplog):
  fake = FakeWandb(fail)
  monkeypatch.setattr(wandb_logging, "import_wandb", lambda: fake)
  with caplog.at_level("WARNING"):
    state = run.train_loop(stand_in_loop(tmp_path, wandb_project="p"), stand_in_state())
  assert float(state["params"][0]) == 4.0
  assert checkpoint.complete_steps(str(tmp_path / "checkpoints")) == [2, 4] and tmp_dirs(tmp_path) == []
  assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
  warnings = [r.getMessage() for r in caplog.records if "continues without W&B" in r.getMessage()]
  assert len(warnings) == 1, warnings  # said once
  assert f"{'wandb.init' if fail == 'init' else 'logging step 2' if fail == 'log' else 'finishing'}" in warnings[0]


def test_the_checkpoint_in_flight_is_written_before_anything_else_closes(tmp_path, monkeypatch):
  """A step fails just after a save started and closing the metric writer fails too (a dead W&B service, a
  full disk): the save is still waited for and finalized, and the step's own error is the one raised."""
  from orbax.checkpoint._src.path import atomicity
  original_finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def slow_finalize(self):
    await asyncio.sleep(1.0)  # a large checkpoint: still being written when the loop ends
    return await original_finalize(self)

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", slow_finalize)
  monkeypatch.setattr(metrics.MetricWriter, "close", lambda self, *args, **kwargs: (_ for _ in ()).throw(
      ConnectionResetError(104, "Connection reset by peer")))

  def fail_at_step_3(state, batch):
    if float(state["params"][0]) == 2.0:
      raise ValueError("the input pipeline broke at step 3")
    return add_one(state, batch)

  with pytest.raises(ValueError, match="step 3"):
    run.train_loop(stand_in_loop(tmp_path, advance=fail_at_step_3), stand_in_state())
  assert checkpoint.complete_steps(str(tmp_path / "checkpoints")) == [2] and tmp_dirs(tmp_path) == []


def test_out_of_memory_is_one_line_naming_the_step_and_the_ways_out(tmp_path, capsys):
  def out_of_memory_at_step_3(state, batch):
    if float(state["params"][0]) == 2.0:
      raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9.50GiB.\n"
                                       "BufferAssignment OOM Debugging.\n...")
    return add_one(state, batch)

  loop = stand_in_loop(tmp_path, advance=out_of_memory_at_step_3)
  assert cli.run_program("simmim-pretrain", lambda: run.train_loop(loop, stand_in_state())) == 1
  (line,) = capsys.readouterr().err.strip().splitlines()
  assert "out of accelerator memory at step 3" in line and "9.50GiB" in line
  assert all(fix in line for fix in ("config.global_batch_size", "config.model.remat=True", "config.mesh.fsdp"))
  assert checkpoint.complete_steps(str(tmp_path / "checkpoints")) == [2]


@pytest.mark.parametrize("signum, exit_code", [(signal.SIGTERM, 1), (signal.SIGINT, 130)])
def test_a_stop_signal_before_the_first_step_saves_nothing_and_says_so(signum, exit_code, tmp_path, capsys):
  """SIGTERM during the restore or the compilation: 143 would mean "saved and preempted", so it is a plain
  stop (exit 1); Ctrl-C is 130 either way. Both say that nothing was saved."""
  stop_request = run.StopRequest()  # as `owned_workdir` installs it
  try:
    os.kill(os.getpid(), signum)
    time.sleep(0.1)
    loop = stand_in_loop(tmp_path, advance=lambda state, batch: pytest.fail("a step ran"))
    assert cli.run_program("simmim-pretrain", lambda: run.train_loop(loop, stand_in_state())) == exit_code
  finally:
    stop_request.close()
  out, err = capsys.readouterr()
  assert "before the first step: no step ran, so nothing was saved" in out + err and "Traceback" not in err
  assert checkpoint.complete_steps(str(tmp_path / "checkpoints")) == []


@pytest.mark.parametrize("signum, exit_code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_signal_saves_the_step_it_lands_in_and_exits_with_its_code(signum, exit_code, tmp_path, capsys):
  stop_request = run.StopRequest()

  def signal_in_step_3(state, batch):
    if float(state["params"][0]) == 2.0:
      os.kill(os.getpid(), signum)  # handled between bytecodes: the step itself finishes
    return add_one(state, batch)

  try:
    loop = stand_in_loop(tmp_path, total_steps=8, advance=signal_in_step_3)
    assert cli.run_program("simmim-pretrain", lambda: run.train_loop(loop, stand_in_state())) == exit_code
  finally:
    stop_request.close()
  out, err = capsys.readouterr()
  assert out.strip().splitlines()[-1].startswith(f"simmim-pretrain: Stopped by "
                                                 f"{'Ctrl-C' if signum == signal.SIGINT else 'SIGTERM'} after step 3")
  assert "Traceback" not in err
  assert checkpoint.complete_steps(str(tmp_path / "checkpoints")) == [2, 3]
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers given back


def test_the_stop_request_is_installed_for_the_whole_run_and_found_by_the_loop():
  before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
  assert run.StopRequest.current() is None
  stop_request = run.StopRequest()
  try:
    assert run.StopRequest.current() is stop_request
  finally:
    stop_request.close()
  assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


# ----------------------------------------------------------------------------------------------------
# Ctrl-C end to end: a real SIGINT to simmim-pretrain


def pretrain_process(workdir, *extra, prelude="", **popen):
  """simmim-pretrain on the tiny demo config in a fresh process (`prelude`: Python run first)."""
  entry = prelude + "\nimport sys; from simmim_jax.cli import pretrain_main; sys.exit(pretrain_main())"
  return subprocess.Popen([sys.executable, "-c", entry, f"--workdir={workdir}", *TINY, *extra], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_one_device(), **popen)


def interrupt_after(process, step_prefix, signals, pause=0.0):
  """Waits for the progress line starting with `step_prefix`, sends `signals` (`pause` s apart), returns
  (exit status, stdout, stderr)."""
  output = []
  for line in process.stdout:
    output.append(line)
    if line.startswith(step_prefix):
      for signum in signals:
        process.send_signal(signum)
        time.sleep(pause)
      break
  out, err = process.communicate(timeout=300)
  return process.returncode, "".join(output) + out, err


SIGINT_DISPOSITIONS = {
    "default": ({}, ""),  # Python's KeyboardInterrupt handler
    # a background job of a shell ignores SIGINT; then something resets it to the default action
    "ignored, then reset": ({"preexec_fn": lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)},
                            "import signal; signal.signal(signal.SIGINT, signal.SIG_DFL)"),
}


@pytest.mark.slow  # end to end through subprocesses; .ci/run runs it
def test_ctrl_c_saves_exits_130_in_one_line_and_the_rerun_continues_exactly(tmp_path):
  steps = ["--config.total_steps=30", "--config.checkpoint_every_steps=1000", "--config.log_every_steps=1"]
  straight = tmp_path / "straight"
  assert interrupt_after(pretrain_process(straight, *steps), "never", [])[0] == 0
  for name, (popen, prelude) in SIGINT_DISPOSITIONS.items():
    workdir = tmp_path / name.replace(",", "").replace(" ", "_")
    code, out, err = interrupt_after(pretrain_process(workdir, *steps, prelude=prelude, **popen), "step 3/",
                                     [signal.SIGINT])
    assert code == 130, (name, out[-2000:], err[-3000:])
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, (name, err[-3000:])
    last = out.strip().splitlines()[-1]
    assert last.startswith("simmim-pretrain: Stopped by Ctrl-C after step ") and "checkpoint saved" in last
    saved = checkpoint.complete_steps(str(workdir / "checkpoints"))
    assert len(saved) == 1 and 3 <= saved[0] < 30 and f"after step {saved[0]}:" in last
    code, out, err = interrupt_after(pretrain_process(workdir, *steps), "never", [])
    assert code == 0, err[-3000:]
    assert f"from step {saved[0]}" in out
    assert losses(workdir) == losses(straight)  # every step, bit for bit


@pytest.mark.slow  # end to end through subprocesses; .ci/run runs it
def test_a_second_ctrl_c_stops_at_once_even_with_a_thread_that_is_not_a_daemon(tmp_path):
  """The first Ctrl-C waits for a save that takes long (held here); the second ends the process at once."""
  slow_save_and_lingering_thread = """
import threading, time
from orbax.checkpoint._src.path import atomicity
_finalize = atomicity.AtomicRenameTemporaryPath.finalize
async def finalize(self):
  time.sleep(3600)
  return await _finalize(self)
atomicity.AtomicRenameTemporaryPath.finalize = finalize
threading.Thread(target=time.sleep, args=(3600,), daemon=False).start()
"""
  process = pretrain_process(tmp_path / "run", "--config.total_steps=100000", "--config.log_every_steps=1",
                             prelude=slow_save_and_lingering_thread)
  for line in process.stdout:
    if line.startswith("step 3/"):
      process.send_signal(signal.SIGINT)
      break
  for line in process.stderr:
    if line.startswith("Ctrl-C: stopping at the next step boundary"):  # saving now, for ever
      process.send_signal(signal.SIGINT)
      break
  _, err = process.communicate(timeout=120)
  assert process.returncode == 130, err[-3000:]
  assert err.strip().splitlines()[-1] == ("Stopped at once by Ctrl-C again: nothing more was saved; rerun the "
                                          "same command to resume from the last checkpoint."), err[-3000:]
  assert "Traceback" not in err


def test_ctrl_c_outside_the_loop_is_one_line_and_130(capsys):
  def interrupted():
    raise KeyboardInterrupt

  assert cli.run_program("simmim-convert", interrupted) == 130
  (line,) = capsys.readouterr().err.strip().splitlines()
  assert line.startswith("simmim-convert: stopped by Ctrl-C")
