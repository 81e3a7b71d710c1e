"""Ahead-of-time compilation of a recipe's real step for a target mesh, without the hardware (`simmim-aot`).

Catches sharding and shape errors and out-of-memory configs before renting the chips (MaxText's
`train_compile.py`): the train state and batch are abstract (`jax.ShapeDtypeStruct`s with shardings), nothing
is allocated, and the compiler reports the memory and FLOPs per chip.

With the `libtpu` wheel (`pip install 'simmim_jax[tpu]'`) the target is a real Cloud TPU topology and the
compiler is the TPU's: `jax.experimental.topologies.get_topology_desc` describes e.g. the 64 chips of
`v5p:4x4x4` on a CPU-only machine (as MaxText's `train_compile.py` does), and the step compiles for them:

  simmim-aot --config=pretrain/vit_base_800ep --topology=v4:2x2x1
  simmim-aot --config=pretrain/swinv2_huge_800ep --topology=v5p:4x4x4 --num_slices=2

Without libtpu, fake CPU devices stand in for the chips (XLA:CPU's fusion and buffer assignment, not the
TPU's): `XLA_FLAGS=--xla_force_host_platform_device_count=8 simmim-aot --config=... --config.mesh.fsdp=8`.
"""

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
import time

from simmim_jax.models import flops
from simmim_jax.train import run

GIB = 2 ** 30

# HBM per chip in GiB and whether JAX should see one device per chip ("megacore": the two TensorCores of a
# v4 / v5p chip as one device, which `mesh_utils` needs). Cloud TPU docs, "TPU versions"; MaxText
# `accelerator_to_spec_map.py` for the chip config.
TPU_CHIPS = {
    "v4": (32, "megacore"),
    "v5e": (16, None),
    "v5p": (95, "megacore"),
    "v6e": (32, None),
}
# libtpu takes a machine-wide lock unless told that several processes may load it; the metadata server it
# queries exists only on a TPU VM.
LIBTPU_ENV = {"ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost"}


class DoesNotFit(ValueError):
  """The compiled step needs more memory per chip than the chip has (exit 2, naming the ways out)."""


@dataclasses.dataclass(frozen=True)
class Topology:
  """A Cloud TPU topology by name: `generation` ("v5p") and chip grid `shape` ((4, 4, 4))."""
  generation: str
  shape: tuple[int, ...]

  @property
  def name(self) -> str:
    return f"{self.generation}:{'x'.join(map(str, self.shape))}"

  @property
  def chips(self) -> int:
    count = 1
    for size in self.shape:
      count *= size
    return count

  @property
  def hbm_bytes(self) -> int:
    return TPU_CHIPS[self.generation][0] * GIB


def parse_topology(name: str) -> Topology:
  """"v5p:4x4x4" -> Topology("v5p", (4, 4, 4)); ValueError naming the accepted forms. v4 / v5p grids have
  three dimensions, v5e / v6e two."""
  match = re.fullmatch(r"(v\d+[a-z]?):(\d+(?:x\d+)*)", name.strip())
  generation = match.group(1) if match else None
  if generation not in TPU_CHIPS:
    raise ValueError(f"--topology={name!r}: use GENERATION:GRID with GENERATION one of {', '.join(TPU_CHIPS)}, "
                     f"e.g. v5e:2x2, v6e:8x8, v4:2x2x1, v5p:4x4x4")
  shape = tuple(int(s) for s in match.group(2).split("x"))
  dims = 3 if TPU_CHIPS[generation][1] == "megacore" else 2
  if len(shape) != dims or min(shape) < 1:
    raise ValueError(f"--topology={name!r}: a {generation} grid has {dims} positive dimensions "
                     f"(e.g. {generation}:{'x'.join(['2'] * dims)})")
  return Topology(generation, shape)


def libtpu_available() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def topology_devices(topology: Topology, num_slices: int = 1) -> list:
  """The compile-only devices of `num_slices` slices of `topology` (one per chip), from libtpu. Sets the
  environment libtpu needs off a TPU VM (LIBTPU_ENV) unless already set."""
  for key, value in LIBTPU_ENV.items():
    os.environ.setdefault(key, value)
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  chip_config = TPU_CHIPS[topology.generation][1]
  return list(topologies.get_topology_desc(topology_name=topology.name, platform="tpu", num_slices=num_slices,
                                           **({"chip_config_name": chip_config} if chip_config else {})).devices)


def compile_step(setup: run.StepSetup):
  """Lowers and compiles a recipe's step (e.g. `pretrain.build_step(config, mesh)`) on its abstract inputs;
  returns the Compiled object. Nothing is allocated."""
  return setup.train_step.lower(*setup.abstract_inputs()).compile()


def memory_summary(compiled) -> dict[str, int]:
  """Bytes per device from XLA's memory analysis (arguments, outputs, temporaries, generated code)."""
  analysis = compiled.memory_analysis()
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes", "alias_size_in_bytes")
  return {f: int(getattr(analysis, f, 0) or 0) for f in fields}


def total_bytes(memory: dict[str, int]) -> int:
  """What a chip must hold at once: arguments + outputs + temporaries + generated code, less the outputs
  that reuse donated argument buffers (aliases; the train state is donated)."""
  return (memory["argument_size_in_bytes"] + memory["output_size_in_bytes"] + memory["temp_size_in_bytes"]
          + memory["generated_code_size_in_bytes"] - memory["alias_size_in_bytes"])


def compiled_flops(compiled) -> float | None:
  """The compiler's FLOPs of one step per device (XLA cost analysis), or None when it reports none."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  value = (analysis or {}).get("flops")
  return float(value) if value is not None and value > 0 else None


@dataclasses.dataclass
class Report:
  """What `simmim-aot` prints: the compiled step's memory and FLOPs per chip, against the chip."""
  target: str              # "v5p:4x4x4 x 2 slices (128 chips), TPU compiler" / "8 fake CPU devices, XLA:CPU"
  memory: dict[str, int] | None  # memory_summary; None when the compiler refused the step (out of HBM)
  hbm_bytes: int | None    # per chip; None on fake devices (no chip to compare with)
  flops: float | None      # per chip per step
  peak_flops: float | None  # per chip, bfloat16
  compile_seconds: float
  out_of_memory: str = ""  # the TPU compiler's words when it refused the step for want of HBM

  @property
  def total(self) -> int | None:
    return None if self.memory is None else total_bytes(self.memory)

  @property
  def fits(self) -> bool | None:
    if self.out_of_memory:
      return False
    return None if self.hbm_bytes is None else self.total <= self.hbm_bytes

  def table(self) -> str:
    gib = lambda b: f"{b / GIB:8.3f} GiB"
    if self.memory is None:
      return "\n".join([f"target: {self.target}", "per chip:",
                        f"  total            DOES NOT FIT the {self.hbm_bytes / GIB:.0f} GiB HBM: the TPU compiler "
                        f"says: {self.out_of_memory}", f"compile time: {self.compile_seconds:.1f} s"])
    rows = [f"target: {self.target}", "per chip:",
            f"  arguments        {gib(self.memory['argument_size_in_bytes'])}",
            f"  outputs          {gib(self.memory['output_size_in_bytes'])}"
            f"  ({gib(self.memory['alias_size_in_bytes']).strip()} of them reuse donated arguments)",
            f"  temporaries      {gib(self.memory['temp_size_in_bytes'])}",
            f"  generated code   {gib(self.memory['generated_code_size_in_bytes'])}"]
    if self.hbm_bytes is None:
      rows.append(f"  total            {gib(self.total)}  (no chip to compare with: fake CPU devices)")
    else:
      verdict = "fits" if self.fits else "DOES NOT FIT"
      rows.append(f"  total            {gib(self.total)}  of {self.hbm_bytes / GIB:.0f} GiB HBM: {verdict}")
    rows.append("  FLOPs per step   " + (f"{self.flops / 1e12:8.4g} TFLOP (compiler's count)" if self.flops
                                        else "     n/a (the compiler reports none)"))
    if self.flops and self.peak_flops:
      rows.append(f"  step time        {self.flops / self.peak_flops * 1e3:8.2f} ms  lower bound: at 100% of "
                  f"the chip's {self.peak_flops / 1e12:.0f} TFLOP/s bf16 peak")
    rows.append(f"compile time: {self.compile_seconds:.1f} s")
    return "\n".join(rows)


def report(compiled, target: str, compile_seconds: float, hbm_bytes: int | None, device_kind: str) -> Report:
  return Report(target, memory_summary(compiled), hbm_bytes, compiled_flops(compiled),
                flops.peak_flops_per_device(device_kind, "bfloat16"), compile_seconds)


def ways_out(config, report_: Report) -> str:
  """One line: by how much the step misses, and what would make it fit."""
  fsdp = int(config.mesh.fsdp)
  remat = bool(config.model.get("remat", False))
  hints = [f"a larger --config.mesh.fsdp (now {fsdp})"]
  if not remat:
    hints.append("--config.model.remat=True")
  hints.append(f"a smaller batch per chip (--config.global_batch_size={config.global_batch_size} now, or "
               f"--config.optimizer.accumulation_steps)")
  if config.get("dtype") == "float32":
    hints.append("--config.dtype=bfloat16")
  needs = (f"needs {report_.total / GIB:.2f} GiB per chip, more than" if report_.total is not None
           else "does not fit (the TPU compiler ran out of memory) in")
  return f"the step {needs} the {report_.hbm_bytes / GIB:.0f} GiB of HBM: try {', '.join(hints)}"


def compile_for(config, build_step, *, topology: str | None = None, num_slices: int = 1,
                notice=print) -> Report:
  """Compiles `build_step(config, mesh)` (a recipe's step builder, e.g. `pretrain.build_step`) for `topology`
  with the TPU compiler when libtpu is installed, else for this process's devices (fake CPU devices stand
  in; `notice` says so in one line). `config.mesh.slices` is set to `num_slices`."""
  import jax  # pylint: disable=g-import-not-at-top

  from simmim_jax.train import sharding  # pylint: disable=g-import-not-at-top

  if num_slices < 1:
    raise ValueError(f"--num_slices={num_slices}: use 1 or more")
  parsed = parse_topology(topology) if topology else None
  config = config.copy_and_resolve_references()
  if num_slices > 1 or "slices" in config.mesh:
    with config.unlocked():
      config.mesh.slices = num_slices
  hbm, device_kind = None, ""
  if parsed and libtpu_available():
    devices = topology_devices(parsed, num_slices)
    hbm, device_kind = parsed.hbm_bytes, devices[0].device_kind
    slices = f" x {num_slices} slices" if num_slices > 1 else ""
    target = f"{parsed.name}{slices} ({len(devices)} chips, {device_kind}), TPU compiler"
  else:
    devices = jax.devices()
    if parsed:
      notice(f"libtpu is not installed (pip install 'simmim_jax[tpu]'): compiling for {len(devices)} fake CPU "
             f"devices with XLA:CPU instead of {parsed.name}")
    target = f"{len(devices)} {devices[0].platform.upper()} devices ({devices[0].device_kind}), XLA"
    device_kind = devices[0].device_kind
  data, fsdp = sharding.mesh_shape(config.mesh, len(devices))  # ValueError naming config.mesh if it does not fit
  target += f"; mesh data={data} x fsdp={fsdp}"
  batch = config.global_batch_size
  if batch % len(devices):
    raise ValueError(f"config.global_batch_size={batch} must be a multiple of the target's {len(devices)} devices")
  start = time.perf_counter()
  try:
    compiled = compile_step(build_step(config, sharding.create_mesh(config.mesh, devices)))
  except Exception as e:  # pylint: disable=broad-except  (the TPU compiler refuses a step that needs too much HBM)
    words = [line for line in str(e).splitlines() if "out of memory" in line.lower()]
    if hbm is None or "RESOURCE_EXHAUSTED" not in str(e) or not words:
      raise
    return Report(target, None, hbm, None, flops.peak_flops_per_device(device_kind, "bfloat16"),
                  time.perf_counter() - start, out_of_memory=words[0].split("E1000: ")[-1].strip())
  return report(compiled, target, time.perf_counter() - start, hbm, device_kind)


__all__ = ["DoesNotFit", "LIBTPU_ENV", "Report", "TPU_CHIPS", "Topology", "compile_for", "compile_step",
           "compiled_flops", "libtpu_available", "memory_summary", "parse_topology", "topology_devices",
           "total_bytes", "ways_out"]


def compile_in_fresh_process(args: list[str], timeout: float) -> dict:
  """`simmim-aot ARGS` in a fresh process of this interpreter (nothing cached from an earlier compile), as the
  benchmarks run it: {"compile_s", "fits", "gib", "tflop"} read from its table (`compile_s`: the wall time when
  no compile time was printed), with "error" when it failed or did not finish in `timeout` seconds."""
  code = "import sys; from simmim_jax import cli; sys.exit(cli.aot_main(sys.argv[1:]))"
  start = time.perf_counter()
  try:
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                            check=False, env={**os.environ, "JAX_PLATFORMS": "cpu", **LIBTPU_ENV})
  except subprocess.TimeoutExpired:
    return {"error": f"not finished in {timeout:.0f} s"}
  out = result.stdout
  if "libtpu is not installed" in out:
    return {"error": "libtpu missing: run with the TPU venv's python"}
  figure = lambda pattern: float(found.group(1)) if (found := re.search(pattern, out)) else None
  compile_s = figure(r"compile time: ([\d.]+) s")
  row = {"compile_s": time.perf_counter() - start if compile_s is None else compile_s,
         "fits": result.returncode == 0, "gib": figure(r"total\s+([\d.]+) GiB"),
         "tflop": figure(r"FLOPs per step\s+([\d.e+]+) TFLOP")}
  if result.returncode not in (0, 2) or (result.returncode == 2 and "DOES NOT FIT" not in out):
    row["error"] = (result.stderr.strip().splitlines() or [f"rc {result.returncode}"])[-1][:160]
  return row
