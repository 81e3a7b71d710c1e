#!/usr/bin/env bash
# Cloud TPU VM (single host or pod slice): create, install on every worker, copy the code, run
# simmim-pretrain on all workers at once, stream logs, delete.
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
Usage: launch/tpu_vm.sh STEP [options] [--dry-run] [-- SIMMIM_PRETRAIN_ARGS...]

Steps: create | copy | setup | run | logs | delete | all (= create, copy, setup, run, delete)
Options:
  --name=NAME                 TPU VM name (required)
  --zone=ZONE                 e.g. us-central2-b (required)
  --accelerator_type=TYPE     e.g. v4-8, v4-32, v5p-64 (create)
  --version=RUNTIME           TPU software version (default: tpu-ubuntu2204-base)
  --project=PROJECT           gcloud project (default: gcloud's configured one)
  --spot                      create a Spot TPU (preemptible; the run resumes from its workdir on restart)
  --dry-run                   print the commands instead of running them
Everything after `--` goes to simmim-pretrain on every worker, e.g.
  launch/tpu_vm.sh all --name=simmim --zone=us-central2-b --accelerator_type=v4-32 -- \
      --config=pretrain/vit_base_800ep --workdir=gs://BUCKET/simmim/vit_b \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets
Put the workdir and data on GCS: every worker reads its own shard, process 0 writes metrics, and
rerunning `run` resumes from the latest checkpoint. jax.distributed is initialized automatically on
multi-worker slices.
USAGE
}

step="${1:-}"
[ -n "$step" ] || { usage; exit 2; }
shift
if [ "$step" = "-h" ] || [ "$step" = "--help" ]; then usage; exit 0; fi
name="" zone="" accelerator_type="" version="tpu-ubuntu2204-base" project="" spot="" dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --accelerator_type=*) accelerator_type="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --project=*) project="--project=${1#*=}" ;;
    --spot) spot="--spot" ;;
    --dry-run|--dry_run) dry_run=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ -n "$name" ] && [ -n "$zone" ] || { echo "--name and --zone are required (see --help)" >&2; exit 2; }
pretrain_args=$(printf '%q ' "$@")
remote_dir="simmim_jax"
tpu=(gcloud compute tpus tpu-vm)
where=("--zone=$zone" ${project:+"$project"})

run() {  # prints (dry run) or runs one command
  if [ "$dry_run" = 1 ]; then show "$@"; else "$@"; fi
}
on_all_workers() { run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="$1"; }

do_create() {
  [ -n "$accelerator_type" ] || { echo "--accelerator_type is required to create" >&2; exit 2; }
  run "${tpu[@]}" create "$name" "${where[@]}" --accelerator-type="$accelerator_type" --version="$version" ${spot:+"$spot"}
}
do_copy() {
  local archive=/tmp/simmim_jax_code.tgz
  run tar czf "$archive" --exclude=.venv --exclude=.git --exclude=workdir -C "$(dirname "$0")/.." .
  run "${tpu[@]}" scp "$archive" "$name:~/simmim_jax_code.tgz" "${where[@]}" --worker=all
  on_all_workers "mkdir -p ~/$remote_dir && tar xzf ~/simmim_jax_code.tgz -C ~/$remote_dir"
}
do_setup() {
  # uv provides Python 3.12 (JAX >= 0.11 needs it) whatever the image's system Python is.
  on_all_workers "cd ~/$remote_dir && pip install -q uv && ~/.local/bin/uv venv -q -p 3.12 .venv && \
~/.local/bin/uv pip install -q -p .venv/bin/python -U 'jax[tpu]' -e '.[data]'"
}
do_run() {
  on_all_workers "cd ~/$remote_dir && .venv/bin/simmim-pretrain ${pretrain_args}2>&1 | tee -a ~/simmim_pretrain.log"
}
do_logs() { run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=0 --command="tail -n 100 -f ~/simmim_pretrain.log"; }
do_delete() { run "${tpu[@]}" delete "$name" "${where[@]}" --quiet; }

case "$step" in
  create) do_create ;;
  copy) do_copy ;;
  setup) do_setup ;;
  run) do_run ;;
  logs) do_logs ;;
  delete) do_delete ;;
  all) do_create; do_copy; do_setup; do_run; do_delete ;;
  *) echo "unknown step: $step (see --help)" >&2; exit 2 ;;
esac
