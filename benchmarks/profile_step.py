"""Where the tiny preset's train step spends its time on CPU, op by op (XLA thunks from a jax.profiler trace).

  python benchmarks/profile_step.py --steps 3 --top 25

Traces `--steps` steps of the real compiled step (after warm-up) with `jax.profiler.trace(...,
create_perfetto_trace=True)`, sums the duration of each XLA op (thunk / fusion name) over the steps and
prints the top ops and a breakdown by kind (dot = matmuls, fusion = fused elementwise / reductions /
transposes, ...) as JSON lines. Per-op events overlap when XLA runs thunks concurrently, so shares are of
the summed op time, not of wall time.

`--by_source` also groups the op time by where each op came from in the model (the HLO `op_name` metadata
of the compiled step, block indices folded together): forward vs backward (`transpose(jvp(...))`) and the
module path, e.g. `backward encoder/blocks/mlp/fc1/dot_general`.

`--compare torch` then profiles HF PyTorch's step of the same preset (`torch_simmim_worker.py`, the same
allocator setting, torch.profiler over the same number of steps after the same warm-up) and prints its
aten ops by self CPU time, so the two steps can be read side by side.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from simmim_jax import host_memory  # pylint: disable=g-import-not-at-top

# Before JAX is imported, as simmim-pretrain does on a CPU-only machine (simmim_jax/host_memory.py).
KEEP_FREED_MEMORY = "--no_host_memory_defaults" not in sys.argv and host_memory.configure_for_cpu_only()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_throughput  # pylint: disable=g-import-not-at-top


def kind_of(name: str) -> str:
  base = re.sub(r"[.\d]+$", "", name.split(":")[0]).lower()
  if base.startswith("ynn_fusion"):  # YNNPACK-backed fusions: the matmuls (dot + epilogue)
    return "ynn_fusion (matmul)"
  for kind in ("convolution", "dot", "custom-call", "copy", "transpose", "reduce", "fusion", "while",
               "all-reduce", "gather", "scatter", "broadcast", "concatenate", "slice"):
    if kind in base:
      return kind
  return base or name


def op_sources(hlo_text: str) -> dict[str, str]:
  """Maps each HLO instruction name to 'forward|backward|optimizer <module path>/<primitive>'."""
  sources = {}
  for match in re.finditer(r'^\s*(?:ROOT )?%?([\w.-]+) = .*?op_name="([^"]+)"', hlo_text, re.M):
    name, op_name = match.groups()
    phase = ("backward" if "transpose(jvp" in op_name else
             "forward" if "jvp(" in op_name else "optimizer/other")
    path = re.sub(r"^.*?\)\)?/", "", op_name.replace("jit(train_step)/", ""))
    path = re.sub(r"_\d+(?=/|$)", "", path)  # blocks_3 -> blocks
    sources[name] = f"{phase} {path}"
  return sources


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--preset", default="tiny", choices=sorted(train_throughput.PRESETS))
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=8,
                      help="untraced steps first (the allocator's heap reaches its steady size in a few)")
  parser.add_argument("--top", type=int, default=25)
  parser.add_argument("--by_source", action="store_true", help="also group op time by model source")
  parser.add_argument("--compare", choices=("torch",), help="also profile HF PyTorch's step")
  parser.add_argument("--no_host_memory_defaults", action="store_true",
                      help="glibc's default allocator (read before JAX is imported, see the top of this file)")
  args = parser.parse_args()
  step = train_throughput.JaxStep(train_throughput.PRESETS[args.preset])
  step.run(args.warmup)
  with tempfile.TemporaryDirectory() as trace_dir:
    start = time.perf_counter()
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      step.run(args.steps)
    wall = time.perf_counter() - start
    paths = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not paths:
      sys.exit(f"no perfetto trace written under {trace_dir}")
    with gzip.open(paths[0]) as f:
      trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  by_name, by_kind, count = collections.Counter(), collections.Counter(), collections.Counter()
  for event in events:
    if event.get("ph") != "X" or "dur" not in event:
      continue
    name = event.get("name", "")
    args_ = event.get("args", {})
    if not ("hlo_op" in args_ or "long_name" in args_ or re.match(r"^(fusion|dot|convolution|copy|transpose|"
                                                                  r"reduce|custom-call|broadcast|slice|"
                                                                  r"concatenate|gather|scatter|add|multiply)",
                                                                  name)):
      continue
    by_name[name] += event["dur"] / 1e6
    by_kind[kind_of(name)] += event["dur"] / 1e6
    count[name] += 1
  total = sum(by_name.values())
  print(json.dumps({"wall_s": wall, "steps": args.steps, "summed_op_s": total,
                    "by_kind": {k: round(v / total, 3) for k, v in by_kind.most_common()}}))
  for name, seconds in by_name.most_common(args.top):
    print(json.dumps({"op": name, "s_per_step": round(seconds / args.steps, 4),
                      "share": round(seconds / total, 3), "calls_per_step": count[name] // args.steps}))
  if args.by_source:
    sources = op_sources(step.compiled.as_text())
    by_source, by_phase = collections.Counter(), collections.Counter()
    for name, seconds in by_name.items():
      source = sources.get(name.split(":")[0], "unattributed")
      by_source[source] += seconds
      by_phase[source.split(" ")[0]] += seconds
    print(json.dumps({"by_phase": {k: round(v / total, 3) for k, v in by_phase.most_common()}}))
    for source, seconds in by_source.most_common(args.top):
      print(json.dumps({"source": source, "s_per_step": round(seconds / args.steps, 4),
                        "share": round(seconds / total, 3)}))
  if args.compare == "torch":
    print_torch_profile(args)


def print_torch_profile(args):
  spec = train_throughput.PRESETS[args.preset]
  worker = train_throughput.TorchWorker(spec, train_throughput.torch_python(), bool(KEEP_FREED_MEMORY))
  try:
    worker.ask(f"steps {args.warmup}")
    profile = worker.ask(f"profile {args.steps}")
  finally:
    worker.close()
  total = sum(op["self_s_per_step"] for op in profile["ops"])
  print(json.dumps({"torch_wall_s": profile["wall_s"], "steps": args.steps, "torch_summed_self_s": total * args.steps,
                    "torch": worker.info["torch"], "transformers": worker.info["transformers"]}))
  for op in profile["ops"][:args.top]:
    print(json.dumps({"torch_op": op["op"], "s_per_step": round(op["self_s_per_step"], 4),
                      "share": round(op["self_s_per_step"] / total, 3),
                      "calls_per_step": op["calls_per_step"]}))


if __name__ == "__main__":
  main()
