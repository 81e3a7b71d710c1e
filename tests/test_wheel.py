"""The package as a user installs it: a wheel in a fresh venv, no source tree, run from another folder."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*command, cwd, timeout=1200):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH", "VIRTUAL_ENV")}
  result = subprocess.run(list(command), cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
  assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
  return result


@pytest.mark.slow  # builds a wheel and installs its dependencies (from pip's cache after the README's install)
def test_the_wheel_runs_the_demo_by_config_name_from_another_folder(tmp_path):
  from simmim_jax import configs  # pylint: disable=g-import-not-at-top  (the source tree's list, to compare)

  run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"), ROOT, cwd=tmp_path)
  (wheel,) = os.listdir(tmp_path / "dist")
  venv = tmp_path / "venv"
  run(sys.executable, "-m", "venv", str(venv), cwd=tmp_path)
  run(str(venv / "bin" / "pip"), "install", "-q", f"{tmp_path / 'dist' / wheel}[data]", cwd=tmp_path)
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  python = str(venv / "bin" / "python")
  where = run(python, "-c", "import simmim_jax, simmim_jax.configs as c; print(simmim_jax.__file__); "
              "print(','.join(c.names()))", cwd=elsewhere).stdout.splitlines()
  assert where[0].startswith(str(venv)) and not where[0].startswith(ROOT)  # the installed copy, not the source
  assert where[1].split(",") == configs.names()  # every config ships in the wheel
  result = run(str(venv / "bin" / "simmim-pretrain"), "--config=demo", "--workdir=demo", "--config.total_steps=3",
               "--config.global_batch_size=16", "--config.data.num_demo_images=64", "--config.log_every_steps=1",
               cwd=elsewhere)
  assert "step 3/3" in result.stdout and result.stderr == "", result.stderr[-3000:]
  assert sorted(os.listdir(elsewhere / "demo" / "checkpoints")) == ["3"]
