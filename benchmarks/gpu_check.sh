#!/usr/bin/env bash
# One prepared GPU check, under 8 minutes on one card (each case has its own time limit; they sum to 450 s):
#   * SimMIM pretraining train steps in bfloat16 (the real jitted step, `benchmarks/train_throughput.py`):
#     ViT-B/16 at 224 (the HF / plain layout, so that PyTorch runs the same model) and Swin-B at 192 (window 6),
#     each with both attention paths (`attention_impl` einsum and dot_product_attention; the latter is cuDNN
#     flash attention where the shapes qualify: plain ViT-B (197 tokens, no bias, head_dim 64) and Swin-B w6
#     (36 tokens, bias, head_dim 32) do); img/s, model TFLOP/s, MFU against the card's datasheet peak
#     (`simmim_jax/models/flops.py`), the card's measured bf16 matmul rate and JAX's peak device memory;
#   * the same step in PyTorch AMP (bf16 autocast) from HF transformers' ViT / Swin SimMIM models, timed in
#     interleaved rounds in the same run, when torch with CUDA is importable (einsum cases);
#   * 50 steps of the real train step on one fixed batch of demo images (`benchmarks/demo_loss_check.py`,
#     configs/demo.py in bfloat16): the loss must fall, else the script exits 1.
# One JSON line per case in $OUT/gpu_check.jsonl (a failed or timed-out case gives {"case", "error"}), logs
# beside it, a table on stdout. Exit 0 when every case ran and the loss fell, else 1.
#
#   bash benchmarks/gpu_check.sh --dry-run   # prints the cases and commands; runs nothing (works on CPU)
#
# Needs no TensorFlow and no network. It needs jax (CUDA), flax, optax, ml-collections, Pillow and the
# scikit-image wheel's bundled photos (found without importing skimage); the device machine has jax, flax,
# optax, torch and transformers. Carry the rest as wheels from this machine:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl ml-collections==1.1.0 scikit-image pillow
#
# then the device tool's run with carry [".whl"], timeout_s 600 and the command
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       .whl/*.whl && export PYTHONPATH=/tmp/site || exit; bash benchmarks/gpu_check.sh
# Record the JSON lines in BENCHMARKS.md (GPU section) with the card's name and the versions ($OUT/env.txt).
# Targets (issue 8): ViT-B/16 224 bf16 >= 45% MFU (about 4,200 img/s on an H100) and >= 1.5x PyTorch AMP.
set -uo pipefail
cd "$(dirname "$0")/.."
dry_run=0
case "${1:-}" in
  --dry-run) dry_run=1 ;;
  "") ;;
  *) echo "gpu_check.sh: unknown argument '$1'; use --dry-run or nothing" >&2; exit 2 ;;
esac
PYTHON="${PYTHON:-python3}"
out="${OUT:-/tmp/gpu_check}"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
# JAX and PyTorch share the card: JAX takes at most half of its memory, PyTorch the rest.
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.45
export XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true ${XLA_FLAGS:-}"
export TF_CPP_MIN_LOG_LEVEL=2
COMMON=(--dtype bfloat16 --rounds 2 --steps 10 --warmup 3 --matmul_repeats 10)
# name | time limit (s) | compare with PyTorch (if available) | train_throughput.py arguments
CASES=(
  "vit_b16_224_einsum|105|torch|--preset vit_b16 --batch 128 --attention_impl einsum"
  "vit_b16_224_dot_product_attention|65||--preset vit_b16 --batch 128 --attention_impl dot_product_attention"
  "swin_b_192_w6_einsum|130|torch|--preset swin_b192 --batch 128 --attention_impl einsum"
  "swin_b_192_w6_dot_product_attention|100||--preset swin_b192 --batch 128 --attention_impl dot_product_attention"
)
DEMO=(demo_loss 50 benchmarks/demo_loss_check.py --steps 50 --batch 64 --dtype bfloat16)

if (( dry_run )); then
  echo "gpu_check.sh --dry-run: would write $out/gpu_check.jsonl with one JSON line per case:"
  for spec in "${CASES[@]}"; do
    IFS='|' read -r name limit compare args <<< "$spec"
    extra=""; [[ -n "$compare" ]] && extra=" [--compare torch if torch with CUDA is importable]"
    echo "case $name (limit ${limit}s): $PYTHON benchmarks/train_throughput.py $args ${COMMON[*]} --case $name$extra"
  done
  echo "case ${DEMO[0]} (limit ${DEMO[1]}s; exit 1 if the loss does not fall): $PYTHON ${DEMO[*]:2}"
  exit 0
fi

mkdir -p "$out"
: > "$out/gpu_check.jsonl"
"$PYTHON" - <<'EOF' | tee "$out/env.txt"
import jax, flax, optax
line = f"jax {jax.__version__} flax {flax.__version__} optax {optax.__version__}"
try:
  import torch, transformers
  line += f" torch {torch.__version__} (cuda {torch.version.cuda}) transformers {transformers.__version__}"
except ImportError:
  line += " torch: not importable"
print(line, "devices", jax.devices(), "kind", jax.devices()[0].device_kind)
EOF
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version --format=csv \
      | tee -a "$out/env.txt"
fi
if "$PYTHON" -c "import torch, transformers, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2> /dev/null; then
  torch_ok=1
else
  torch_ok=0; echo "PyTorch with CUDA is not importable: no PyTorch comparison" >&2
fi

failed=()
record_failure() {  # name, exit status
  local why="exit $2"; [[ $2 -eq 124 || $2 -eq 137 ]] && why="timed out (exit $2)"
  echo "{\"case\": \"$1\", \"error\": \"$why\", \"log\": \"$out/$1.log\"}" >> "$out/gpu_check.jsonl"
  failed+=("$1")
  tail -n 5 "$out/$1.log" >&2
}
for spec in "${CASES[@]}"; do
  IFS='|' read -r name limit compare args <<< "$spec"
  extra=(); [[ -n "$compare" && $torch_ok -eq 1 ]] && extra=(--compare torch)
  echo "== $name" >&2
  # shellcheck disable=SC2086  # $args is a list of arguments
  timeout -k 10 "$limit" "$PYTHON" benchmarks/train_throughput.py $args "${COMMON[@]}" --case "$name" \
      ${extra[@]+"${extra[@]}"} > "$out/$name.json" 2> "$out/$name.log"
  status=$?
  if [[ $status -eq 0 && -s "$out/$name.json" ]]; then
    tail -n 1 "$out/$name.json" >> "$out/gpu_check.jsonl"
  else
    record_failure "$name" "$status"
  fi
done
echo "== ${DEMO[0]}" >&2
timeout -k 10 "${DEMO[1]}" "$PYTHON" "${DEMO[@]:2}" > "$out/${DEMO[0]}.json" 2> "$out/${DEMO[0]}.log"
status=$?
if [[ -s "$out/${DEMO[0]}.json" ]]; then tail -n 1 "$out/${DEMO[0]}.json" >> "$out/gpu_check.jsonl"; fi
if [[ $status -ne 0 && -s "$out/${DEMO[0]}.json" ]]; then  # it ran: the loss did not fall
  failed+=("${DEMO[0]}"); tail -n 2 "$out/${DEMO[0]}.log" >&2
elif [[ $status -ne 0 ]]; then
  record_failure "${DEMO[0]}" "$status"
fi

"$PYTHON" - "$out/gpu_check.jsonl" <<'EOF'
import json, sys
print(f"{'case':38} {'img/s':>8} {'TFLOP/s':>8} {'MFU':>6} {'matmul':>7} {'peak GiB':>8} {'torch img/s':>11} "
      f"{'speedup':>7}")
for line in open(sys.argv[1]):
  r = json.loads(line)
  if "error" in r:
    print(f"{r['case']:38} FAILED: {r['error']} (see {r['log']})")
  elif r["case"] == "demo_loss":
    print(f"{r['case']:38} loss {r['first5_loss']:.4f} -> {r['last10_loss']:.4f} (x{r['ratio']:.2f}, needs < "
          f"x{r['max_ratio']}): {'passed' if r['passed'] else 'FAILED'}")
  else:
    mfu = f"{r['mfu']:.1%}" if r["mfu"] else "-"
    peak = f"{r['peak_bytes_in_use'] / 2 ** 30:.1f}" if r.get("peak_bytes_in_use") else "-"
    print(f"{r['case']:38} {r['img_per_sec']:8.0f} {r['tflops']:8.1f} {mfu:>6} {r['matmul_peak_tflops']:7.0f} "
          f"{peak:>8} {r['torch_img_per_sec'] or 0:11.0f} {r['speedup_vs_torch'] or 0:7.2f}")
EOF
if (( ${#failed[@]} )); then
  echo "gpu_check.sh: failed: ${failed[*]} (logs in $out)" >&2
  exit 1
fi
echo "gpu_check.sh: every case ran and the demo loss fell; JSON lines in $out/gpu_check.jsonl" >&2
