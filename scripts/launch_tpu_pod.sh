#!/usr/bin/env bash
# Run the same training command on every host of a TPU VM pod slice.
#
#   scripts/launch_tpu_pod.sh TPU_NAME ZONE [--project=P] -- --gin_file=experiments/ul2_20b_tpu_v4.gin \
#       --gin.MODEL_DIR="'gs://BUCKET/ul2_20b'"
#
# Each worker gets this repository (copied with `gcloud compute tpus tpu-vm scp`), installs it
# with scripts/env.sh, and starts scripts/train.py --multiprocess: jax.distributed.initialize()
# finds the pod's coordinator by itself, every host reads its own input shard, and checkpoints
# go to the shared MODEL_DIR (a gs:// bucket). Logs: /tmp/ul2_train.log on each worker.
set -euo pipefail
if [ $# -lt 3 ] || [[ "$*" != *" -- "* ]]; then
  sed -n '2,12p' "$0"; exit 2
fi
TPU_NAME="$1"; ZONE="$2"; shift 2
GCLOUD_ARGS=()
while [ "$1" != "--" ]; do GCLOUD_ARGS+=("$1"); shift; done
shift  # the --
TRAIN_ARGS=$(printf ' %q' "$@")
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ARCHIVE=/tmp/ul2_repo.tar.gz
tar -czf "$ARCHIVE" -C "$REPO" --exclude=.venv --exclude=.git --exclude=runs .

gcloud compute tpus tpu-vm scp "$ARCHIVE" "$TPU_NAME":/tmp/ul2_repo.tar.gz \
  --zone="$ZONE" --worker=all "${GCLOUD_ARGS[@]}"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all "${GCLOUD_ARGS[@]}" \
  --command="set -e; mkdir -p ~/ul2 && tar -xzf /tmp/ul2_repo.tar.gz -C ~/ul2 && cd ~/ul2 \
    && source scripts/env.sh && pip install -q 'jax[tpu]==0.10.2' \
    && nohup python scripts/train.py --multiprocess ${TRAIN_ARGS} > /tmp/ul2_train.log 2>&1 &"
echo "Started on all workers of $TPU_NAME; follow with:"
echo "  gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=0 --command='tail -f /tmp/ul2_train.log'"
