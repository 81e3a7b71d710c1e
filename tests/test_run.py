"""The run core (run.py) gives every trainer the same guarantees: non-finite steps skipped, SIGTERM -> save ->
Preempted -> an exact resume, gradient accumulation equal to the full batch."""

import json
import random
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simmim_jax import finetune, finetune_config, linear_probe, optim, pretrain, run, sharding
from test_finetune import write_folder
from test_robustness import ROOT, env_one_device, inject_nan_batches, one_device, tiny_config


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


@pytest.mark.parametrize("program", ["finetune", "linear_probe"])
def test_a_nan_batch_is_skipped_and_repeated_nans_stop_the_run(program, folder, tmp_path, monkeypatch):
  one_device(monkeypatch)
  inject_nan_batches(monkeypatch, {2})
  train(program, downstream_config(program, folder, 4), tmp_path / "one")
  rows = [r for r in map(json.loads, open(tmp_path / "one" / "metrics.jsonl")) if "loss" in r]
  assert not np.isfinite(rows[1]["loss"]) and rows[1]["skipped_steps"] == 1 and rows[3]["skipped_steps"] == 1
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


def test_finetune_accumulation_of_two_batches_of_b_equals_one_batch_of_2b():
  images = jax.random.normal(jax.random.key(0), (16, 32, 32, 3))
  labels = jnp.arange(16) % 3
  mesh = sharding.create_mesh(tiny_classifier_config(1, 16).mesh, jax.devices()[:1])
  results = []
  for accumulation, batch in ((1, 16), (2, 8)):
    config = tiny_classifier_config(accumulation, batch)
    with config.unlocked():
      config.model = finetune.resolve_model_fields(config)
    setup = finetune.build_step(config, mesh)
    model = finetune.build_classifier(config)
    tx, _ = optim.create_finetune_optimizer(config, model.encoder)
    state = finetune.init_train_state(tx, finetune.init_params(model, jax.random.key(1)))
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
  entry = f"import sys; from simmim_jax.main import {program}_main; sys.exit({program}_main())"
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
