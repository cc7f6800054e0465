#!/usr/bin/env bash
# Train on every worker (host) of a Cloud TPU VM pod slice with one config.
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG [section.key=value ...]
# Env: PROJECT (gcloud's default if unset), REMOTE_DIR (jaxlm, under each worker's home),
#      SETUP=0 to skip `pip install -e .[tpu]` on the workers (already installed).
# Copies this working tree (tracked and untracked-but-not-ignored files) and CONFIG to all
# workers, then starts the same command on all of them at once. Each worker's jaxlm finds the
# TPU chips and calls jax.distributed.initialize(), which learns the other workers from the
# TPU metadata. train.run_dir must be on storage every worker shares (checkpoints are written
# by all hosts), e.g. a GCS FUSE or Filestore mount; data.path must exist on every worker.
# Check the config fits first, here:  jaxlm compile CONFIG --topology v5p:2x4x4
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG [section.key=value ...]" >&2
  exit 2
fi
TPU=$1; ZONE=$2; CONFIG=$3; shift 3
REMOTE_DIR=${REMOTE_DIR:-jaxlm}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
gcloud_args=(--zone="$ZONE")
[ -n "${PROJECT:-}" ] && gcloud_args+=(--project="$PROJECT")

bundle=$(mktemp -d)
trap 'rm -rf "$bundle"' EXIT
(cd "$ROOT" && git ls-files -co --exclude-standard -z | tar --null -T - -czf "$bundle/jaxlm.tar.gz")
cp "$CONFIG" "$bundle/run-config.yaml"  # the config may live outside the repo

gcloud compute tpus tpu-vm scp "$bundle/jaxlm.tar.gz" "$bundle/run-config.yaml" "$TPU:" --worker=all "${gcloud_args[@]}"

overrides=$(printf '%q ' "$@")
setup="true"
[ "${SETUP:-1}" = 1 ] && setup="python3 -m pip install -q -e '.[tpu]'"
gcloud compute tpus tpu-vm ssh "$TPU" --worker=all "${gcloud_args[@]}" --command "
  set -e
  mkdir -p $REMOTE_DIR && tar -xzf jaxlm.tar.gz -C $REMOTE_DIR && mv run-config.yaml $REMOTE_DIR/
  cd $REMOTE_DIR && $setup
  python3 -m jaxlm.cli train run-config.yaml $overrides"
