#!/usr/bin/env bash
# Cloud TPU VM (single host or pod slice) or several slices (multi-slice, through a queued resource): create,
# install on every worker, copy the code, run simmim-pretrain on all workers at once, stream logs, delete.
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
  --num_slices=N              N > 1: multi-slice. N slices of --accelerator_type as one queued resource
                              (`gcloud compute tpus queued-resources create --node-count=N`), joined by the
                              data-centre network; the run gets --config.mesh.slices=N (data parallel across
                              slices, FSDP within one: simmim_jax/train/sharding.py)
  --dry-run                   print the commands instead of running them
Everything after `--` goes to simmim-pretrain on every worker, e.g.
  launch/tpu_vm.sh all --name=simmim --zone=us-central2-b --accelerator_type=v4-32 -- \
      --config=pretrain/vit_base_800ep --workdir=gs://BUCKET/simmim/vit_b \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets
Multi-slice (2 x v5p-128; check it first: simmim-aot --topology=v5p:4x4x4 --num_slices=2 ...):
  launch/tpu_vm.sh all --name=simmim --zone=us-east5-a --accelerator_type=v5p-128 --num_slices=2 -- \
      --config=pretrain/swinv2_huge_800ep --workdir=gs://BUCKET/simmim/swinv2_h --config.mesh.fsdp=64
Put the workdir and data on GCS: every worker reads its own shard, process 0 writes metrics, and
rerunning `run` resumes from the latest checkpoint. jax.distributed is initialized automatically on
multi-worker slices.
USAGE
}

step="${1:-}"
[ -n "$step" ] || { usage; exit 2; }
shift
if [ "$step" = "-h" ] || [ "$step" = "--help" ]; then usage; exit 0; fi
name="" zone="" accelerator_type="" version="tpu-ubuntu2204-base" project="" spot="" dry_run=0 num_slices=1
while [ $# -gt 0 ]; do
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --accelerator_type=*) accelerator_type="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --project=*) project="--project=${1#*=}" ;;
    --spot) spot="--spot" ;;
    --num_slices=*) num_slices="${1#*=}" ;;
    --dry-run|--dry_run) dry_run=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ -n "$name" ] && [ -n "$zone" ] || { echo "--name and --zone are required (see --help)" >&2; exit 2; }
[[ "$num_slices" =~ ^[1-9][0-9]*$ ]] || { echo "--num_slices=$num_slices: use a positive integer" >&2; exit 2; }
if [ "$num_slices" -gt 1 ]; then set -- "$@" "--config.mesh.slices=$num_slices"; fi
pretrain_args=$(printf '%q ' "$@")
remote_dir="simmim_jax"
tpu=(gcloud compute tpus tpu-vm)
where=("--zone=$zone" ${project:+"$project"})

run() {  # prints (dry run) or runs one command
  if [ "$dry_run" = 1 ]; then show "$@"; else "$@"; fi
}
queued=(gcloud compute tpus queued-resources)
# Multi-slice: the queued resource NAME holds the nodes NAME-0 .. NAME-(N-1) (--node-prefix=NAME), one per slice.
nodes() { if [ "$num_slices" -gt 1 ]; then seq -f "$name-%g" 0 $((num_slices - 1)); else echo "$name"; fi; }
on_all_workers() {
  if [ "$num_slices" -gt 1 ]; then
    run "${queued[@]}" ssh "$name" "${where[@]}" --node=all --worker=all --command="$1"
  else
    run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="$1"
  fi
}

do_create() {
  [ -n "$accelerator_type" ] || { echo "--accelerator_type is required to create" >&2; exit 2; }
  if [ "$num_slices" -gt 1 ]; then
    run "${queued[@]}" create "$name" "${where[@]}" --node-count="$num_slices" --node-prefix="$name" \
      --accelerator-type="$accelerator_type" --runtime-version="$version" ${spot:+"$spot"}
    # The request is queued: its nodes exist once it is ACTIVE.
    local wait_active="until [ \"\$(${queued[*]} describe $name ${where[*]} --format='value(state.state)')\" = ACTIVE ]; do sleep 30; done"
    if [ "$dry_run" = 1 ]; then echo "$wait_active"; else bash -c "$wait_active"; fi
  else
    run "${tpu[@]}" create "$name" "${where[@]}" --accelerator-type="$accelerator_type" --version="$version" ${spot:+"$spot"}
  fi
}
do_copy() {
  local archive=/tmp/simmim_jax_code.tgz
  run tar czf "$archive" --exclude='.venv*' --exclude=.git --exclude=workdir -C "$(dirname "$0")/.." .
  local node
  for node in $(nodes); do run "${tpu[@]}" scp "$archive" "$node:~/simmim_jax_code.tgz" "${where[@]}" --worker=all; done
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
do_logs() { run "${tpu[@]}" ssh "$(nodes | head -n 1)" "${where[@]}" --worker=0 --command="tail -n 100 -f ~/simmim_pretrain.log"; }
do_delete() {
  if [ "$num_slices" -gt 1 ]; then
    run "${queued[@]}" delete "$name" "${where[@]}" --force --quiet  # --force: its nodes too
  else
    run "${tpu[@]}" delete "$name" "${where[@]}" --quiet
  fi
}

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
