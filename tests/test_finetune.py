"""Fine-tuning and linear probing end to end: pretrained loading, short runs of simmim-finetune /
simmim-linear-probe from a short simmim-pretrain run, refused workdirs and configs. (Layer decay: test_optim.py;
interpolation: test_pos_interpolation.py; Mixup / CutMix: test_mixup.py; top-k: test_evaluate.py; the data:
test_finetune_pipeline.py, test_randaugment.py; the run core's guarantees for all trainers: test_run.py.)"""

import json
import os
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simmim_jax.storage import checkpoint
from simmim_jax import configs
from simmim_jax.train import downstream, finetune, validation
from simmim_jax.configs import finetune_config
from simmim_jax.storage import workdir as workdir_lib
from helpers import ROOT, read_metrics, run_pretrain, run_process, snapshot, write_folder


# ----------------------------------------------------------------------------------------------------
# Pretrained loading and end to end


def run_cli(program, config, workdir, *extra, timeout=600):
  """simmim_jax.cli's `program` (finetune_main, linear_probe_main) in a fresh process, as its console script."""
  code = f"import sys; from simmim_jax import cli; sys.argv[0] = '{program}'; sys.exit(cli.{program}())"
  return run_process([sys.executable, "-c", code, f"--config={config}", f"--workdir={workdir}", *extra],
                     timeout=timeout)


@pytest.fixture(scope="module")
def pretrained_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("pretrain") / "run"
  result = run_pretrain(workdir, "--config.total_steps=3")
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
  config = downstream.resolve_config(config)
  assert config.model.embed_dim == 32 and config.model.depth == 2 and config.num_classes == 3  # from the runs
  model = downstream.build_classifier(config)
  fresh = finetune.init_params(model, jax.random.key(0))
  pretrained = downstream.load_pretrained_encoder_params(config)
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


FINETUNE_TINY = ["--config.global_batch_size=8", "--config.warmup_steps=1", "--config.log_every_steps=1",
                 "--config.eval_every_steps=2", "--config.checkpoint_every_steps=2", "--config.data.eval_split=test"]


@pytest.mark.slow  # end to end through subprocesses; .ci/run runs it
def test_short_finetune_from_a_pretraining_run_evaluates_keeps_the_best_and_resumes(pretrained_workdir, folder,
                                                                                     tmp_path):
  workdir = tmp_path / "finetune"
  common = [f"--config.pretrained={pretrained_workdir}", "--config.data.source=folder",
            f"--config.data.data_dir={folder}", *FINETUNE_TINY]
  result = run_cli("finetune_main", "finetune/demo", workdir, "--config.total_steps=2", *common)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Loaded" in result.stdout and "eval step 2" in result.stdout
  config = json.loads((workdir / "config.json").read_text())
  assert config["model"]["embed_dim"] == 32 and config["num_classes"] == 3 and config["num_train_images"] == 18
  resumed = run_cli("finetune_main", "finetune/demo", workdir, "--config.total_steps=4", *common)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "from step 2" in resumed.stdout and "Loaded" not in resumed.stdout  # resumed, not re-initialized
  rows = read_metrics(workdir)
  evals = [r for r in rows if "eval_top1" in r]
  assert [r["step"] for r in evals] == [2, 4]
  assert all(0 <= r["eval_top1"] <= r["eval_top5"] <= 100 for r in evals)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"] and len(os.listdir(workdir / "best")) == 1


@pytest.mark.slow  # end to end through the CLI; the probe's print_config and the core's contract run by default
def test_short_linear_probe_of_every_block_from_a_pretraining_run(pretrained_workdir, tmp_path):
  workdir = tmp_path / "probe"  # the demo config as is: data.source="digits", no data step
  result = run_cli("linear_probe_main", "linear_probe/demo", workdir,
                   f"--config.pretrained={pretrained_workdir}", "--config.probe_blocks=(1,2)",
                   "--config.total_steps=3", *FINETUNE_TINY)
  assert result.returncode == 0, result.stderr[-3000:]
  config = json.loads((workdir / "config.json").read_text())
  assert config["num_classes"] == 10 and config["num_train_images"] == 1438  # the digits' train split
  last = [r for r in read_metrics(workdir) if "eval_top1" in r][-1]
  assert last["step"] == 3 and {"eval_top1_block1", "eval_top1_block2", "eval_top5"} <= set(last)
  assert last["eval_top1"] == last["eval_top1_block1"]


@pytest.mark.slow  # end to end, minutes of the default suite; CI runs it (pytest -m slow)
def test_the_finetune_demo_runs_as_is_from_the_console_script_with_no_data_step(pretrained_workdir, tmp_path):
  # README: after the demo pretraining, `simmim-finetune --config=finetune/demo ...` runs as is:
  # data.source="digits" renders scikit-learn's digits in memory; no digits folder in the cwd, none written.
  script = pathlib.Path(sys.executable).parent / "simmim-finetune"
  assert script.exists(), f"{script}: install the package (pip install -e '.[data,test]')"
  result = run_process([script, "--config=finetune/demo", "--workdir=workdir/demo_ft",
                        f"--config.pretrained={pretrained_workdir}", "--config.total_steps=2"], cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "on 1438 images of 10 classes" in result.stdout and "eval step 2" in result.stdout, result.stdout
  assert os.listdir(tmp_path) == ["workdir"] and os.listdir(tmp_path / "workdir") == ["demo_ft"]
  config = json.loads((tmp_path / "workdir/demo_ft/config.json").read_text())
  assert config["data"]["source"] == "digits" and config["num_classes"] == 10 and config["num_train_images"] == 1438
  evals = [r for r in read_metrics(tmp_path / "workdir/demo_ft") if "eval_top1" in r]
  assert [r["step"] for r in evals] == [2] and 0 <= evals[0]["eval_top1"] <= evals[0]["eval_top5"] <= 100
  # Top-1 over the 359 test digits: a whole number of images.
  assert abs(evals[0]["eval_top1"] * 359 / 100 - round(evals[0]["eval_top1"] * 359 / 100)) < 1e-6


@pytest.mark.parametrize("program", ["finetune", "linear_probe"])
def test_a_workdir_of_another_model_is_refused_with_its_checkpointer_closed(program, folder, tmp_path, monkeypatch):
  from simmim_jax.train import linear_probe
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
  with pytest.raises(validation.ConfigError, match=r"checkpoints holds checkpoints of another model \(\{'model': "
                     r"'another'\}\), not of this config's .*; use another --workdir"):
    module.train_and_evaluate(config, str(workdir))
  assert all(c in closed for c in opened)  # nothing left open (no best/ checkpointer either)
  assert snapshot(workdir) == before  # refused before writing: no config.json, no lock, nothing moved


def test_finetune_config_errors_are_clear(tmp_path):
  result = run_cli("finetune_main", "finetune/demo", tmp_path / "bad",
                   f"--config.pretrained={tmp_path / 'nowhere'}")
  assert result.returncode == 2 and "not a simmim-pretrain workdir" in result.stderr
  assert "Traceback" not in result.stderr


def test_digits_source_errors_name_the_split_or_the_missing_package(tmp_path, monkeypatch):
  from simmim_jax.data import digits
  config = finetune_config.get_config()
  config.data.source = "digits"  # eval_split stays ImageNet's "validation"
  with pytest.raises(validation.ConfigError, match=r"config.data: data.eval_split='validation': source='digits' "
                     r"evaluates on 'test' \(the fixed test split\) or 'val'"):
    downstream.resolve_config(config)
  config.data.eval_split = "test"
  digits.load_digits.cache_clear()
  monkeypatch.setitem(sys.modules, "sklearn", None)  # scikit-learn not installed
  with pytest.raises(validation.ConfigError, match=r"config.data: the digits ship inside scikit-learn's wheel: "
                     r"pip install scikit-learn"):
    downstream.resolve_config(config)


def test_official_finetune_configs_build_their_encoders():
  import importlib.util
  paths = sorted((ROOT / "simmim_jax" / "configs" / "finetune").glob("[!_]*.py"))
  assert len(paths) >= 7, paths
  for path in paths:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    fields = downstream.resolve_model_fields(config)
    encoder = downstream.build_encoder(fields, config.img_size, jnp.float32)
    assert encoder.img_size == config.img_size, path.name


def test_crop_padding_and_probe_optimizer_errors_name_the_key(tmp_path):
  config = finetune_config.get_config()
  config.data.crop_padding = -1
  with pytest.raises(validation.ConfigError, match=r"config.data.crop_padding=-1"):
    downstream.resolve_config(config)
  result = run_cli("linear_probe_main", "linear_probe/demo", tmp_path / "bad_probe",
                   "--config.optimizer.name=adam")
  assert result.returncode == 2 and "config.optimizer.name='adam'" in result.stderr, result.stderr[-2000:]
  assert "Traceback" not in result.stderr


@pytest.mark.parametrize("program", ["simmim-finetune",  # the probe resolves through the same downstream code:
                                     pytest.param("simmim-linear-probe", marks=pytest.mark.slow)])
def test_print_config_resolves_the_pretrained_encoder_and_the_data_and_writes_nothing(program, pretrained_workdir,
                                                                                      tmp_path):
  """--print_config shows the run as it will be: the encoder of the pretrained run (not the config file's
  demo sizes), the classes and images of the data, the parameters; nothing is written."""
  name, *extra = {"simmim-finetune": ["finetune/demo"],
                  "simmim-linear-probe": ["linear_probe/demo", "--config.probe_blocks=(1,2)"]}[program]
  before = snapshot(pretrained_workdir)
  result = run_process([pathlib.Path(sys.executable).parent / program, f"--config={name}",
                        f"--config.pretrained={pretrained_workdir}", "--print_config", *extra], cwd=tmp_path,
                       timeout=300)
  assert result.returncode == 0 and result.stderr == "", result.stderr[-3000:]
  printed, _, facts = result.stdout.partition("\n---\n")
  config = json.loads(printed)
  pretrained = json.loads((pathlib.Path(pretrained_workdir) / "config.json").read_text())["model"]
  assert config["model"]["embed_dim"] == pretrained["embed_dim"] != configs.load(name).model.embed_dim
  assert config["num_classes"] == 10 and config["num_train_images"] == 1438
  assert re.search(r"model: vit_base_patch16 at 32 px: [\d,]+ parameters", facts), facts
  assert ("(frozen)" in facts) == (program == "simmim-linear-probe")
  assert facts.splitlines()[-2:] == ["data: ready",  # the digits are in memory: the run would start (exit 0)
                                     "memory: fits this machine (by a lower-bound estimate)"]
  assert os.listdir(tmp_path) == [] and snapshot(pretrained_workdir) == before
