"""Compile time of the real pretraining step with and without `model.scan_blocks` (MaxText's scan_layers).

  python benchmarks/scan_compile_time.py                        # ViT-B/16 224 and SwinV2-G 192, both settings
  python benchmarks/scan_compile_time.py --models=ViT-B/16 --timeout=900
  .venv-tpu/bin/python benchmarks/scan_compile_time.py --models=SwinV2-G --topology=v5p:2x2x1   # TPU compiler

Each measurement is one fresh process (no compilation cache) that builds `pretrain.build_step` for one device
(global batch 8, bfloat16, remat as the packaged config) and times `lower(...)` and `compile()` of the step on
abstract inputs: nothing is allocated, so SwinV2-G's 3 billion parameters cost nothing but compile time. The
compiler is the default backend's (XLA:CPU here): the TPU compiler's times differ, the ratio is what this
measures. A measurement past --timeout is reported as not finished.

With --topology (libtpu installed: `pip install -e '.[tpu]'`) each measurement is `simmim-aot --topology=...`
instead: the TPU compiler, the global batch 2 per chip, FSDP over every chip; the column is its compile time.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

MODELS = {  # name: (packaged pretraining config, what else it sets)
    "ViT-B/16": ("pretrain/vit_base_800ep", {}),
    "SwinV2-G": ("pretrain/swinv2_giant_800ep", {}),
}

WORKER = r'''
import json, sys, time
import jax
from simmim_jax.tools import aot
from simmim_jax import configs
from simmim_jax.train import pretrain, sharding
config = configs.load(sys.argv[1])
for key, value in json.loads(sys.argv[2]).items():
  node = config
  *parents, leaf = key.split(".")
  for parent in parents:
    node = node[parent]
  node[leaf] = value
config.global_batch_size, config.dtype, config.mesh.data, config.mesh.fsdp = 8, "bfloat16", 1, 1
start = time.perf_counter()
setup = pretrain.build_step(config, sharding.create_mesh(config.mesh, jax.devices()[:1]))
lowered = setup.train_step.lower(*setup.abstract_inputs())
lowered_at = time.perf_counter()
lowered.compile()
done = time.perf_counter()
print(json.dumps({"lower_s": round(lowered_at - start, 1), "compile_s": round(done - lowered_at, 1)}))
'''


def measure(config_name: str, overrides: dict, timeout: float) -> dict:
  try:
    result = subprocess.run([sys.executable, "-c", WORKER, config_name, json.dumps(overrides)], capture_output=True,
                            text=True, timeout=timeout, check=False, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  except subprocess.TimeoutExpired:
    return {"error": f"not finished in {timeout:.0f} s"}
  if result.returncode:
    return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"rc {result.returncode}"}
  return json.loads(result.stdout.strip().splitlines()[-1])


def measure_tpu(config_name: str, overrides: dict, topology: str, timeout: float) -> dict:
  """`simmim-aot --topology` of the step (the TPU compiler, in a fresh process); its printed compile time."""
  from simmim_jax.tools import aot  # pylint: disable=g-import-not-at-top
  chips = aot.parse_topology(topology).chips
  args = [f"--config={config_name}", f"--topology={topology}", f"--config.global_batch_size={2 * chips}",
          "--config.dtype=bfloat16", "--config.mesh.data=1", "--config.mesh.fsdp=-1",
          *(f"--config.{key}={value}" for key, value in overrides.items())]
  row = aot.compile_in_fresh_process(args, timeout)
  return {"error": row["error"]} if "error" in row else {"lower_s": "", "compile_s": row["compile_s"]}


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
  parser.add_argument("--timeout", type=float, default=1200, help="seconds per measurement")
  parser.add_argument("--topology", default="", help="a TPU topology (v5p:2x2x1): the TPU compiler, via simmim-aot")
  args = parser.parse_args()
  compiler = f"the TPU compiler for {args.topology}" if args.topology else "XLA:CPU"
  print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; compiler: {compiler}")
  print("| model | scan_blocks | lower (s) | compile (s) |\n|---|---|---|---|")
  for name in args.models.split(","):
    config_name, overrides = MODELS[name]
    for scan in (False, True):
      settings = {**overrides, "model.scan_blocks": scan}
      result = (measure_tpu(config_name, settings, args.topology, args.timeout) if args.topology
                else measure(config_name, settings, args.timeout))
      if "error" in result:
        print(f"| {name} | {scan} | {result['error']} | |", flush=True)
      else:
        print(f"| {name} | {scan} | {result['lower_s']} | {result['compile_s']} |", flush=True)


if __name__ == "__main__":
  main()
