#!/usr/bin/env bash
# One host, all its GPUs: one process drives every local GPU through one jax.jit over the device mesh.
set -euo pipefail

show() {  # a command line as a person would type it: arguments with special characters in single quotes
  local out="" arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=,@+%-]+$ ]]; then out+="$arg "; else out+="'${arg//\'/\'\\\'\'}' "; fi
  done
  echo "${out% }"
}

usage() {
  cat <<'USAGE'
Usage: launch/gpu.sh [--gpus=0,1,...] [--dry-run] -- SIMMIM_PRETRAIN_ARGS...

Runs simmim-pretrain on this host's GPUs (all, or those in --gpus) with XLA flags that help GPU training.
Install first: pip install -U "jax[cuda12]" && pip install -e '.[data]'. Example:
  launch/gpu.sh -- --config=pretrain/vit_base_800ep --workdir=/data/runs/vit_b \
      --config.dtype=bfloat16 --config.data.data_dir=/data/tensorflow_datasets
For several hosts use launch/slurm.sbatch (or pass --coordinator_address/--num_processes/--process_id).
USAGE
}

gpus="" dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --gpus=*) gpus="${1#*=}" ;;
    --dry-run|--dry_run) dry_run=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
# Overlap collectives with compute; let XLA use cuDNN's fused attention through jax.nn.dot_product_attention.
xla_flags="--xla_gpu_enable_latency_hiding_scheduler=true ${XLA_FLAGS:-}"
command=(env XLA_FLAGS="$xla_flags" TF_CPP_MIN_LOG_LEVEL=2 ${gpus:+CUDA_VISIBLE_DEVICES=$gpus}
         simmim-pretrain "$@")
if [ "$dry_run" = 1 ]; then show "${command[@]}"; else exec "${command[@]}"; fi
