"""A/B of XLA:CPU compiler flags on the real tiny train step, one subprocess per flag set, interleaved.

  python benchmarks/xla_cpu_flags.py --rounds 2 --steps 8

"baseline" is plain XLA (the package sets no XLA flag); every variant runs with the host allocator setting of
the command-line tools (simmim_jax/host_memory.py), as train_throughput.py applies it. XLA flags are read
once per process, so each variant runs `train_throughput.py` (no PyTorch side) in its
own process with `XLA_FLAGS` set; the variants are visited round-robin so that machine load hits all alike.
Prints one JSON line per (round, variant) and then a summary line per variant (median img/s over rounds,
and the ratio to the baseline). Extra arguments after `--` go to train_throughput.py unchanged.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

VARIANTS = {
    "baseline": "",
    # YNNPACK library fusions (matmuls + their epilogues) off: plain XLA:CPU codegen and Eigen.
    "ynn_off": "--xla_cpu_experimental_ynn_fusion_type=",
    "ynn_plus_eltwise": "--xla_cpu_experimental_ynn_fusion_type=+eltwise",
    "ynn_plus_reduce": "--xla_cpu_experimental_ynn_fusion_type=+reduce",
    "onednn": "--xla_cpu_use_onednn=true --xla_cpu_experimental_ynn_fusion_type=",
    "xnn_dot_eltwise": ("--xla_cpu_experimental_ynn_fusion_type= "
                        "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise"),
    "xnn_graph_greedy": ("--xla_cpu_experimental_ynn_fusion_type= "
                         "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY"),
    "fast_math": "--xla_cpu_enable_fast_math=true",
    "ynn_off_fast_math": "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_enable_fast_math=true",
    # Schedulers and fusion emitters (fourth session: the non-matmul fusions are what trails PyTorch).
    "memory_scheduler": "--xla_cpu_enable_concurrency_optimized_scheduler=false",
    "tiling_propagation": "--xla_cpu_experimental_enable_tiling_propagation=true",
    "new_xtile_lowering": "--xla_cpu_use_new_xtile_lowering=true",
    "platform_math": "--xla_cpu_enable_platform_dependent_math=true",
}


def run_variant(flags: str, passthrough: list[str]) -> dict:
  env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_throughput.py")
  proc = subprocess.run([sys.executable, script, *passthrough], env=env, capture_output=True, text=True,
                        check=False)
  if proc.returncode != 0:
    return {"error": proc.stderr.strip().splitlines()[-1:] or ["exit %d" % proc.returncode]}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
  args, passthrough = parser.parse_known_args()
  passthrough = [a for a in passthrough if a != "--"]
  passthrough += ["--rounds", "1", "--steps", str(args.steps), "--matmul_repeats", "3"]
  rates = {name: [] for name in args.variants}
  for r in range(args.rounds):
    for name in args.variants:
      result = run_variant(VARIANTS[name], passthrough)
      if "error" not in result:
        rates[name].append(result["img_per_sec"])
      print(json.dumps({"round": r, "variant": name, "flags": VARIANTS[name],
                        **{k: result.get(k) for k in ("img_per_sec", "fraction_of_peak", "load_avg_1m",
                                                      "jax_matmul_tflops", "compile_s", "error")}}),
          flush=True)
  base = statistics.median(rates["baseline"]) if rates.get("baseline") else None
  for name in args.variants:
    med = statistics.median(rates[name]) if rates[name] else None
    print(json.dumps({"summary": name, "flags": VARIANTS[name], "median_img_per_sec": med,
                      "per_round": rates[name],
                      "vs_baseline": (med / base) if (med and base) else None}), flush=True)


if __name__ == "__main__":
  main()
