"""Where each framework's CPU time goes in its steady-state train step, by library and symbol (Linux `perf`).

  python benchmarks/cpu_samples.py --preset tiny --steps 10 --compare torch

The op profiles (`profile_step.py`, torch.profiler) distort a short step: they add work per op and cannot see
the intra-op worker threads. This samples the whole process instead: after the warm-up it attaches
`perf record -e cpu-clock` (a software clock, so it works in VMs without hardware counters) to the JAX
process, runs `--steps` steps of the real compiled step, detaches, and then does the same to the PyTorch
worker of `train_throughput.py --compare torch` (same preset, same allocator setting, same thread count).
For each side it prints one JSON line: the median step time, CPU seconds per step (user + system, all threads,
`getrusage`) and the share of samples by shared library (`[JIT]` = code generated at run time: XLA's compiled
kernels on the JAX side) and by symbol. Needs `perf` on PATH and permission to attach (root, or
`kernel.perf_event_paranoid` <= 1).
"""

import argparse
import collections
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from simmim_jax import host_memory  # pylint: disable=g-import-not-at-top

# Before JAX is imported, as simmim-pretrain does on a CPU-only machine (simmim_jax/host_memory.py).
KEEP_FREED_MEMORY = "--no_host_memory_defaults" not in sys.argv and host_memory.configure_for_cpu_only()

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_throughput  # pylint: disable=g-import-not-at-top,wrong-import-position


def start_perf(pid: int, output: str, frequency: int) -> subprocess.Popen:
  perf = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-F", str(frequency), "-p", str(pid),
                           "-o", output, "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  time.sleep(1.0)  # attached before the timed steps start
  if perf.poll() is not None:
    sys.exit(f"perf record could not attach to pid {pid}: {perf.stderr.read().decode().strip()}")
  return perf


def stop_perf(perf: subprocess.Popen) -> None:
  perf.send_signal(signal.SIGINT)
  perf.wait(timeout=60)


def sample_shares(data: str, sort: str) -> list[tuple[str, float]]:
  """(key, share of samples) from `perf report --sort <sort>`, largest first."""
  report = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", sort, "--stdio"],
                          capture_output=True, text=True, check=True).stdout
  shares = collections.Counter()
  for line in report.splitlines():
    match = re.match(r"^\s+([\d.]+)%\s+(.*\S)\s*$", line)
    if match:
      key = re.sub(r"\[JIT\] tid \d+", "[JIT]", match.group(2))  # one line per thread otherwise
      shares[re.sub(r"\s+", " ", key)] += float(match.group(1)) / 100
  return shares.most_common()


def summarize(side: str, times: list[float], cpu_s: float, data: str, top: int) -> dict:
  by_library = sample_shares(data, "dso")
  by_symbol = sample_shares(data, "dso,sym")
  return {"side": side, "step_s_median": statistics.median(times), "steps": len(times), "cpu_s_per_step": cpu_s,
          "cores_busy": cpu_s / statistics.median(times),
          "by_library": {k: round(v, 4) for k, v in by_library[:top]},
          "top_symbols": [[k[:160], round(v, 4)] for k, v in by_symbol[:top]]}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", choices=sorted(train_throughput.PRESETS), default="tiny")
  parser.add_argument("--warmup", type=int, default=8)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--frequency", type=int, default=999, help="samples per second per CPU")
  parser.add_argument("--top", type=int, default=15)
  parser.add_argument("--compare", choices=("torch",))
  parser.add_argument("--no_host_memory_defaults", action="store_true",
                      help="glibc's default allocator on both sides (read before JAX is imported)")
  args = parser.parse_args()
  if not shutil.which("perf"):
    sys.exit("cpu_samples.py needs Linux `perf` on PATH (e.g. the linux-tools package)")
  spec = train_throughput.PRESETS[args.preset]
  with tempfile.TemporaryDirectory() as tmp:
    step = train_throughput.JaxStep(spec)
    step.run(args.warmup)
    perf = start_perf(os.getpid(), os.path.join(tmp, "jax.data"), args.frequency)
    try:
      times = step.run(args.steps)
    finally:
      stop_perf(perf)
    print(json.dumps({**summarize("jax", times, step.last_rusage["cpu_s"], os.path.join(tmp, "jax.data"),
                                  args.top), "keep_freed_memory": bool(KEEP_FREED_MEMORY)}), flush=True)
    if args.compare == "torch":
      worker = train_throughput.TorchWorker(spec, train_throughput.torch_python(), bool(KEEP_FREED_MEMORY))
      try:
        worker.ask(f"steps {args.warmup}")
        perf = start_perf(worker.process.pid, os.path.join(tmp, "torch.data"), args.frequency)
        try:
          reply = worker.ask(f"steps {args.steps}")
        finally:
          stop_perf(perf)
      finally:
        worker.close()
      print(json.dumps({**summarize("torch", reply["step_times"], reply["per_step"]["cpu_s"],
                                    os.path.join(tmp, "torch.data"), args.top),
                        "torch": worker.info["torch"], "threads": worker.info["threads"]}), flush=True)


if __name__ == "__main__":
  main()
