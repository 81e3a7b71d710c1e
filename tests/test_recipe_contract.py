"""The recipe contract (`run.Recipe`, `run.train`, `cli.recipe_main`): a recipe defined here, in about 50 lines,
gets preemption (exit 143), an exact resume, the non-finite skip, `--print_config`, metrics and `best/` from the
core, with no code beyond this module. It also runs the core's hook schedule.

The recipe: supervised regression from scratch, a linear map fitted to synthetic data by SGD. This file is also
its config file (`get_config`), so `--config=tests/test_recipe_contract.py` runs it through the CLI.
"""

import itertools
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from simmim_jax import cli
from simmim_jax.configs import default_config
from simmim_jax.train import run, sharding

TRUE_MAP = np.arange(32, dtype=np.float32).reshape(8, 4) / 32


class Regression(run.Recipe):
  """simmim-regression-test: fits a linear map to synthetic data (the recipe of tests/test_recipe_contract.py)."""
  name = "regression_test"
  best_metric = "eval_score"

  def build(self, config, mesh):
    model, tx = nn.Dense(4), optax.sgd(config.optimizer.base_lr)
    fresh = lambda key: run.TrainState.create(tx, model.init(key, jnp.zeros((1, 8)))["params"])
    abstract_state = jax.eval_shape(fresh, jax.random.key(0))
    replicated, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    state_shardings = jax.tree.map(lambda _: replicated, abstract_state)

    def step(state, x, y):
      loss, grads = jax.value_and_grad(lambda p: jnp.mean((model.apply({"params": p}, x) - y) ** 2))(state.params)
      params, opt_state, streak, grad_norm, _ = run.guarded_update(tx, state.params, state.opt_state, grads, loss,
                                                                   state.nonfinite_streak)
      return (run.TrainState(step=state.step + 1, params=params, opt_state=opt_state, nonfinite_streak=streak),
              {"loss": loss, "grad_norm": grad_norm, "lr": jnp.float32(config.optimizer.base_lr),
               "nonfinite_streak": streak})

    rows = config.global_batch_size
    args = (jax.ShapeDtypeStruct((rows, 8), jnp.float32, sharding=data),
            jax.ShapeDtypeStruct((rows, 4), jnp.float32, sharding=data))
    train_step = run.jit_step(step, state_shardings, (data, data), replicated)
    setup = run.StepSetup(train_step, abstract_state, state_shardings, args, data, replicated)
    init = lambda key, workdir: jax.jit(fresh, out_shardings=state_shardings)(key)
    return run.Built(setup, init, lambda state, batch, key: train_step(state, batch["x"], batch["y"]), rows)

  def batches(self, config, start_step, images_per_step):
    for step in itertools.count(start_step + 1):  # a function of the step: an exact resume
      if step == config.sigterm_at_step:
        os.kill(os.getpid(), signal.SIGTERM)  # a preemption notice during this step
      x = np.random.default_rng([config.seed, step]).standard_normal((images_per_step, 8)).astype(np.float32)
      x[0, 0] = np.nan if step in config.nan_steps else x[0, 0]
      yield {"x": x, "y": x @ TRUE_MAP}

  def hooks(self, config, built, key):
    def score(step, state, batch):  # the distance to the true map, as a score (higher is better)
      error = float(jnp.abs(state.params["kernel"] - TRUE_MAP).mean())
      return run.HookOutput(scalars={"eval_score": -error})
    return [run.Hook(config.eval_every_steps, score)]


def get_config():
  config = default_config.get_config()
  config.update(total_steps=6, warmup_steps=0, global_batch_size=16, log_every_steps=1, checkpoint_every_steps=4,
                max_nonfinite_steps=3)
  config.optimizer.base_lr = 0.3
  config.eval_every_steps = 2
  config.nan_steps = ()  # steps whose batch holds a NaN
  config.sigterm_at_step = 0  # the step during which the process gets SIGTERM (0: none)
  return config


def rows(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def main_with(workdir, *flags):
  return cli.recipe_main(Regression(), [f"--config={__file__}", f"--workdir={workdir}", *flags])


def final_kernel(workdir):
  from simmim_jax.storage import checkpoint  # pylint: disable=g-import-not-at-top
  directory = os.path.join(workdir, "checkpoints")
  target = {"params": {"kernel": jax.ShapeDtypeStruct((8, 4), jnp.float32),
                       "bias": jax.ShapeDtypeStruct((4,), jnp.float32)}}
  state, _ = checkpoint.read_state(directory, max(checkpoint.complete_steps(directory)), target, partial=True)
  return np.asarray(state["params"]["kernel"])


def test_a_recipe_of_this_module_is_preempted_and_resumes_exactly(tmp_path):
  straight, preempted = str(tmp_path / "straight"), str(tmp_path / "preempted")
  assert main_with(straight) == 0
  assert main_with(preempted, "--config.sigterm_at_step=3") == run.PREEMPTED_EXIT_CODE
  assert 3 in [r["step"] for r in rows(preempted)] and len([r for r in rows(preempted) if "loss" in r]) == 3
  assert main_with(preempted) == 0  # the same command resumes
  losses = lambda workdir: [(r["step"], r["loss"]) for r in rows(workdir) if "loss" in r]
  assert losses(preempted) == losses(straight) and [s for s, _ in losses(straight)] == [1, 2, 3, 4, 5, 6]
  np.testing.assert_array_equal(final_kernel(preempted), final_kernel(straight))  # bit for bit
  assert losses(straight)[-1][1] < losses(straight)[0][1] / 4  # it learns
  with open(os.path.join(straight, "config.json")) as f:
    assert json.load(f)["recipe"] == "regression_test"  # config.json records the recipe that wrote it


def test_a_recipe_of_this_module_skips_a_non_finite_step_and_keeps_its_best(tmp_path):
  workdir = str(tmp_path / "run")
  assert main_with(workdir, "--config.nan_steps=(2,)") == 0
  steps = {r["step"]: r for r in rows(workdir) if "loss" in r}
  assert steps[2]["loss"] is None and steps[2]["skipped_steps"] == 1 and np.isfinite(steps[6]["loss"])
  scores = [(r["step"], r["eval_score"], r["best_score"]) for r in rows(workdir) if "eval_score" in r]
  assert [s for s, _, _ in scores] == [2, 4, 6]  # every eval_every_steps and at the end
  assert all(best == max(v for _, v, _ in scores[:i + 1]) for i, (_, _, best) in enumerate(scores))
  assert sorted(os.listdir(os.path.join(workdir, "best"))) == [str(max(scores, key=lambda s: s[1])[0])]
  again = main_with(workdir)  # a finished run: nothing to do but its hooks, once more, at its last step
  assert again == 0 and rows(workdir)[-1]["step"] == 6 and "eval_score" in rows(workdir)[-1]


def test_a_recipe_of_this_module_prints_its_config(capfd):
  assert cli.recipe_main(Regression(), [f"--config={__file__}", "--print_config"]) == 0
  out = capfd.readouterr().out
  assert '"sigterm_at_step": 0' in out and "steps: 6 updates" in out and "parameters" in out


@pytest.mark.parametrize("every, total, due", [
    (2, 5, [2, 4, 5]), (0, 5, [5]), (3, 3, [3]), (1, 3, [1, 2, 3]), (7, 5, [5])])
def test_a_hook_is_due_every_n_steps_and_at_the_last(every, total, due):
  hook = run.Hook(every, lambda step, state, batch: None)
  assert [step for step in range(1, total + 1) if hook.due(step, total)] == due


def test_hooks_write_what_they_produce_and_best_follows_the_metric(tmp_path):
  images = np.zeros((4, 6, 3), np.uint8)
  hooks = [run.Hook(1, lambda step, state, batch: run.HookOutput(scalars={"eval_score": float(state)},
                                                                   images={"grids": images})),
           run.Hook(1, lambda step, state, batch: None)]
  written = []

  class Writer:
    def write(self, step, scalars):
      written.append((step, dict(scalars)))

    def write_image(self, step, name, image):
      written.append((step, name, image.shape))

  best = run.Best("eval_score", str(tmp_path), {"best_score": 0.5, "best_score_step": 1})
  loop = run.Loop(config=None, workdir=str(tmp_path), checkpointer=None, start_step=0, total_steps=3,
                  advance=None, batches=iter(()), data_sharding=None, images_per_step=1, flops_per_image=None,
                  meta=dict, best=best)
  assert not run.run_hooks(hooks, 2, 0.25, None, Writer(), loop)  # below the resumed best 0.5
  assert run.run_hooks(hooks, 3, 0.75, None, Writer(), loop)
  assert written == [(2, {"eval_score": 0.25, "best_score": 0.5}), (2, "grids", (4, 6, 3)),
                     (3, {"eval_score": 0.75, "best_score": 0.75}), (3, "grids", (4, 6, 3))]
  assert best.meta() == {"best_score": 0.75, "best_score_step": 3} and loop.outputs["best_score"] == 0.75
  best.checkpointer.close()


if __name__ == "__main__":
  raise SystemExit(cli.recipe_main(Regression()))
