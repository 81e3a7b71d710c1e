"""End to end: the simmim-pretrain CLI writes its workdir, resumes exactly, and loads back for users."""

import configparser
import io
import json
import os
import re
import shutil
import sys

import jax
import numpy as np
import pytest
from absl import flags
from PIL import Image

from simmim_jax import cli, configs
from simmim_jax.storage import workdir as workdir_lib
from helpers import PRETRAIN, ROOT, TINY, read_metrics, run_pretrain, run_process


def test_short_cli_run_writes_every_file(tmp_path):
  workdir = tmp_path / "run"
  result = run_pretrain(workdir, "--config.total_steps=4", "--config.log_every_steps=2",
                   "--config.checkpoint_every_steps=2", "--config.reconstruction_every_steps=2")
  assert result.returncode == 0, result.stderr[-4000:]
  assert "step 4/4" in result.stdout and "img/s" in result.stdout and "ETA" in result.stdout
  rows = read_metrics(workdir)
  assert [r["step"] for r in rows] == [1, 2, 4]  # the first step, every log step, the last
  assert {"step", "loss", "lr", "img_per_sec", "grad_norm"} <= set(rows[-1])
  assert rows[-1]["img_per_sec"] > 0
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir / "tensorboard"))
  config = json.loads((workdir / "config.json").read_text())
  assert config["model"]["embed_dim"] == 32 and config["total_steps"] == 4
  for step in (2, 4):
    grid = np.asarray(Image.open(workdir / "reconstructions" / f"step_{step}.png"))
    assert grid.ndim == 3 and grid.shape[2] == 3 and grid.shape[1] > grid.shape[0] / 8 * 3.9 / 1.1
    assert grid.std() > 10  # real pictures, not a blank canvas
    from simmim_jax.storage import visualize  # pylint: disable=g-import-not-at-top
    header = grid[:visualize.HEADER_HEIGHT]  # the columns are labelled
    np.testing.assert_array_equal(header, visualize.column_header(grid.shape[1] // 4))


@pytest.mark.slow  # 40 s; the default suite proves exact resume in-process (test_run.py, every recipe)
def test_interrupted_run_resumes_and_continues_exactly_like_an_uninterrupted_run(tmp_path):
  """A run that died after its step-3 checkpoint (simulated: the step-6 checkpoint and later metrics are
  removed) is resumed by rerunning the same command, and then matches the uninterrupted run bit for bit."""
  common = ["--config.total_steps=6", "--config.log_every_steps=1", "--config.checkpoint_every_steps=3",
            "--config.reconstruction_every_steps=0"]
  straight = tmp_path / "straight"
  assert run_pretrain(straight, *common).returncode == 0
  crashed = tmp_path / "crashed"
  shutil.copytree(straight, crashed)
  shutil.rmtree(crashed / "checkpoints" / "6")
  with open(crashed / "metrics.jsonl", "a") as f:
    f.write('{"step": 7, "loss": 0.1')  # a torn line, as a killed process may leave
  resumed = run_pretrain(crashed, *common)
  assert resumed.returncode == 0, resumed.stderr[-4000:]
  assert "from step 3" in resumed.stdout
  straight_rows, resumed_rows = read_metrics(straight), read_metrics(crashed)
  assert [r["step"] for r in resumed_rows] == [1, 2, 3, 4, 5, 6]  # no repeated steps, no torn line
  # Bit for bit: same params, masks from fold_in(key, step), data stream from the global sample index.
  assert [r["loss"] for r in resumed_rows] == [r["loss"] for r in straight_rows]
  _, variables_straight, _ = workdir_lib.load_model(str(straight))
  _, variables_resumed, _ = workdir_lib.load_model(str(crashed))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(variables_straight),
               jax.device_get(variables_resumed))
  # A finished run rerun as is does nothing.
  again = run_pretrain(crashed, *common)
  assert again.returncode == 0 and "Nothing to do" in again.stdout


@pytest.mark.slow  # end to end through subprocesses; .ci/run runs it
def test_rerun_with_more_steps_extends_the_run(tmp_path):
  workdir = tmp_path / "run"
  common = ["--config.log_every_steps=1", "--config.reconstruction_every_steps=0"]
  assert run_pretrain(workdir, "--config.total_steps=2", *common).returncode == 0
  longer = run_pretrain(workdir, "--config.total_steps=4", *common)
  assert longer.returncode == 0, longer.stderr[-4000:]
  assert "from step 2" in longer.stdout and "step 4/4" in longer.stdout
  assert [r["step"] for r in read_metrics(workdir)] == [1, 2, 3, 4]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]


@pytest.mark.slow  # end to end, minutes of the default suite; CI runs it (pytest -m slow)
def test_load_model_gives_a_usable_model(tmp_path):
  workdir = tmp_path / "run"
  assert run_pretrain(workdir, "--config.total_steps=2", "--config.reconstruction_every_steps=0").returncode == 0
  model, variables, config = workdir_lib.load_model(str(workdir))
  assert config.model.embed_dim == 32 and config.img_size == 32
  images = np.zeros((2, 32, 32, 3), np.float32)
  mask = np.ones((2, 8, 8), np.int32)
  out = model.apply(variables, images, mask)
  assert out["reconstruction"].shape == (2, 32, 32, 3) and np.isfinite(out["loss"])


def test_config_error_exits_with_status_2_and_a_message(tmp_path):
  result = run_pretrain(tmp_path / "bad", "--config.mask_ratio=1.5")
  assert result.returncode == 2
  assert "mask_ratio=1.5" in result.stderr and "Traceback" not in result.stderr


def test_a_mistyped_key_is_one_clean_line_naming_it_and_the_closest_key(tmp_path):
  result = run_pretrain(tmp_path / "typo", "--config.optimizer.base_l=0.1")
  assert result.returncode == 2
  errors = [line for line in result.stderr.splitlines() if "configuration error" in line]
  assert errors == ["simmim-pretrain: configuration error: unknown config key --config.optimizer.base_l (did you "
                    "mean --config.optimizer.base_lr?): every --config.KEY must be a field of the config file"]
  assert "Traceback" not in result.stderr and not (tmp_path / "typo").exists()


def test_missing_workdir_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    workdir_lib.load_model(str(tmp_path / "nothing_here"))


@pytest.mark.slow  # end to end through a subprocess; .ci/run runs it
def test_swin_demo_config_trains_and_its_loss_falls(tmp_path):
  workdir = tmp_path / "swin"
  result = run_process([*PRETRAIN, "--config=demo_swin", f"--workdir={workdir}", "--config.total_steps=40",
                        "--config.log_every_steps=10", "--config.reconstruction_every_steps=0"])
  assert result.returncode == 0, result.stderr[-4000:]
  rows = read_metrics(workdir)
  assert [r["step"] for r in rows] == [1, 10, 20, 30, 40]
  assert rows[-1]["loss"] < 0.9 * rows[0]["loss"], rows


# ----------------------------------------------------------------------------------------------------
# Every program: one command-line layer (simmim_jax/cli.py), one exit policy, --help with a real example

# How each program is started: the console scripts call their cli function (as the installed script does),
# `python -m` runs the modules that have a __main__.
PROGRAMS = {
    "simmim-pretrain": ["-m", "simmim_jax.main"],
    "simmim-finetune": ["-c", "import sys; from simmim_jax import cli; sys.exit(cli.finetune_main())"],
    "simmim-linear-probe": ["-c", "import sys; from simmim_jax import cli; sys.exit(cli.linear_probe_main())"],
    "simmim-convert": ["-m", "simmim_jax.cli", "convert"],
    "simmim-reconstruct": ["-m", "simmim_jax.cli", "reconstruct"],
    "simmim-aot": ["-m", "simmim_jax.cli", "aot"],
    "simmim-prepare": ["-m", "simmim_jax.cli", "prepare"],
}


def run_program(program, *args):
  return run_process([sys.executable, *PROGRAMS[program], *args], timeout=300)


BAD_INPUT = {  # program: (arguments, what the one line names)
    "simmim-pretrain": (["--config=nope", "--workdir=W"], "--config=nope"),
    "simmim-finetune": (["--config=finetune/demo", "--workdri=W"], "'workdri'"),
    "simmim-linear-probe": (["--config=linear_probe/demo", "--workdir=W", "--config.total_steps=ten"],
                            "--config.total_steps=ten"),
    "simmim-convert": (["--checkpoint=missing.pth", "--encoder=vit_test_tiny", "--out=W/p.npz"], "missing.pth"),
    "simmim-reconstruct": (["--checkpoint=missing.pth", "--image=photo.jpg", "--out=W/g.png"], "missing.pth"),
    "simmim-aot": (["--config=demo", "--config.mask_ratio=1.5"], "mask_ratio=1.5"),
    "simmim-prepare": (["--images=missing", "--out=W"], "--images='missing'"),
}


@pytest.mark.parametrize("program", list(PROGRAMS))
def test_every_program_refuses_bad_input_with_status_2_and_one_line(program):
  args, named = BAD_INPUT[program]
  result = run_program(program, *args)
  assert result.returncode == 2, result.stderr[-3000:]
  assert result.stderr.splitlines() == [result.stderr.strip()], result.stderr[-3000:]  # one line, no traceback
  assert result.stderr.startswith(f"{program}: ") and named in result.stderr, result.stderr
  assert not (ROOT / "W").exists()


EXAMPLES = {  # program: the start of an example --help shows
    "simmim-pretrain": "simmim-pretrain --config=demo --workdir=workdir/demo",
    "simmim-finetune": "simmim-finetune --config=finetune/demo --workdir=",
    "simmim-linear-probe": "simmim-linear-probe --config=linear_probe/demo --workdir=",
    "simmim-convert": "simmim-convert --checkpoint=",
    "simmim-reconstruct": "simmim-reconstruct --checkpoint=",
    "simmim-aot": "XLA_FLAGS=--xla_force_host_platform_device_count=8 simmim-aot",
    "simmim-prepare": "simmim-prepare --images=",
}


@pytest.mark.parametrize("program", list(PROGRAMS))
def test_help_of_every_program_exits_0_with_a_real_example(program):
  result = run_program(program, "--help")
  assert result.returncode == 0 and not result.stderr, result.stderr[-3000:]
  assert EXAMPLES[program] in result.stdout and "\nflags:\n  --" in result.stdout, result.stdout
  named = re.findall(r"--config=(\S+)", result.stdout)
  assert all(name in configs.names() for name in named), named  # the examples' configs exist


def test_programs_define_their_flags_when_they_start_and_never_share_them(capsys):
  """Importing cli defines no flag, and programs run one after another in one process without a clash."""
  assert "checkpoint" not in flags.FLAGS and "workdir" not in flags.FLAGS
  for main in (cli.convert_main, cli.reconstruct_main, cli.convert_main, cli.aot_main):
    assert main(["--help"]) == 0
  assert "checkpoint" not in flags.FLAGS and "workdir" not in flags.FLAGS
  out = capsys.readouterr().out
  assert "--export" in out and "--mask_ratio" in out and "--xla_force_host_platform_device_count" in out


def test_every_console_script_is_a_cli_function():
  parser = configparser.ConfigParser()
  parser.read(ROOT / "setup.cfg")
  scripts = dict(line.split(" = ") for line in parser["options.entry_points"]["console_scripts"].split("\n") if line)
  assert sorted(scripts) == sorted(p for p in PROGRAMS if p.startswith("simmim-"))
  for target in scripts.values():
    module, function = target.split(":")
    assert module == "simmim_jax.cli" and callable(getattr(cli, function)), target


# ----------------------------------------------------------------------------------------------------
# A user's first hour: packaged configs by name, every encoder field, --print_config, quiet logs, run.log


def console_script(name, *args, cwd, env_extra=None, timeout=300):
  """Runs an installed console script (next to the interpreter) as a user would: with their log levels."""
  return run_process([os.path.join(os.path.dirname(sys.executable), name), *args], cwd=cwd, timeout=timeout,
                     env=env_extra, unset=("TF_CPP_MIN_LOG_LEVEL", "SIMMIM_VERBOSITY"))


def parsed_config(*args):
  """The config simmim-pretrain would run with `args` (parsed in-process, nothing run)."""
  values = flags.FlagValues()
  argv, problem = cli._config_flag(values, ["simmim-pretrain", *args], "test", True)  # pylint: disable=protected-access
  assert problem is None, problem
  values(argv)
  return values.config


@pytest.mark.parametrize("name", configs.names())
def test_every_packaged_config_accepts_every_field_of_its_encoder(name):
  """--config.model.FIELD works for any field of the config's encoder, not only those the file sets."""
  from simmim_jax import models  # pylint: disable=g-import-not-at-top

  file_config = configs.load(name)
  fields = models.configurable_fields(file_config.model.name)
  unset = sorted(set(fields) - set(file_config.model))
  assert "remat" in unset or "remat" in file_config.model
  changed = {"remat": "True", "mlp_ratio": "2.0", "attention_impl": "dot_product_attention"}
  changed.update({"window_size": "3"} if "window_size" in fields else {"layer_norm_eps": "1e-05"})
  config = parsed_config(f"--config={name}", *(f"--config.model.{k}={v}" for k, v in changed.items()))
  encoder = models.encoder_from_config(config.model, config.img_size)
  assert encoder.remat is True and encoder.mlp_ratio == 2.0 and encoder.attention_impl == "dot_product_attention"
  assert encoder.window_size == 3 if "window_size" in fields else encoder.layer_norm_eps == 1e-5
  untouched = {k: getattr(encoder, k) for k in fields if k not in changed and k in file_config.model}
  assert untouched == {k: models.field_overrides(file_config.model).get(k, fields[k]) for k in untouched}


def test_a_config_is_found_by_name_by_old_path_and_by_its_own_path(tmp_path):
  own = tmp_path / "mine.py"
  own.write_text("from simmim_jax import configs\n\ndef get_config():\n  c = configs.load('demo')\n"
                 "  c.total_steps = 7\n  return c\n")
  assert parsed_config("--config=demo").img_size == 32
  assert parsed_config("--config=configs/pretrain/vit_base_800ep.py").num_epochs == 800
  assert parsed_config("--config=pretrain/swin_base_100ep").model.name == "swin_base_patch4_window6"
  assert parsed_config(f"--config={own}", "--config.warmup_steps=3").total_steps == 7
  with pytest.raises(FileNotFoundError, match="did you mean pretrain/vit_base_800ep"):
    configs.resolve("pretrain/vit_base_80ep")


def test_a_family_variant_is_a_config_and_a_family_alone_is_refused_with_its_recipes():
  """big_vision's `--config=FILE:ARG`: a variant no recipe file names, overrides and all."""
  config = parsed_config("--config=pretrain:swin_large,100ep", "--config.mesh.fsdp=4")
  assert (config.model.name, config.num_epochs, config.mesh.fsdp) == ("swin_large_patch4_window12", 100, 4)
  assert parsed_config("--config=demo:swin").to_dict() == configs.load("demo_swin").to_dict()
  for spec, expected in [("pretrain", "name one of its recipes (pretrain/swin_base_100ep, "),
                         ("pretrain:vit_huge,800ep", "ENCODER one of vit_base, swin_base")]:
    _, problem = cli._config_flag(flags.FlagValues(), ["simmim-pretrain", f"--config={spec}"], "test", True)  # pylint: disable=protected-access
    assert problem.startswith(f"configuration error: cannot load --config={spec}: ") and expected in problem, problem


def test_an_encoder_field_the_encoder_lacks_is_refused_with_the_valid_ones(tmp_path):
  result = console_script("simmim-pretrain", "--config=demo", f"--workdir={tmp_path / 'w'}",
                          "--config.model.window_size=7", cwd=tmp_path)
  assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-3000:]
  assert ("--config.model.window_size: window_size is not a field of that encoder (vit_base_patch16); its fields: "
          in result.stderr and "mlp_ratio" in result.stderr and "remat" in result.stderr)
  assert os.listdir(tmp_path) == []


def test_print_config_shows_the_run_as_it_will_be_and_writes_nothing(tmp_path):
  from simmim_jax import models  # pylint: disable=g-import-not-at-top
  from simmim_jax.train import pretrain, run

  args = ["--config=pretrain/vit_base_800ep", "--config.data.source=demo", "--config.model.remat=True",
          "--config.model.mlp_ratio=2", "--print_config"]
  result = console_script("simmim-pretrain", *args, cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert os.listdir(tmp_path) == []  # nothing written (no workdir given, none made)
  printed, _, facts = result.stdout.partition("\n---\n")
  config = json.loads(printed)
  assert config["model"]["remat"] is True and config["model"]["mlp_ratio"] == 2.0 and config["num_epochs"] == 800
  expected = parsed_config(*args[:-1])
  model = pretrain.build_model(expected)
  params = jax.eval_shape(lambda k: model.init(k, *models.init_inputs(model.encoder)), jax.random.key(0))["params"]
  assert f"model: vit_base_patch16 at 224 px: {run.count_parameters(params):,} parameters" in facts
  assert "mlp_ratio=2.0" in facts and "remat=True" in facts and "qkv_bias_layout=qv" in facts
  assert "steps: 500,000 updates (800 epochs of 625 updates; 6,250 warmup)" in facts
  assert "images per update: 2,048" in facts and "batch per device: 2048 images" in facts
  assert "mesh: data 1 x fsdp 1 = 1 cpu device(s)" in facts
  gflops = float(re.search(r"FLOPs per training image: ([\d.]+) GFLOPs", facts).group(1))
  from simmim_jax.models import flops  # pylint: disable=g-import-not-at-top
  assert gflops == pytest.approx(flops.train_flops_per_image(model) / 1e9, rel=1e-3)


LIBRARY_LOG_LINE = re.compile(r"^[IWEF]\d{4} [\d:.]+\s+\d+ ([^:\]]+):\d+\] ", re.MULTILINE)  # absl's console format
OWN_FILES = {path.name for path in (ROOT / "simmim_jax").rglob("*.py")}


def library_log_lines(stderr):
  """Lines of `stderr` that absl logged from a file outside simmim_jax (tfds, Orbax, JAX, ...)."""
  return [m.group(0) for m in LIBRARY_LOG_LINE.finditer(stderr) if m.group(1) not in OWN_FILES]


def readme_print_config_command():
  """The README's --print_config line, verbatim, with its .venv/bin/ as this interpreter's folder."""
  lines = [line for line in (ROOT / "README.md").read_text().splitlines()
           if line.startswith(".venv/bin/simmim-") and "--print_config" in line]
  assert len(lines) == 1, lines
  program, *args = lines[0].split("#")[0].split()
  assert program == ".venv/bin/simmim-pretrain" and args == ["--config=pretrain/vit_base_800ep", "--print_config"]
  return os.path.basename(program), args


@pytest.mark.slow  # ~10 s: a subprocess that traces ViT-B; the in-process check below runs by default
def test_the_readme_print_config_line_describes_the_run_on_a_machine_without_imagenet(tmp_path):
  """The README's line, as a user without ImageNet runs it from an empty folder: the description (config,
  model, parameters, FLOPs, steps, mesh), then a `data:` line with the command that prepares the data; no
  library log line on the console; exit 2 (the run would be refused); nothing written."""
  program, args = readme_print_config_command()
  folder, no_tfds = tmp_path / "empty", tmp_path / "no_tensorflow_datasets"
  folder.mkdir()
  result = console_script(program, *args, cwd=folder, env_extra={"TFDS_DATA_DIR": str(no_tfds)})
  assert result.returncode == 2, result.stderr[-3000:]
  printed, _, facts = result.stdout.partition("\n---\n")
  assert json.loads(printed)["model"]["name"] == "vit_base_patch16"
  for fact in ("model: vit_base_patch16 at 224 px: 86,", "model FLOPs per training image:",
               "steps: 500,000 updates", "mesh: data 1 x fsdp 1"):
    assert fact in facts, facts
  last = facts.splitlines()[-2]  # the data line, then the memory line
  assert last.startswith("data: not ready, the run would be refused: tfds dataset 'imagenet2012' is not prepared")
  assert "`tfds build imagenet2012 --data_dir=DIR`" in last
  assert library_log_lines(result.stderr) == [], result.stderr
  assert "dataset_info.json" not in result.stderr
  assert os.listdir(folder) == [] and not no_tfds.exists()


@pytest.mark.parametrize("main, args", [
    (cli.pretrain_main, ["--config=demo", "--config.data.source=tfds"]),
    (cli.pretrain_main, ["--config=demo", "--config.data.source=folder"]),
    (cli.finetune_main, ["--config=finetune/demo", "--config.data.source=tfds"]),
    (cli.finetune_main, ["--config=finetune/demo", "--config.data.source=folder"]),
    (cli.linear_probe_main, ["--config=linear_probe/demo", "--config.data.source=tfds",
                             "--config.data.name=imagenet2012"]),
], ids=["pretrain-tfds", "pretrain-folder", "finetune-tfds", "finetune-folder", "linear-probe-tfds"])
def test_print_config_describes_a_run_whose_data_is_missing_and_exits_2(main, args, tmp_path, capfd, monkeypatch):
  """--print_config is a dry run before the data exists: the whole description, a last line saying how to
  prepare the data, no library log line on the console, exit 2 (the run would be refused), nothing written."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  console = io.StringIO()  # the console's log lines (absl's handler keeps the stderr it started with)
  monkeypatch.setattr(absl_logging.get_absl_handler().python_handler, "stream", console)
  data_dir = tmp_path / "data"
  status = main([*args, f"--config.data.data_dir={data_dir}", "--print_config"])
  out, err = capfd.readouterr()
  err += console.getvalue()
  assert status == 2, err[-3000:]
  printed, _, facts = out.partition("\n---\n")
  assert json.loads(printed)["data"]["data_dir"] == str(data_dir)
  assert "model: " in facts and "steps: " in facts and "mesh: " in facts
  last = facts.splitlines()[-2]  # the data line, then the memory line
  assert last.startswith("data: not ready, the run would be refused: "), last
  assert ("`tfds build " in last) if "source=tfds" in args[1] else (str(data_dir) in last and "folder" in last)
  assert library_log_lines(err) == [], err
  assert os.listdir(tmp_path) == []


def test_print_config_of_a_run_whose_data_is_ready_ends_with_data_ready_and_exits_0(capfd):
  assert cli.pretrain_main(["--config=demo", "--print_config"]) == 0
  assert capfd.readouterr().out.splitlines()[-2:] == ["data: ready",
                                                      "memory: fits this machine (by a lower-bound estimate)"]


def test_library_warnings_go_to_the_log_and_not_the_console_at_the_default_verbosity():
  """At verbosity 0 the console shows simmim_jax's records and the libraries' errors; a library's warning (tfds:
  "Variant folder ... has no dataset_info.json") is kept for run.log only; --verbosity=1 shows it."""
  import logging  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  from simmim_jax.storage import logs  # pylint: disable=g-import-not-at-top

  def record(path, level, name="absl"):
    return logging.LogRecord(name, level, path, 394, "Variant folder x has no dataset_info.json", None, None)

  library = "/site-packages/tensorflow_datasets/core/utils/file_utils.py"
  own = str(ROOT / "simmim_jax" / "train" / "validation.py")
  try:
    logs.configure(0)
    console = absl_logging.get_absl_handler()
    shown = lambda r: console.level <= r.levelno and all(f.filter(r) for f in console.filters)
    assert not shown(record(library, logging.WARNING)) and not shown(record(library, logging.INFO))
    assert shown(record(library, logging.ERROR))
    assert shown(record(own, logging.WARNING)) and shown(record("x.py", logging.WARNING, name="simmim_jax"))
    logs.configure(1)
    assert shown(record(library, logging.WARNING)) and shown(record(library, logging.INFO))
  finally:
    logs.configure(0)
  logger = logging.getLogger("tensorflow_datasets.test")  # and the log keeps what the console does not show
  logger.warning("a library warning")
  assert any(r.getMessage() == "a library warning" for r in logs._buffer.records)  # pylint: disable=protected-access


@pytest.mark.slow  # end to end, minutes of the default suite; CI runs it (pytest -m slow)
def test_a_run_is_quiet_and_its_workdir_keeps_the_full_log(tmp_path):
  args = ["--workdir=w", *TINY, "--config.total_steps=2", "--config.log_every_steps=1",
          "--config.reconstruction_every_steps=0"]
  result = console_script("simmim-pretrain", *args, cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stderr == "", result.stderr[-3000:]  # no Orbax / absl / TensorFlow notices
  lines = result.stdout.splitlines()
  assert lines[0].startswith("Pretraining vit_base_patch16") and lines[-1].startswith("Done: 2 steps")
  assert [line.split(" |")[0] for line in lines[1:-1]] == ["step 1/2", "step 2/2"]
  log = (tmp_path / "w" / "run.log").read_text()
  assert "command: " in log and "CheckpointManager" in log  # the libraries' INFO logs
  assert all(line in log for line in lines)  # and everything the console showed
  verbose = console_script("simmim-pretrain", *args, "--config.total_steps=3", "--verbosity=1", cwd=tmp_path)
  assert verbose.returncode == 0 and "CheckpointManager" in verbose.stderr
  if "oneDNN" in verbose.stderr:  # TensorFlow's C++ load notice (x86 builds): shown only at --verbosity=1
    assert "oneDNN" in log
  log = (tmp_path / "w" / "run.log").read_text()
  assert log.count("command: ") == 2 and "Done: 3 steps" in log  # appended by the resumed run
