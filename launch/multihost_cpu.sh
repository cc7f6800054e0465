#!/usr/bin/env bash
# N jax processes on 127.0.0.1, each with DEVICES_PER_PROCESS simulated CPU devices and gloo
# collectives: the multi-host code paths (process-local data, cross-process collectives) on
# one machine.
#   launch/multihost_cpu.sh N CONFIG [section.key=value ...]
# Env: DEVICES_PER_PROCESS (4), TIME_LIMIT seconds for the whole run (3600), PYTHON (python3).
# Output lines are prefixed "[p<i>]". If any process exits non-zero (or the time limit
# passes) the others are stopped and this script exits non-zero naming that process: a
# lost peer never leaves the rest waiting on a collective.
set -uo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 N CONFIG [section.key=value ...]" >&2
  exit 2
fi
N=$1; CONFIG=$2; shift 2
K=${DEVICES_PER_PROCESS:-4}
LIMIT=${TIME_LIMIT:-3600}
PY=${PYTHON:-python3}
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

pids=()
stop_all() {  # TERM first (lets jax flush), KILL whatever is left after 5 s, then reap all
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for _ in $(seq 50); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done
}
trap 'echo "multihost_cpu: interrupted; stopping all processes" >&2; stop_all; exit 130' INT TERM

for ((i = 0; i < N; i++)); do
  XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$K" JAX_PLATFORMS=cpu PYTHONUNBUFFERED=1 \
  JAXLM_COORDINATOR="127.0.0.1:$PORT" JAXLM_NUM_PROCESSES="$N" JAXLM_PROCESS_ID="$i" \
    "$PY" -m jaxlm.cli train "$CONFIG" "$@" > >(sed -u "s/^/[p$i] /") 2>&1 &
  pids+=($!)
  echo "multihost_cpu: process $i is pid $! (coordinator 127.0.0.1:$PORT, $K devices)" >&2
done

# Poll rather than `wait`: we must notice the first failure while the others still run.
start=$SECONDS
remaining=$N
declare -A done_
while [ "$remaining" -gt 0 ]; do
  for ((i = 0; i < N; i++)); do
    pid=${pids[$i]}
    [ -n "${done_[$i]:-}" ] && continue
    kill -0 "$pid" 2>/dev/null && continue
    wait "$pid"; rc=$?
    done_[$i]=1; remaining=$((remaining - 1))
    if [ "$rc" != 0 ]; then
      echo "multihost_cpu: process $i (pid $pid) died with exit status $rc; stopping the others" >&2
      stop_all
      exit "$rc"
    fi
  done
  if [ $((SECONDS - start)) -ge "$LIMIT" ]; then
    echo "multihost_cpu: time limit of ${LIMIT}s reached; stopping all processes" >&2
    stop_all
    exit 124
  fi
  sleep 0.2
done
echo "multihost_cpu: all $N processes finished" >&2
