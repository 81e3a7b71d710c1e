"""Fine-tuning and linear probing end to end: pretrained loading, short runs of simmim-finetune /
simmim-linear-probe from a short simmim-pretrain run, refused workdirs and configs. (Layer decay: test_optim.py;
interpolation: test_pos_interpolation.py; Mixup / CutMix: test_mixup.py; top-k: test_evaluate.py; the data:
test_finetune_pipeline.py, test_randaugment.py; the run core's guarantees for all trainers: test_run.py.)"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from simmim_jax import checkpoint, finetune, finetune_config
from simmim_jax import workdir as workdir_lib
from snapshots import snapshot

ROOT = pathlib.Path(__file__).resolve().parents[1]








# ----------------------------------------------------------------------------------------------------
# Data


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


# ----------------------------------------------------------------------------------------------------
# Pretrained loading and end to end


def run_cli(program, config, workdir, *extra, timeout=600):
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
  env.pop("XLA_FLAGS", None)  # one CPU device
  code = f"import sys; from simmim_jax.main import {program}; sys.argv[0] = '{program}'; sys.exit({program}())"
  return subprocess.run([sys.executable, "-c", code, f"--config={config}", f"--workdir={workdir}", *extra],
                        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def pretrained_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("pretrain") / "run"
  result = run_cli("pretrain_main", "configs/demo.py", workdir, "--config.model.embed_dim=32",
                   "--config.model.depth=2", "--config.model.num_heads=2", "--config.global_batch_size=16",
                   "--config.data.num_demo_images=64", "--config.warmup_steps=1", "--config.total_steps=3",
                   "--config.reconstruction_every_steps=0")
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return write_folder(tmp_path_factory.mktemp("folder"))


def test_pretrained_weights_replace_the_encoder_and_leave_the_head_fresh(pretrained_workdir, folder):
  config = finetune_config.get_config()
  config.update(pretrained=str(pretrained_workdir), img_size=32)
  config.data.update(source="folder", data_dir=str(folder), eval_split="test")
  config.global_batch_size, config.total_steps = 8, 2
  config = finetune.resolve_config(config, str(folder.parent / "unused"))
  assert config.model.embed_dim == 32 and config.model.depth == 2 and config.num_classes == 3  # from the runs
  model = finetune.build_classifier(config)
  fresh = finetune.init_params(model, jax.random.key(0))
  pretrained = finetune.load_pretrained_encoder_params(config)
  loaded, report = finetune.with_pretrained_encoder(fresh, pretrained, model.encoder)
  np.testing.assert_array_equal(loaded["encoder"]["blocks_1"]["attn"]["qkv"]["kernel"],
                                pretrained["blocks_1"]["attn"]["qkv"]["kernel"])
  assert not np.allclose(loaded["encoder"]["blocks_1"]["attn"]["qkv"]["kernel"],
                         fresh["encoder"]["blocks_1"]["attn"]["qkv"]["kernel"])
  for block in ("blocks_0", "blocks_1"):  # the shared table is copied into every block
    np.testing.assert_array_equal(
        loaded["encoder"][block]["attn"]["relative_position_bias"]["relative_position_bias_table"],
        pretrained["rel_pos_bias"]["relative_position_bias_table"])
  jax.tree.map(np.testing.assert_array_equal, loaded["head"], jax.device_get(fresh["head"]))
  jax.tree.map(np.testing.assert_array_equal, loaded["encoder"]["fc_norm"], jax.device_get(fresh["encoder"]["fc_norm"]))
  assert "mask_token" in report["dropped"] and set(report["fresh"]) == {"fc_norm/bias", "fc_norm/scale"}


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


FINETUNE_TINY = ["--config.global_batch_size=8", "--config.warmup_steps=1", "--config.log_every_steps=1",
                 "--config.eval_every_steps=2", "--config.checkpoint_every_steps=2", "--config.data.eval_split=test"]


@pytest.mark.slow  # end to end through subprocesses; .ci/run runs it
def test_short_finetune_from_a_pretraining_run_evaluates_keeps_the_best_and_resumes(pretrained_workdir, folder,
                                                                                     tmp_path):
  workdir = tmp_path / "finetune"
  common = [f"--config.pretrained={pretrained_workdir}", f"--config.data.data_dir={folder}", *FINETUNE_TINY]
  result = run_cli("finetune_main", "configs/finetune/demo.py", workdir, "--config.total_steps=2", *common)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Loaded" in result.stdout and "eval step 2" in result.stdout
  config = json.loads((workdir / "config.json").read_text())
  assert config["model"]["embed_dim"] == 32 and config["num_classes"] == 3 and config["num_train_images"] == 18
  resumed = run_cli("finetune_main", "configs/finetune/demo.py", workdir, "--config.total_steps=4", *common)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "from step 2" in resumed.stdout and "Loaded" not in resumed.stdout  # resumed, not re-initialized
  rows = read_metrics(workdir)
  evals = [r for r in rows if "eval_top1" in r]
  assert [r["step"] for r in evals] == [2, 4]
  assert all(0 <= r["eval_top1"] <= r["eval_top5"] <= 100 for r in evals)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"] and len(os.listdir(workdir / "best")) == 1


def test_short_linear_probe_of_every_block_from_a_pretraining_run(pretrained_workdir, folder, tmp_path):
  workdir = tmp_path / "probe"
  result = run_cli("linear_probe_main", "configs/linear_probe/demo.py", workdir,
                   f"--config.pretrained={pretrained_workdir}", f"--config.data.data_dir={folder}",
                   "--config.probe_blocks=(1,2)", "--config.total_steps=3", *FINETUNE_TINY)
  assert result.returncode == 0, result.stderr[-3000:]
  last = [r for r in read_metrics(workdir) if "eval_top1" in r][-1]
  assert last["step"] == 3 and {"eval_top1_block1", "eval_top1_block2", "eval_top5"} <= set(last)
  assert last["eval_top1"] == last["eval_top1_block1"]


@pytest.mark.parametrize("program", ["finetune", "linear_probe"])
def test_a_workdir_of_another_model_is_refused_with_its_checkpointer_closed(program, folder, tmp_path, monkeypatch):
  from simmim_jax import linear_probe
  module = {"finetune": finetune, "linear_probe": linear_probe}[program]
  config = finetune_config.get_config() if program == "finetune" else finetune_config.get_linear_probe_config()
  config.model.update(name="vit_base_patch16", patch_size=4, embed_dim=32, depth=2, num_heads=2)
  config.update(img_size=32, global_batch_size=8, total_steps=2, warmup_steps=1, probe_blocks=(1,))
  config.data.update(source="folder", data_dir=str(folder), eval_split="test")
  workdir = tmp_path / "work"
  other = checkpoint.Checkpointer(str(workdir / workdir_lib.CHECKPOINT_DIRNAME))
  other.save(2, {"w": jnp.zeros(())}, {"step": 2, "signature": {"model": "another"}})
  other.close()
  opened, closed = [], []
  original_init, original_close = checkpoint.Checkpointer.__init__, checkpoint.Checkpointer.close

  def recording_init(self, *args, **kwargs):
    opened.append(self)
    original_init(self, *args, **kwargs)

  def recording_close(self):
    closed.append(self)
    original_close(self)

  monkeypatch.setattr(checkpoint.Checkpointer, "__init__", recording_init)
  monkeypatch.setattr(checkpoint.Checkpointer, "close", recording_close)
  before = snapshot(workdir)
  with pytest.raises(finetune.ConfigError, match=r"checkpoints holds checkpoints of another model \(\{'model': "
                     r"'another'\}\), not of this config's .*; use another --workdir"):
    module.train_and_evaluate(config, str(workdir))
  assert all(c in closed for c in opened)  # nothing left open (no best/ checkpointer either)
  assert snapshot(workdir) == before  # refused before writing: no config.json, no lock, nothing moved


def test_finetune_config_errors_are_clear(folder, tmp_path):
  result = run_cli("finetune_main", "configs/finetune/demo.py", tmp_path / "bad",
                   f"--config.pretrained={tmp_path / 'nowhere'}", f"--config.data.data_dir={folder}")
  assert result.returncode == 2 and "not a simmim-pretrain workdir" in result.stderr
  assert "Traceback" not in result.stderr


def test_official_finetune_configs_build_their_encoders():
  import importlib.util
  for path in sorted((ROOT / "configs" / "finetune").glob("*.py")):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    fields = finetune.resolve_model_fields(config)
    encoder = finetune.build_encoder(fields, config.img_size, jnp.float32)
    assert encoder.img_size == config.img_size, path.name


def test_crop_padding_and_probe_optimizer_errors_name_the_key(folder, tmp_path):
  config = finetune_config.get_config()
  config.data.crop_padding = -1
  with pytest.raises(finetune.ConfigError, match=r"config.data.crop_padding=-1"):
    finetune.resolve_config(config, str(tmp_path / "unused"))
  result = run_cli("linear_probe_main", "configs/linear_probe/demo.py", tmp_path / "bad_probe",
                   "--config.optimizer.name=adam", f"--config.data.data_dir={folder}")
  assert result.returncode == 2 and "config.optimizer.name='adam'" in result.stderr, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
