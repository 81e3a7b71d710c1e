"""Steady-state throughput and MFU of the real jitted SimMIM train step, optionally against HF PyTorch.

The step is `pretrain.make_train_step` (masks drawn on device, AdamW, donated state) on synthetic images
already on the device; compilation is timed separately. With `--compare torch` the equivalent HF
transformers model (`ViTForMaskedImageModeling` / `SwinForMaskedImageModeling`, same sizes, AdamW, same
batch, same threads) runs in a second interpreter (`benchmarks/torch_simmim_worker.py`; on CPU the Python
3.11 torch venv at $SIMMIM_TORCH_PYTHON) and the two are timed in interleaved rounds, so load from
anything else on the machine hits both alike. The machine's dense-matmul rate (2048² float32 products on
CPU, 4096² in the compute dtype on GPU; the best of JAX and PyTorch) is the practical limit.

  python benchmarks/train_throughput.py --preset tiny --compare torch
  python benchmarks/train_throughput.py --preset vit_b16 --compare torch --rounds 3 --steps 3

Prints per-round details on stderr and one JSON line on stdout:
  {"img_per_sec", "tflops", "mfu", "matmul_peak_tflops", "fraction_of_peak", "torch_img_per_sec",
   "speedup_vs_torch", ...}
`tflops` is model TFLOP/s per device (`simmim_jax.models.flops`, MaxText convention); `mfu` is against the
datasheet peak of the device (`flops.peak_flops_per_device`, null on CPU unless `--peak_tflops`);
`fraction_of_peak` is against the measured matmul rate; `peak_bytes_in_use` is JAX's peak device memory
(`device.memory_stats()`, null on CPU) and `torch_peak_bytes` PyTorch's (CUDA only). `--attention_impl`
picks the encoders' attention path (einsum or jax.nn.dot_product_attention, simmim_jax/models/layers.py).

The host allocator: on a CPU-only JAX the command-line tools' setting (`simmim_jax/train/host_memory.py`) is
applied, as a user of `simmim-pretrain` gets it, and the PyTorch worker gets the same setting;
`--no_host_memory_defaults` measures glibc's default allocator on both sides. XLA flags: what `XLA_FLAGS`
says (the tools add none; the sets measured are in BENCHMARKS.md and launch/XLA_FLAGS.md).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from simmim_jax.train import host_memory  # pylint: disable=g-import-not-at-top

# Before JAX is imported: the allocator setting must precede every thread (as in simmim_jax/cli.py).
KEEP_FREED_MEMORY = (__name__ == "__main__" and "--no_host_memory_defaults" not in sys.argv
                     and host_memory.configure_for_cpu_only())

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from simmim_jax.configs import default_config  # pylint: disable=wrong-import-position
from simmim_jax.models import flops
from simmim_jax import models
from simmim_jax.train import optim, pretrain

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import process_usage  # pylint: disable=g-import-not-at-top,wrong-import-position

# HF ViTForMaskedImageModeling's layout: the "plain" ViT (learned positions, q/k/v biases, no layer scale).
PRESETS = {
    "tiny": dict(family="vit", layout="plain", img_size=32, patch_size=4, embed_dim=192, depth=6,
                 num_heads=3, mlp_dim=768, batch=64, dtype="float32", mask_patch_size=8, mask_ratio=0.6),
    "vit_b16": dict(family="vit", layout="plain", img_size=224, patch_size=16, embed_dim=768, depth=12,
                    num_heads=12, mlp_dim=3072, batch=8, dtype="float32", mask_patch_size=32, mask_ratio=0.6),
    # SimMIM's Swin-B pretraining setting (192 px, window 6).
    "swin_b192": dict(family="swin", img_size=192, patch_size=4, embed_dim=128, depths=(2, 2, 18, 2),
                      num_heads=(4, 8, 16, 32), window_size=6, mlp_dim=None, batch=8, dtype="float32",
                      mask_patch_size=32, mask_ratio=0.6),
}


def make_config(spec: dict):
  config = default_config.get_config()
  if spec["family"] == "vit":
    name = "vit_base_patch16_plain" if spec.get("layout", "plain") == "plain" else "vit_base_patch16"
    config.model.update(dict(name=name, patch_size=spec["patch_size"], embed_dim=spec["embed_dim"],
                             depth=spec["depth"], num_heads=spec["num_heads"],
                             mlp_ratio=spec["mlp_dim"] / spec["embed_dim"],
                             approximate_gelu=spec.get("approximate_gelu", False)))
  else:
    config.model.update(dict(name="swin_base_patch4_window6", patch_size=spec["patch_size"],
                             embed_dim=spec["embed_dim"], depths=list(spec["depths"]),
                             num_heads=list(spec["num_heads"]), window_size=spec["window_size"]))
  config.model.attention_impl = spec.get("attention_impl", "einsum")
  config.img_size = spec["img_size"]
  config.mask_patch_size, config.mask_ratio = spec["mask_patch_size"], spec["mask_ratio"]
  config.dtype = spec["dtype"]
  config.global_batch_size = spec["batch"]
  config.total_steps, config.warmup_steps = 1000, 10
  config.optimizer.base_lr = 1e-4 * 512 / spec["batch"]  # lr 1e-4 at this batch, as the torch side
  return config


class JaxStep:
  """The real train step, compiled once, on device-resident synthetic data."""

  def __init__(self, spec: dict):
    config = make_config(spec)
    self.model = pretrain.build_model(config)
    tx, schedule = optim.create_optimizer(config)
    init = jax.jit(lambda key: pretrain.init_train_state(self.model, tx, key))
    self.state = init(jax.random.key(0))
    size = spec["img_size"]
    self.images = jax.random.normal(jax.random.key(1), (spec["batch"], size, size, 3), jnp.float32)
    self.key = jax.random.key(2)
    step = jax.jit(pretrain.make_train_step(config, self.model, tx, schedule), donate_argnums=(0,))
    start = time.perf_counter()
    lowered = step.lower(self.state, self.images, self.key)
    self.lower_seconds = time.perf_counter() - start
    start = time.perf_counter()
    self.compiled = lowered.compile()
    self.compile_seconds = time.perf_counter() - start
    cost = self.compiled.cost_analysis()
    self.xla_flops_per_step = float(cost["flops"]) if cost and "flops" in cost else None
    self.flops_per_image = flops.train_flops_per_image(self.model)

  def run(self, num_steps: int) -> list[float]:
    """Step times; `self.last_rusage` gets this process's page faults and CPU seconds per step."""
    times = []
    before = process_usage.reading()
    for _ in range(num_steps):
      start = time.perf_counter()
      self.state, step_metrics = self.compiled(self.state, self.images, self.key)
      jax.block_until_ready(step_metrics)
      times.append(time.perf_counter() - start)
    self.last_rusage = process_usage.rusage_per_step(before, process_usage.reading(), num_steps)
    return times


def jax_matmul_flops_per_sec(dtype: str, repeats: int) -> float:
  n = 2048 if jax.default_backend() == "cpu" else 4096
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  dot = jax.jit(jnp.dot)
  rates = []
  for i in range(repeats + 3):
    start = time.perf_counter()
    dot(a, b).block_until_ready()
    if i >= 3:
      rates.append(2 * n ** 3 / (time.perf_counter() - start))
  return statistics.median(rates)


class TorchWorker:
  def __init__(self, spec: dict, python: str, keep_freed_memory: bool):
    worker_spec = dict(spec, encoder_stride=spec["patch_size"] if spec["family"] == "vit" else 32,
                       amp=spec["dtype"] == "bfloat16",
                       threads=os.cpu_count() if jax.default_backend() == "cpu" else None)
    if spec["family"] == "swin":
      worker_spec["depth"] = None
    # The JAX step clips by global norm (SimMIM's recipe, TRAIN.CLIP_GRAD 5.0); so does the worker, like for like.
    worker_spec["clip_grad"] = make_config(spec).optimizer.clip_grad_norm
    env = dict(os.environ)
    if keep_freed_memory:  # the JAX side's allocator setting (simmim_jax/train/host_memory.py), like for like
      env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"),
                                                      host_memory.GLIBC_TUNABLES_KEEP_FREED]))
    self.process = subprocess.Popen(
        [python, os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_simmim_worker.py"),
         json.dumps(worker_spec)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    self.info = self._read()

  def _read(self) -> dict:
    line = self.process.stdout.readline()
    if not line:
      raise RuntimeError("the PyTorch worker exited; see its traceback above")
    return json.loads(line)

  def ask(self, command: str) -> dict:
    self.process.stdin.write(command + "\n")
    self.process.stdin.flush()
    return self._read()

  def close(self):
    try:
      self.ask("quit")
    except (BrokenPipeError, RuntimeError, json.JSONDecodeError):
      pass
    self.process.wait(timeout=30)


def torch_python() -> str:
  for candidate in (os.environ.get("SIMMIM_TORCH_PYTHON"),
                    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                 ".venv-torch", "bin", "python"),
                    "/tmp/venv-torch/bin/python"):
    if candidate and os.path.exists(candidate):
      return candidate
  return sys.executable  # a GPU machine: torch next to jax


def require_torch_python() -> str:
  """The interpreter of the PyTorch side; exits 2 with what to set when it cannot import torch."""
  python = torch_python()
  probe = subprocess.run([python, "-c", "import torch, transformers"], capture_output=True, text=True)
  if probe.returncode:
    print(f"train_throughput: --compare torch needs a Python with torch and transformers, and {python} has "
          "none: set SIMMIM_TORCH_PYTHON=/path/to/python (e.g. the .venv-torch that .ci/run builds: "
          "python3.11 -m venv .venv-torch && .venv-torch/bin/pip install torch==2.13.0 transformers==4.57.6)",
          file=sys.stderr)
    sys.exit(2)
  return python


def summarize(times: list[float]) -> dict:
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": len(times)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
  parser.add_argument("--batch", type=int)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"))
  parser.add_argument("--img_size", type=int)
  parser.add_argument("--layout", choices=("plain", "official"), help="ViT layout (default: plain = HF)")
  parser.add_argument("--approximate_gelu", action="store_true",
                      help="ViT: tanh GELU (opt-in lever; the official model and HF use the exact GELU)")
  parser.add_argument("--attention_impl", choices=("einsum", "dot_product_attention"), default="einsum",
                      help="the encoders' attention_impl (dot_product_attention: cuDNN flash attention on an "
                      "NVIDIA GPU when the shapes qualify, simmim_jax/models/layers.py)")
  parser.add_argument("--case", help="a label copied into the JSON line")
  parser.add_argument("--compare", choices=("torch",))
  parser.add_argument("--rounds", type=int, default=4, help="interleaved JAX / PyTorch rounds")
  parser.add_argument("--steps", type=int, default=8, help="timed steps per round")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--matmul_repeats", type=int, default=10)
  parser.add_argument("--peak_tflops", type=float, help="datasheet peak per device (overrides the table)")
  parser.add_argument("--no_host_memory_defaults", action="store_true",
                      help="leave glibc's allocator as it is (simmim_jax/train/host_memory.py) on both sides; "
                      "read from sys.argv before JAX is imported")
  args = parser.parse_args(argv)
  python_for_torch = require_torch_python() if args.compare == "torch" else None
  keep_freed = bool(KEEP_FREED_MEMORY)

  spec = dict(PRESETS[args.preset])
  spec["approximate_gelu"] = args.approximate_gelu
  spec["attention_impl"] = args.attention_impl
  for key in ("batch", "dtype", "img_size", "layout"):
    if getattr(args, key) is not None:
      spec[key] = getattr(args, key)

  jax_step = JaxStep(spec)
  log = lambda **kw: print(json.dumps(kw), file=sys.stderr, flush=True)
  log(event="compiled", lower_s=jax_step.lower_seconds, compile_s=jax_step.compile_seconds,
      analytic_flops_per_step=jax_step.flops_per_image * spec["batch"],
      xla_flops_per_step=jax_step.xla_flops_per_step)
  jax_step.run(args.warmup)
  worker = None
  if args.compare == "torch":
    worker = TorchWorker(spec, python_for_torch, keep_freed)
    log(event="torch_ready", **worker.info)
    worker.ask(f"steps {args.warmup}")

  jax_times, torch_times, jax_mm, torch_mm, jax_rusage, torch_rusage = [], [], [], [], [], []
  torch_peak_bytes = None
  for round_index in range(args.rounds):  # interleaved: JAX, PyTorch, JAX, PyTorch, ...
    times = jax_step.run(args.steps)
    jax_times += times
    jax_rusage.append(jax_step.last_rusage)
    round_info = {"round": round_index, "jax_step_s": statistics.median(times), "jax_per_step": jax_rusage[-1]}
    if worker:
      reply = worker.ask(f"steps {args.steps}")
      torch_times += reply["step_times"]
      torch_peak_bytes = reply.get("peak_bytes")
      torch_rusage.append(reply["per_step"])
      round_info["torch_step_s"] = statistics.median(reply["step_times"])
      round_info["torch_per_step"] = torch_rusage[-1]
    jax_mm.append(jax_matmul_flops_per_sec(spec["dtype"], args.matmul_repeats))
    round_info["jax_matmul_gflops"] = jax_mm[-1] / 1e9
    if worker:
      torch_mm.append(worker.ask(f"matmul {args.matmul_repeats}")["matmul_flops_per_sec"])
      round_info["torch_matmul_gflops"] = torch_mm[-1] / 1e9
    log(event="round", **round_info)
  if worker:
    worker.close()

  batch = spec["batch"]
  device = jax.devices()[0]
  step_s = statistics.median(jax_times)
  img_per_sec = batch / step_s
  per_device_flops = jax_step.flops_per_image * img_per_sec / jax.device_count()
  peak = args.peak_tflops * 1e12 if args.peak_tflops else flops.peak_flops_per_device(
      device.device_kind, spec["dtype"])
  matmul_peak = max(jax_mm + torch_mm)  # the practical limit: the best median of either framework
  memory_stats = device.memory_stats() or {}  # None / no peak on CPU
  result = {
      "case": args.case or args.preset, "preset": args.preset, "model": jax_step.model.encoder.__class__.__name__,
      "layout": spec.get("layout") if spec["family"] == "vit" else None, "attention_impl": args.attention_impl,
      "device_kind": device.device_kind, "dtype": spec["dtype"], "batch": batch,
      "img_per_sec": img_per_sec, "step_s": summarize(jax_times),
      "tflops": per_device_flops / 1e12,
      "mfu": flops.mfu(jax_step.flops_per_image, img_per_sec / jax.device_count(), peak) if peak else None,
      "matmul_peak_tflops": matmul_peak / 1e12,
      "jax_matmul_tflops": statistics.median(jax_mm) / 1e12,
      "torch_matmul_tflops": statistics.median(torch_mm) / 1e12 if torch_mm else None,
      "fraction_of_peak": per_device_flops / matmul_peak,
      "torch_img_per_sec": batch / statistics.median(torch_times) if torch_times else None,
      "torch_step_s": summarize(torch_times) if torch_times else None,
      "speedup_vs_torch": statistics.median(torch_times) / step_s if torch_times else None,
      "gflops_per_image": jax_step.flops_per_image / 1e9, "compile_s": jax_step.compile_seconds,
      "peak_bytes_in_use": memory_stats.get("peak_bytes_in_use"), "torch_peak_bytes": torch_peak_bytes,
      "jax": jax.__version__, "torch": worker.info.get("torch") if worker else None,
      "load_avg_1m": os.getloadavg()[0], "cpu_count": os.cpu_count(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""), "keep_freed_memory": keep_freed,
      "minor_faults_per_step": statistics.median(r["minor_faults"] for r in jax_rusage),
      "sys_s_per_step": statistics.median(r["sys_s"] for r in jax_rusage),
      "torch_minor_faults_per_step": (statistics.median(r["minor_faults"] for r in torch_rusage)
                                      if torch_rusage else None),
      "torch_sys_s_per_step": statistics.median(r["sys_s"] for r in torch_rusage) if torch_rusage else None,
      "cpu_s_per_step": statistics.median(r["cpu_s"] for r in jax_rusage),
      "torch_cpu_s_per_step": statistics.median(r["cpu_s"] for r in torch_rusage) if torch_rusage else None,
  }
  print(json.dumps(result), flush=True)
  return result


if __name__ == "__main__":
  main()
