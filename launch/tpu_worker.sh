#!/usr/bin/env bash
# Runs on each TPU VM worker, in the unpacked repository (launch/tpu_pod.sh starts it there):
# picks a python >= 3.11, keeps a venv in .venv, and starts training detached from the ssh
# session, so a dropped connection does not end the run.
#   launch/tpu_worker.sh LOG_NAME [section.key=value ...]     (trains run-config.yaml)
# Env: SETUP=0 skips `pip install -e .[tpu]` into the venv; SHARED_DIR must exist here when set.
# Output goes to logs/LOG_NAME.log and the training pid to logs/LOG_NAME.pid; this script returns
# as soon as training has started.
set -euo pipefail
LOG_NAME=$1; shift
say() { echo "tpu_worker [$(hostname)]: $*" >&2; }

if [ -n "${SHARED_DIR:-}" ] && [ ! -d "$SHARED_DIR" ]; then
  say "SHARED_DIR=$SHARED_DIR is not a directory on this worker; mount the shared storage on every worker first"
  exit 2
fi

if [ ! -x .venv/bin/python ]; then
  py=""
  for candidate in python3.13 python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      py=$candidate; break
    fi
  done
  if [ -z "$py" ]; then
    say "no python >= 3.11 (python3 is $(python3 --version 2>&1 || echo missing)); install one, e.g. sudo apt-get install -y python3.11 python3.11-venv, or use a newer TPU VM image"
    exit 2
  fi
  "$py" -m venv .venv 2>/dev/null || {
    say "$py cannot make a venv; install its venv module, e.g. sudo apt-get install -y $(basename "$py")-venv"
    exit 2
  }
fi
[ "${SETUP:-1}" = 1 ] && .venv/bin/python -m pip install -q -e '.[tpu]'

mkdir -p logs
# setsid: a new session, so the ssh session's hangup never reaches training; nohup for good
# measure. SIGTERM to the pid in the .pid file makes jaxlm save a checkpoint and exit.
setsid nohup .venv/bin/python -m jaxlm.cli train run-config.yaml "$@" \
  > "logs/$LOG_NAME.log" 2>&1 < /dev/null &
echo $! > "logs/$LOG_NAME.pid"
say "training started, pid $!, log $PWD/logs/$LOG_NAME.log"
