"""simmim-aot (aot.py): a recipe's real step compiled for a Cloud TPU topology with the TPU compiler, on a
CPU-only machine, and its memory per chip against the chip's HBM.

The TPU compiler comes from libtpu, which lives in its own venv ($SIMMIM_TPU_PYTHON; .ci/run builds .venv-tpu
with `pip install -e '.[tpu]'`) so that a TPU plugin never changes backend initialization for the rest of the
suite; those tests run the CLI there as a subprocess.
"""

import os
import re
import subprocess

import jax
import pytest

from simmim_jax.tools import aot
from simmim_jax import cli
from simmim_jax.train import sharding
from helpers import run_process

TPU_PYTHON = os.environ.get("SIMMIM_TPU_PYTHON")
needs_libtpu = pytest.mark.skipif(
    not TPU_PYTHON, reason="SIMMIM_TPU_PYTHON is unset: no interpreter with libtpu for the TPU-compiler tests "
    "(.ci/run creates .venv-tpu with pip install -e '.[tpu]')")
GIB = 2 ** 30


def run_aot(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **aot.LIBTPU_ENV}
  code = "import sys; from simmim_jax import cli; sys.exit(cli.aot_main(sys.argv[1:]))"
  return subprocess.run([TPU_PYTHON, "-c", code, *args], capture_output=True, text=True, timeout=1500, env=env,
                        check=False)


@pytest.mark.parametrize("name, expected", [("v5e:2x2", ("v5e", (2, 2), 4)), ("v4:2x2x1", ("v4", (2, 2, 1), 4)),
                                            ("v5p:4x4x4", ("v5p", (4, 4, 4), 64)), ("v6e:8x8", ("v6e", (8, 8), 64))])
def test_topology_names_parse_to_a_generation_and_a_chip_grid(name, expected):
  topology = aot.parse_topology(name)
  assert (topology.generation, topology.shape, topology.chips) == expected and topology.name == name


@pytest.mark.parametrize("name", ["v5e", "v5e:2x2x2", "v4:2x2", "v9:2x2", "tpu:2x2", "v5p:4x0x4", "v5e-8"])
def test_a_topology_that_is_no_cloud_tpu_grid_is_refused_naming_the_forms(name):
  with pytest.raises(ValueError, match=r"--topology=.*(e\.g\. v5e:2x2|e\.g\. v\d[a-z]?:2x2)"):
    aot.parse_topology(name)


def test_a_bad_topology_or_slice_count_is_one_line_and_exit_2(capsys):
  assert cli.aot_main(["--config=demo", "--topology=v5e-8"]) == 2
  assert cli.aot_main(["--config=demo", "--num_slices=0"]) == 2
  lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("simmim-aot:")]
  assert len(lines) == 2 and "--topology='v5e-8'" in lines[0] and "--num_slices=0" in lines[1]


def test_a_two_slice_mesh_keeps_fsdp_inside_a_slice():
  """config.mesh.slices=2 on 8 devices with fsdp=2: the data axis is 2 slices x 2, and each fsdp group is two
  devices of one slice (consecutive fake devices form a slice)."""
  config = _mesh(data=-1, fsdp=2, slices=2)
  mesh = sharding.create_mesh(config, jax.devices()[:8])
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
  slice_of = {d: i // 4 for i, d in enumerate(jax.devices()[:8])}
  for row in mesh.devices:
    assert len({slice_of[d] for d in row}) == 1  # an fsdp group never crosses slices
  assert [slice_of[row[0]] for row in mesh.devices] == [0, 0, 1, 1]
  with pytest.raises(ValueError, match="each of 2 slices"):
    sharding.mesh_shape(_mesh(data=1, fsdp=8, slices=2), 8)
  with pytest.raises(ValueError, match="slices=3"):
    sharding.mesh_shape(_mesh(data=-1, fsdp=1, slices=3), 8)


def _mesh(**fields):
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict({"fsdp_min_size": 2 ** 14, **fields})


@pytest.mark.slow
def test_without_libtpu_a_topology_falls_back_to_fake_cpu_devices_saying_so(capsys):
  assert not aot.libtpu_available()  # the test venv has no TPU plugin (see the module docstring)
  assert cli.aot_main(["--config=demo", "--topology=v5e:2x2", "--config.global_batch_size=8"]) == 0
  out = capsys.readouterr().out
  notices = [line for line in out.splitlines() if "libtpu is not installed" in line]
  assert len(notices) == 1 and "fake CPU devices" in notices[0]
  assert "XLA" in out and "HBM" not in out  # no chip to compare with


@pytest.mark.slow
@needs_libtpu
def test_the_demo_step_compiles_for_v5e_with_the_tpu_compiler_and_fits():
  result = run_aot("--config=demo", "--topology=v5e:2x2", "--config.mesh.fsdp=4")
  assert result.returncode == 0, result.stderr[-2000:]
  out = result.stdout
  assert "v5e:2x2 (4 chips" in out and "TPU compiler" in out and "libtpu is not installed" not in out
  figures = {name: float(re.search(rf"{name}\s+([\d.]+) GiB", out).group(1))
             for name in ("arguments", "outputs", "temporaries", "generated code", "total")}
  assert all(value >= 0 for value in figures.values()) and 0 < figures["total"] < 16
  assert re.search(r"total\s+[\d.]+ GiB\s+of 16 GiB HBM: fits", out)
  assert float(re.search(r"FLOPs per step\s+([\d.]+) TFLOP", out).group(1)) > 0
  assert re.search(r"step time\s+[\d.]+ ms\s+lower bound", out) and re.search(r"compile time: [\d.]+ s", out)


@pytest.mark.slow
@needs_libtpu
def test_a_step_that_does_not_fit_the_chip_prints_the_table_and_exits_2_naming_the_ways_out():
  result = run_aot("--config=demo", "--topology=v5e:2x2", "--config.mesh.fsdp=4", "--config.global_batch_size=32768")
  assert result.returncode == 2, result.stderr[-2000:]
  assert "DOES NOT FIT" in result.stdout
  line = [l for l in result.stderr.splitlines() if l.startswith("simmim-aot:")]
  assert len(line) == 1 and "of HBM" in line[0]
  assert all(way in line[0] for way in ("--config.mesh.fsdp", "--config.model.remat=True", "global_batch_size"))


@pytest.mark.slow
@needs_libtpu
def test_a_two_slice_topology_compiles_with_fsdp_inside_each_slice():
  result = run_aot("--config=demo", "--topology=v5e:2x2", "--num_slices=2", "--config.mesh.fsdp=4")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "v5e:2x2 x 2 slices (8 chips" in result.stdout and "mesh data=2 x fsdp=4" in result.stdout
  assert re.search(r"total\s+[\d.]+ GiB\s+of 16 GiB HBM: fits", result.stdout)


@pytest.mark.slow
@needs_libtpu
def test_an_fsdp_axis_spanning_two_physical_axes_of_a_v5p_torus_builds_its_mesh():
  """fsdp=8 on v5p:4x4x4 (a 4x4x4 torus): jax.make_mesh refuses to split a physical axis on v4 / v5p."""
  code = ("from jax.experimental import topologies; import ml_collections; from simmim_jax.train import sharding\n"
          "devices = topologies.get_topology_desc(topology_name='v5p:4x4x4', platform='tpu', "
          "chip_config_name='megacore').devices\n"
          "mesh = sharding.create_mesh(ml_collections.ConfigDict({'data': -1, 'fsdp': 8}), devices)\n"
          "assert dict(mesh.shape) == {'data': 8, 'fsdp': 8}, mesh.shape\n"
          "assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)\n")
  result = subprocess.run([TPU_PYTHON, "-c", code], capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", **aot.LIBTPU_ENV})
  assert result.returncode == 0, result.stderr[-2000:]


def test_the_tpu_vm_launcher_dry_runs_a_multi_slice_queued_resource():
  launcher = os.path.join(os.path.dirname(__file__), "..", "launch", "tpu_vm.sh")
  result = run_process(["bash", launcher, "all", "--name=simmim", "--zone=us-east5-a", "--accelerator_type=v5p-128",
                        "--num_slices=2", "--dry-run", "--", "--config=pretrain/swinv2_huge_800ep",
                        "--workdir=gs://bucket/run"], timeout=60)
  assert result.returncode == 0, result.stderr
  out = result.stdout
  assert ("gcloud compute tpus queued-resources create simmim --zone=us-east5-a --node-count=2 --node-prefix=simmim "
          "--accelerator-type=v5p-128") in out
  assert "simmim-0:~/" in out and "simmim-1:~/" in out  # the code goes to every slice
  assert "queued-resources ssh simmim --zone=us-east5-a --node=all --worker=all" in out
  assert "--workdir=gs://bucket/run --config.mesh.slices=2" in out
  assert "queued-resources delete simmim --zone=us-east5-a --force --quiet" in out
