#!/usr/bin/env bash
# Run N training processes on this machine, joined as a multi-host run over CPU devices.
#
#     launch/local.sh N [train flags...]
#     launch/local.sh 2 --config=configs/synthetic_tiny.py:smoke --workdir=runs/two_procs
#
# For trying a multi-host run (sharding over hosts, per-host data, joint checkpoints, resume)
# without a cluster. Each process runs `python -m tcjepa_jax.train FLAGS` with
# --coordinator_address=localhost:PORT --num_processes=N --process_id=I and K CPU devices
# (JAX_PLATFORMS=cpu, XLA_FLAGS=--xla_force_host_platform_device_count=K), K = D / N.
#
# Environment:
#   TCJEPA_LOCAL_DEVICES  D, CPU devices over all processes (default 8; N must divide it)
#   TCJEPA_PORT           the coordinator's port (default: a free one)
#   PYTHON                the interpreter (default: python on PATH)
#
# Process 0 writes to this terminal; process I > 0 to WORKDIR/local_logs/process_I.log (a
# temporary directory when no --workdir is given). If a process fails, the others are killed,
# the tail of the failed process's log is printed, and the exit status is non-zero. Ctrl-C (or
# SIGTERM) is passed on to every process as SIGTERM: each saves a checkpoint at its next step
# and exits; a second Ctrl-C kills them.
set -euo pipefail

usage() { echo "usage: $0 NUM_PROCESSES [train flags...]" >&2; exit 2; }
[ $# -ge 1 ] || usage
num=$1
shift
case "$num" in ''|*[!0-9]*) usage ;; esac
[ "$num" -ge 1 ] || usage

python=${PYTHON:-python}
devices=${TCJEPA_LOCAL_DEVICES:-8}
case "$devices" in
  ''|*[!0-9]*) echo "error: TCJEPA_LOCAL_DEVICES=$devices is not a number" >&2; exit 2 ;;
esac
if [ "$devices" -lt "$num" ] || [ $((devices % num)) -ne 0 ]; then
  echo "error: $num processes cannot share TCJEPA_LOCAL_DEVICES=$devices CPU devices evenly" >&2
  exit 2
fi
per_process=$((devices / num))

# The workdir from the flags (--workdir=DIR or --workdir DIR); the last one wins, as in absl.
workdir=""
prev=""
for arg in "$@"; do
  case "$arg" in
    --workdir=*) workdir=${arg#--workdir=} ;;
    *) if [ "$prev" = "--workdir" ]; then workdir=$arg; fi ;;
  esac
  prev=$arg
done
for arg in "$@"; do
  case "$arg" in
    --coordinator_address*|--num_processes*|--process_id*)
      echo "error: $0 sets $arg itself; leave it out" >&2; exit 2 ;;
  esac
done
if [ -n "$workdir" ]; then
  logdir="$workdir/local_logs"
else
  logdir=$(mktemp -d "${TMPDIR:-/tmp}/tcjepa-local-logs.XXXXXX")
fi
mkdir -p "$logdir"

port=${TCJEPA_PORT:-}
if [ -z "$port" ]; then
  port=$("$python" -c 'import socket
s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')
fi

# XLA_FLAGS from the caller, less any device count of theirs.
xla_flags=$(printf '%s' "${XLA_FLAGS:-}" |
  sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g; s/  +/ /g; s/^ //; s/ $//')
xla_flags="${xla_flags} --xla_force_host_platform_device_count=${per_process}"
xla_flags=${xla_flags# }

echo "local.sh: $num process(es) x $per_process CPU devices, coordinator localhost:$port" >&2
if [ "$num" -gt 1 ]; then
  echo "local.sh: output of processes 1..$((num - 1)) in $logdir/process_I.log" >&2
fi

pids=()
interrupts=0
stop_status=0
forward() {  # $1: the signal received, $2: the exit status it means
  interrupts=$((interrupts + 1))
  stop_status=$2
  if [ "$interrupts" -eq 1 ]; then
    echo "local.sh: $1: asking every process to save a checkpoint and stop (again to kill)" >&2
    kill -TERM ${pids[@]+"${pids[@]}"} 2>/dev/null || true
  else
    echo "local.sh: $1 again: killing every process" >&2
    kill -KILL ${pids[@]+"${pids[@]}"} 2>/dev/null || true
  fi
}
trap 'forward SIGINT 130' INT
trap 'forward SIGTERM 143' TERM

for ((i = 0; i < num; i++)); do
  flags=(--coordinator_address="localhost:$port" --num_processes="$num" --process_id="$i")
  if [ "$i" -eq 0 ]; then
    JAX_PLATFORMS=cpu XLA_FLAGS="$xla_flags" "$python" -m tcjepa_jax.train "$@" "${flags[@]}" &
  else
    JAX_PLATFORMS=cpu XLA_FLAGS="$xla_flags" "$python" -m tcjepa_jax.train "$@" "${flags[@]}" \
      >"$logdir/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done

# Wait for all; on the first failure kill the others (they would wait for the failed one in
# their next collective). Polling keeps this working in bash 3 (macOS), which has no `wait -n`.
status=0
running=$num
done_=()
for ((i = 0; i < num; i++)); do done_+=(0); done
while [ "$running" -gt 0 ]; do
  for ((i = 0; i < num; i++)); do
    [ "${done_[$i]}" -eq 0 ] || continue
    kill -0 "${pids[$i]}" 2>/dev/null && continue
    rc=0
    wait "${pids[$i]}" || rc=$?
    done_[$i]=1
    running=$((running - 1))
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
      status=$rc
      echo "local.sh: process $i exited with status $rc; stopping the others" >&2
      for ((j = 0; j < num; j++)); do
        [ "${done_[$j]}" -eq 1 ] || kill -KILL "${pids[$j]}" 2>/dev/null || true
      done
      if [ "$i" -gt 0 ]; then
        echo "---- last lines of $logdir/process_$i.log ----" >&2
        tail -n 40 "$logdir/process_$i.log" >&2 || true
        echo "----" >&2
      fi
    fi
  done
  [ "$running" -eq 0 ] || sleep 1
done

if [ "$status" -eq 0 ] && [ "$interrupts" -gt 0 ]; then
  status=$stop_status  # stopped on request, after the processes saved their checkpoint
fi
exit "$status"
