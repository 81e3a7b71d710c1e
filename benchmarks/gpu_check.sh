#!/usr/bin/env bash
# One prepared GPU check (H100 / H200), within 10 minutes: SimMIM bf16 train steps of ViT-B/16 at 224 and
# Swin-B at 192 (window 6), img/s, model TFLOP/s and MFU, each against the HF PyTorch AMP (bf16 autocast)
# baseline on the same card in the same run (interleaved rounds), plus the card's measured bf16 matmul rate.
#
# Not yet run: no GPU has been lent to the sessions that wrote it. A session with one runs, from the
# repository root on this machine (the device machine has jax, flax, optax, orbax, torch, transformers, but no
# TensorFlow, no ml-collections and no network; this script never imports the tf.data pipeline):
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       -d .whl ml-collections==1.1.0          # pure Python (py3-none-any): no --platform needed
#
# then the device tool's run with carry [".whl"], timeout_s 600 and the command
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       .whl/*.whl && export PYTHONPATH=/tmp/site || exit; bash benchmarks/gpu_check.sh
# The JSON lines land in $OUT/gpu_check.jsonl; record them in BENCHMARKS.md with the card's name.
# Targets (issue 8): ViT-B/16 224 bf16 >= 45% MFU (about 4,200 img/s on an H100) and >= 1.5x PyTorch AMP.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu_check}"; mkdir -p "$out"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
# JAX and PyTorch share the card: JAX takes at most half of its memory, PyTorch the rest.
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.45
export XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true ${XLA_FLAGS:-}"
export TF_CPP_MIN_LOG_LEVEL=2
python3 - <<'EOF' | tee "$out/env.txt"
import jax, flax, optax, torch, transformers, ml_collections
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, "torch", torch.__version__,
      "transformers", transformers.__version__, "devices", jax.devices(), "kind", jax.devices()[0].device_kind)
EOF
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv | tee -a "$out/env.txt"

run() {  # name, then train_throughput.py arguments; each case bounded so the whole script fits 10 minutes
  echo "== $1" >&2
  timeout -k 10 250 python3 benchmarks/train_throughput.py "${@:2}" --dtype bfloat16 --compare torch \
      --rounds 3 --steps 10 --warmup 3 --matmul_repeats 20 2> "$out/$1.log" | tee -a "$out/gpu_check.jsonl"
  tail -n 5 "$out/$1.log" >&2
}
run vit_b16_224 --preset vit_b16 --batch 128
run swin_b_192 --preset swin_b192 --batch 128
python3 - "$out/gpu_check.jsonl" <<'EOF'
import json, sys
print(f"{'case':10} {'img/s':>8} {'TFLOP/s':>8} {'MFU':>6} {'matmul':>7} {'torch img/s':>11} {'speedup':>7}")
for line in open(sys.argv[1]):
  r = json.loads(line)
  mfu = f"{r['mfu']:.1%}" if r["mfu"] else "-"
  print(f"{r['preset']:10} {r['img_per_sec']:8.0f} {r['tflops']:8.1f} {mfu:>6} {r['matmul_peak_tflops']:7.0f} "
        f"{r['torch_img_per_sec'] or 0:11.0f} {r['speedup_vs_torch'] or 0:7.2f}")
EOF
