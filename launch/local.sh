#!/usr/bin/env bash
# Train on N simulated CPU devices in one process: the sharded code paths without hardware.
#   launch/local.sh CONFIG [section.key=value ...]        (DEVICES=8 by default)
set -euo pipefail
DEVICES=${DEVICES:-8}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES}"
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
exec "${PYTHON:-python3}" -m jaxlm.cli train "$@"
