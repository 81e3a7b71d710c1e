"""The memory estimate is a lower bound of what XLA really allocates (so a run that fits is never refused), and
the config checks refuse runs that cannot fit, or numbers that cannot work, in one line before writing."""

import json
import time

import jax
import pytest

from simmim_jax.tools import aot
from simmim_jax import cli, configs, models
from simmim_jax.train import memory_estimate, pretrain, sharding, validation


def estimate_per_device(config) -> int:
  encoder = pretrain.build_model(config).encoder
  parts = memory_estimate.device_bytes(
      encoder, batch_per_device=config.global_batch_size // jax.device_count(),
      compute_bytes=2 if config.dtype == "bfloat16" else 4,
      fsdp=sharding.mesh_shape(config.mesh, jax.device_count())[1])
  return sum(parts.values())


@pytest.mark.parametrize("name, changes", [
    ("demo", {}),                                            # ViT, einsum attention, no remat
    pytest.param("demo_swin", {"model.remat": True, "global_batch_size": 16},  # Swin windows, remat
                 marks=pytest.mark.slow),
    pytest.param("demo", {"mesh.fsdp": 8, "global_batch_size": 8, "dtype": "bfloat16"},  # FSDP, bf16
                 marks=pytest.mark.slow),
])
def test_the_estimate_is_a_lower_bound_of_what_xla_allocates_per_device(name, changes):
  config = configs.load(name)
  for key, value in changes.items():
    config.update_from_flattened_dict({key: value})
  estimate = estimate_per_device(config)
  memory = aot.memory_summary(aot.compile_step(pretrain.build_step(config, sharding.create_mesh(config.mesh))))
  measured = memory["argument_size_in_bytes"] + memory["temp_size_in_bytes"]
  assert 0.2 * measured < estimate <= measured, (estimate, memory)  # a lower bound, and not a vacuous one


def test_block_parameters_bound_the_real_parameter_count_from_below():
  for name, img_size in (("vit_base_patch16", 224), ("swin_base_patch4_window6", 192),
                         ("swinv2_base_patch4_window12", 192)):
    encoder = models.create_encoder(name, img_size=img_size)
    shapes = jax.eval_shape(lambda e=encoder: e.init(jax.random.key(0), models.init_inputs(e)[0]))
    real = sum(x.size for x in jax.tree.leaves(shapes))
    assert 0.9 * real < memory_estimate.block_parameters(encoder) <= real, name


def refuse(capfd, tmp_path, *args, program=cli.pretrain_main, config="demo"):
  """Runs a program in this process; returns its one stderr line after checking status 2 and that the
  existing workdir (a config.json of an earlier run) is left byte-identical."""
  workdir = tmp_path / "w"
  workdir.mkdir(exist_ok=True)
  (workdir / "config.json").write_text('{"earlier": "run"}')
  start = time.monotonic()
  status = program([f"--config={config}", f"--workdir={workdir}", *args])
  err = capfd.readouterr().err
  assert status == 2, err
  assert time.monotonic() - start < 60  # the checks themselves end in bounded time
  assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
  assert sorted(p.name for p in workdir.iterdir()) == ["config.json"]
  assert json.loads((workdir / "config.json").read_text()) == {"earlier": "run"}
  return err


@pytest.mark.parametrize("args, named", [
    # Item 8 of issue 24: overflowing integers and non-finite floats.
    (["--config.total_steps=3000000000"], "config.total_steps=3000000000"),
    (["--config.total_steps=1000000000000000000"], "config.total_steps=1000000000000000000"),
    (["--config.seed=100000000000000000000"], "config.seed="),
    (["--config.seed=-1"], "config.seed=-1"),
    (["--config.optimizer.base_lr=nan"], "config.optimizer.base_lr=nan"),
    (["--config.optimizer.base_lr=inf"], "config.optimizer.base_lr=inf"),
    (["--config.optimizer.weight_decay=nan"], "config.optimizer.weight_decay=nan"),
    (["--config.total_steps=0", "--config.num_epochs=10000000000.0"], "config.num_epochs=10000000000.0"),
    (["--config.total_steps=0", "--config.num_train_images=2000000000", "--config.num_epochs=2000.0"],
     "config.num_epochs=2000.0"),
    # Item 9: sizes that cannot fit, refused from the fields alone (no 16 GiB table, no minutes of tracing).
    (["--config.img_size=1024"], "config.img_size=1024"),
    (["--config.img_size=512"], "config.img_size=512"),
    (["--config.model.depth=10000000"], "10,000,000 blocks"),
    (["--config.data.num_demo_images=10000000"], "config.data.num_demo_images=10000000"),
    (["--config.data.demo_image_size=100000"], "demo_image_size=100000"),
    # Item 10: a whole block replaced, alone or before a field of it.
    (["--config.data={'source': 'demo'}"], "--config.data would replace the whole config.data block"),
    (["--config.data={'source': 'demo'}", "--config.data.strict=True"], "would replace the whole config.data"),
])
def test_a_value_that_cannot_work_is_refused_before_anything_is_written(capfd, tmp_path, args, named):
  assert named in refuse(capfd, tmp_path, *args)


def test_a_classifier_head_that_cannot_fit_is_refused_naming_num_classes(capfd, tmp_path):
  for program, config in ((cli.finetune_main, "finetune/demo"), (cli.linear_probe_main, "linear_probe/demo")):
    err = refuse(capfd, tmp_path, "--config.pretrained=", "--config.num_classes=1000000000", program=program,
                 config=config)
    assert "config.num_classes=1000000000" in err and "fsdp" in err


def test_a_run_near_the_limit_is_warned_about_and_one_that_fits_is_not(monkeypatch, caplog):
  config = configs.load("demo")
  config.global_batch_size = 8
  encoder = pretrain.build_model(config).encoder
  needed = estimate_per_device(config) * jax.local_device_count() + sum(memory_estimate.host_bytes(
      encoder, demo_images=config.data.num_demo_images, demo_image_size=config.data.demo_image_size).values())
  monkeypatch.setattr(memory_estimate, "host_memory_bytes", lambda: int(needed / 0.9))  # within 2x: warned
  validation.check_memory(config, encoder)
  assert "may not fit" in caplog.text
  caplog.clear()
  monkeypatch.setattr(memory_estimate, "host_memory_bytes", lambda: int(needed * 1.5))
  validation.check_memory(config, encoder)
  assert not caplog.text
  monkeypatch.setattr(memory_estimate, "host_memory_bytes", lambda: int(needed / 2.1))
  with pytest.raises(validation.ConfigError, match="needs at least"):
    validation.check_memory(config, encoder)


def test_print_config_describes_a_run_that_does_not_fit_then_says_so_and_exits_2(capfd, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  status = cli.pretrain_main(["--config=demo", "--print_config", "--config.data.num_demo_images=10000000"])
  out = capfd.readouterr().out
  assert status == 2
  assert "model: vit_base_patch16 at 32 px" in out and "data: ready" in out
  assert out.rstrip().splitlines()[-1].startswith("memory: does not fit this machine, the run would be refused: "
                                                  "config.data.num_demo_images=10000000")
  assert cli.pretrain_main(["--config=demo", "--print_config"]) == 0
  assert capfd.readouterr().out.rstrip().endswith("memory: fits this machine (by a lower-bound estimate)")
  assert not list(tmp_path.iterdir())
