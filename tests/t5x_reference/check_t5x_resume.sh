#!/usr/bin/env bash
# T5X's trainer resumes a ul2 model_dir where the run stopped, and ul2 resumes after T5X. Run
# by hand where `python -m t5x.train` imports (README.md here: T5X's environment with ul2
# importable, as for check_t5x_train.sh):
#   T5X_DIR=<T5X checkout> T5X_PYTHON=<its python> UL2_PYTHON=<ul2's python> \
#     bash tests/t5x_reference/check_t5x_resume.sh
# T5 1.1 small (ul2's models/small.gin = T5X's t5_1_1/small.gin), MoD on Gutenberg, 32/32
# tokens, batch 2: ul2 trains steps 1-2, T5X 3-4 in the same model_dir, ul2 5-6.
set -euo pipefail
UL2=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${OUT:-/tmp/ul2_t5x_resume}
rm -rf "$OUT" && mkdir -p "$OUT"
SIZE=(--gin.TASK_FEATURE_LENGTHS="{'inputs': 32, 'targets': 32}" --gin.BATCH_SIZE=2)
ul2_train() {  # ul2_train STEPS
  (cd "$UL2" && "$UL2_PYTHON" scripts/train.py --gin_file=models/small.gin \
    --gin_file=runs/pretrain.gin --gin.MIXTURE_OR_TASK_NAME="'ul2_mod_gutenberg'" "${SIZE[@]}" \
    --gin.TRAIN_STEPS="$1" --gin.CHECKPOINT_EVERY=2 --gin.MODEL_DIR="'$OUT/run'" \
    --gin.train.TrainConfig.denoiser_eval_batches=0 > "$OUT/ul2_$1.log" 2>&1)
}
ul2_train 2
echo "ul2 steps 1-2: $(cd "$OUT/run" && echo checkpoint_*)"
# T5X's restore of the run as it stands, against ul2's own reading of it.
cp -r "$OUT/run" "$OUT/run_at_2"
(cd "$UL2/tests/t5x_reference" && PYTHONPATH="$T5X_DIR:${PYTHONPATH:-}" "$T5X_PYTHON" \
  check_restore.py "$OUT/run_at_2" 2>/dev/null | grep '^model_dir')
# T5X's trainer with MODEL_DIR set to the run: it restores step 2 and trains 3-4.
cat > "$OUT/short.gin" <<'GIN'
from __gin__ import dynamic_registration
import __main__ as train_script
from t5x import utils
train_script.train.eval_period = 2
train_script.train.eval_steps = 1
utils.SaveCheckpointConfig.period = 2
GIN
(cd "$T5X_DIR" && "$T5X_PYTHON" -m t5x.train --gin_search_paths="$T5X_DIR,$UL2/gin_configs" \
  --gin_file=t5x/examples/t5/t5_1_1/small.gin --gin_file=t5x/configs/runs/pretrain.gin \
  --gin_file=t5x/ul2_pretrain.gin --gin_file="$OUT/short.gin" --gin.MODEL_DIR="'$OUT/run'" \
  "${SIZE[@]}" --gin.TRAIN_STEPS=4 > "$OUT/t5x.log" 2>&1)
echo "T5X: $(grep -o 'Starting main loop over steps [0-9-]*' "$OUT/t5x.log"), then" \
  "$(cd "$OUT/run" && echo checkpoint_*)"
# ul2 again: it resumes from T5X's step 4 (unverified: T5X writes no manifest) and trains 5-6.
ul2_train 6
grep -h '^WARNING\|^Resumed' "$OUT/ul2_6.log"
echo "ul2 steps 5-6: $(cd "$OUT/run" && echo checkpoint_*)"
