#!/usr/bin/env bash
# Train on every worker (host) of a Cloud TPU VM pod slice with one config.
#   SHARED_DIR=/mnt/shared launch/tpu_pod.sh TPU_NAME ZONE CONFIG [section.key=value ...]
# Env: SHARED_DIR (required): a directory mounted at the same path on every worker (Filestore /
#      NFS, or a Cloud Storage bucket mounted with gcsfuse); train.run_dir must lie under it.
#      PROJECT (gcloud's default if unset), REMOTE_DIR (jaxlm, under each worker's home),
#      SETUP=0 to skip `pip install -e .[tpu]` into the workers' venv (already installed).
# Copies this working tree (tracked and untracked-but-not-ignored files) and CONFIG to all
# workers; each worker (launch/tpu_worker.sh) finds a python >= 3.11, keeps a venv in
# REMOTE_DIR/.venv and starts training detached, logging to REMOTE_DIR/logs/<run>.log on that
# worker. jaxlm finds the TPU chips and calls jax.distributed.initialize(), which learns the
# other workers from the TPU metadata. Every worker writes its checkpoint shards into
# train.run_dir, so it must be shared; jaxlm writes it with plain file I/O, so a gs:// URL does
# not work (mount the bucket instead). data.path must be set and exist on every worker.
# Check the config fits first, here:  jaxlm compile CONFIG --topology v5p:2x4x4
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: SHARED_DIR=DIR $0 TPU_NAME ZONE CONFIG [section.key=value ...]" >&2
  exit 2
fi
TPU=$1; ZONE=$2; CONFIG=$3; shift 3
REMOTE_DIR=${REMOTE_DIR:-jaxlm}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
fail() { echo "tpu_pod.sh: $*" >&2; exit 2; }

[ -f "$CONFIG" ] || fail "config $CONFIG does not exist"
value() { local key=$1; shift; "${PYTHON:-python3}" "$ROOT/launch/config_value.py" "$key" "$CONFIG" "$@"; }
if [ -z "$(value data.path "$@")$(value data.mixture "$@")" ]; then
  fail "$CONFIG has no data.path (nor data.mixture), so the pod would train on the built-in default corpus (the Python standard library); add data.path=DIR, a \`jaxlm prepare\` directory that every worker can read"
fi
run_dir=$(value train.run_dir "$@")
case "$run_dir" in
  *://*) fail "train.run_dir=$run_dir: jaxlm writes the run directory with plain file I/O, so URLs do not work; mount the bucket on every worker (gcsfuse) and set train.run_dir to a path under that mount" ;;
esac
case "${SHARED_DIR:-}" in
  /*) shared=${SHARED_DIR%/} ;;
  *) fail "train.run_dir=$run_dir must be on storage every worker shares; set SHARED_DIR to the absolute path of a directory mounted on all workers, and train.run_dir under it" ;;
esac
case "$run_dir/" in
  "$shared"/*) ;;
  *) fail "train.run_dir=$run_dir is not under SHARED_DIR=$shared, so each worker would write its own; set train.run_dir=$shared/<run name>" ;;
esac

gcloud_args=(--zone="$ZONE")
[ -n "${PROJECT:-}" ] && gcloud_args+=(--project="$PROJECT")
bundle=$(mktemp -d)
trap 'rm -rf "$bundle"' EXIT
(cd "$ROOT" && git ls-files -co --exclude-standard -z | tar --null -T - -czf "$bundle/jaxlm.tar.gz")
cp "$CONFIG" "$bundle/run-config.yaml"  # the config may live outside the repo

gcloud compute tpus tpu-vm scp "$bundle/jaxlm.tar.gz" "$bundle/run-config.yaml" "$TPU:" --worker=all "${gcloud_args[@]}"

log_name="train-$(date +%Y%m%d-%H%M%S)"
overrides=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --worker=all "${gcloud_args[@]}" --command "
  set -e
  mkdir -p $REMOTE_DIR && tar -xzf jaxlm.tar.gz -C $REMOTE_DIR && mv run-config.yaml $REMOTE_DIR/
  cd $REMOTE_DIR && SETUP=${SETUP:-1} SHARED_DIR=$(printf '%q' "$shared") bash launch/tpu_worker.sh $log_name $overrides"

ssh_cmd="gcloud compute tpus tpu-vm ssh $TPU ${gcloud_args[*]}"
cat <<EOF
tpu_pod.sh: training runs detached on every worker of $TPU; metrics and checkpoints in $run_dir.
  follow worker 0 (it logs the metrics):  $ssh_cmd --worker=0 --command 'tail -f $REMOTE_DIR/logs/$log_name.log'
  another worker N:                       $ssh_cmd --worker=N --command 'tail -f $REMOTE_DIR/logs/$log_name.log'
  stop (saves a checkpoint first):        $ssh_cmd --worker=all --command 'kill -TERM \$(cat $REMOTE_DIR/logs/$log_name.pid)'
EOF
