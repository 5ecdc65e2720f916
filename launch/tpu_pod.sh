#!/bin/bash
# CoSAlign on a TPU pod slice: the same command on every host.
#   TPU=my-v5e-64 ZONE=us-west4-a bash launch/tpu_pod.sh configs/cosalign_llama31_8b_dpo_tpu_v5e_64.py
# Requires: the repo checked out at the same path on every host and `pip install -e '.[tpu]'`.
# Each host runs launch.train, which calls cosa_jax.distributed.initialize (the code path
# tests/test_multiprocess.py runs as 2 local processes); distributed.initialize=yes lets JAX
# read coordinator, host count and host id from the TPU VM metadata.
set -euo pipefail
CONFIG=${1:?usage: TPU=name ZONE=zone bash launch/tpu_pod.sh configs/X.py [overrides]}
shift
gcloud compute tpus tpu-vm ssh "${TPU:?set TPU}" --zone "${ZONE:?set ZONE}" --worker=all --command \
  "cd ~/cosa-jax && python -m launch.train --config $CONFIG --config.distributed.initialize=yes $*"
