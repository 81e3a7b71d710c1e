#!/usr/bin/env bash
# N local processes on 127.0.0.1 running simmim-pretrain with jax.distributed: the multi-host code path
# (per-process data shards, global arrays, gloo collectives, process-0-only writing) on one machine.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/cpu_multiprocess.sh --num_processes=N [--devices_per_process=K] [--port=P] [--dry-run] -- ARGS...

Starts N processes of `python -m simmim_jax.main ARGS --coordinator_address=127.0.0.1:P --num_processes=N
--process_id=I`, each with K CPU devices (default 1), and waits for all of them. Exits non-zero if any
process fails (the others are then stopped). PYTHON selects the interpreter (default: python3).
Example:
  launch/cpu_multiprocess.sh --num_processes=2 -- --config=demo --workdir=/tmp/demo2
USAGE
}

num_processes="" devices_per_process=1 port="" dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --num_processes=*) num_processes="${1#*=}" ;;
    --devices_per_process=*) devices_per_process="${1#*=}" ;;
    --port=*) port="${1#*=}" ;;
    --dry-run|--dry_run) dry_run=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ -n "$num_processes" ] || { echo "--num_processes is required (see --help)" >&2; exit 2; }
python="${PYTHON:-python3}"
if [ -z "$port" ]; then
  port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi

args=$(printf '%q ' "$@")
commands=()
for ((i = 0; i < num_processes; i++)); do
  commands+=("JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=$devices_per_process $python -m simmim_jax.main $args\
--coordinator_address=127.0.0.1:$port --num_processes=$num_processes --process_id=$i")
done
if [ "$dry_run" = 1 ]; then
  printf '%s\n' "${commands[@]}"
  exit 0
fi

pids=()
cleanup() { for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT
for ((i = 0; i < num_processes; i++)); do
  # XLA_FLAGS could force another device count; JAX_NUM_CPU_DEVICES sets it per process.
  env -u XLA_FLAGS bash -c "${commands[$i]}" &
  pids+=($!)
done
status=0
remaining=("${pids[@]}")
while [ ${#remaining[@]} -gt 0 ]; do
  if wait -n -p finished "${remaining[@]}"; then code=0; else code=$?; fi
  remaining=("${remaining[@]/$finished}")
  remaining=(${remaining[@]})
  if [ "$code" -ne 0 ]; then
    echo "process with pid $finished exited with status $code; stopping the others" >&2
    status=$code
    break
  fi
done
[ "$status" -eq 0 ] && trap - EXIT
exit "$status"
