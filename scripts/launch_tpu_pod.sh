#!/usr/bin/env bash
# Run the same training command on every host of a TPU VM pod slice.
#
#   TFDS_DATA_DIR=gs://BUCKET/tensorflow_datasets \
#   scripts/launch_tpu_pod.sh TPU_NAME ZONE [--project=P] -- --gin_file=experiments/ul2_20b_tpu_v4.gin \
#       --gin.MODEL_DIR="'gs://BUCKET/ul2_20b'"
#
# Each worker gets this repository (copied with `gcloud compute tpus tpu-vm scp`), installs it
# with its tpu extra (libtpu) through scripts/env.sh, and starts scripts/train.py
# --multiprocess: jax.distributed.initialize() finds the pod's coordinator by itself, every host
# reads its own input shard, and checkpoints go to the shared MODEL_DIR (a gs:// bucket).
# TFDS_DATA_DIR (C4 prepared once with `tfds build c4/en:3.1.0`; docs/pods.md) is passed on to
# every worker; the C4 tasks refuse to start without it. Logs: /tmp/ul2_train.log on each worker.
# Check first that the run fits the slice: python scripts/compile_tpu.py --gin_file=... .
# UL2_SCRIPT=infer.py runs scripts/infer.py --multiprocess instead (every host decodes, the
# first writes --output_file on its own disk).
set -euo pipefail
if [ $# -lt 3 ] || [[ "$*" != *" -- "* ]]; then
  sed -n '2,16p' "$0"; exit 2
fi
TPU_NAME="$1"; ZONE="$2"; shift 2
SCRIPT="${UL2_SCRIPT:-train.py}"
case "$SCRIPT" in train.py|infer.py) ;; *) echo "error: UL2_SCRIPT=$SCRIPT: train.py or infer.py" >&2; exit 2;; esac
GCLOUD_ARGS=()
while [ "$1" != "--" ]; do GCLOUD_ARGS+=("$1"); shift; done
shift  # the --
TRAIN_ARGS=$(printf ' %q' "$@")
if [ -z "${TFDS_DATA_DIR:-}" ]; then
  echo "note: TFDS_DATA_DIR is not set: a run that reads C4 (ul2_mod_c4) will stop at its start; set it to where C4 is prepared (docs/pods.md)." >&2
fi
WORKER_ENV=""
[ -n "${TFDS_DATA_DIR:-}" ] && WORKER_ENV="export TFDS_DATA_DIR=$(printf '%q' "$TFDS_DATA_DIR");"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ARCHIVE=/tmp/ul2_repo.tar.gz
tar -czf "$ARCHIVE" -C "$REPO" --exclude=.venv --exclude=.git --exclude=runs .

gcloud compute tpus tpu-vm scp "$ARCHIVE" "$TPU_NAME":/tmp/ul2_repo.tar.gz \
  --zone="$ZONE" --worker=all "${GCLOUD_ARGS[@]}"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all "${GCLOUD_ARGS[@]}" \
  --command="set -e; ${WORKER_ENV} mkdir -p ~/ul2 && tar -xzf /tmp/ul2_repo.tar.gz -C ~/ul2 && cd ~/ul2 \
    && INSTALL_EXTRA=tpu source scripts/env.sh \
    && nohup python scripts/${SCRIPT} --multiprocess ${TRAIN_ARGS} > /tmp/ul2_train.log 2>&1 &"
echo "Started on all workers of $TPU_NAME; follow with:"
echo "  gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=0 --command='tail -f /tmp/ul2_train.log'"
