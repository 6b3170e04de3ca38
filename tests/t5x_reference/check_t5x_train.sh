#!/usr/bin/env bash
# ul2's gin_configs/t5x/ in the real T5X trainer, then the T5X checkpoints in ul2. Run by hand
# where `python -m t5x.train` imports (README.md here: T5X's environment plus ul2 importable;
# ul2's tasks folder importable as `ul2_tasks`, e.g. `pip install -e <ul2>` in that venv).
#   T5X_DIR=<T5X checkout> T5X_PYTHON=<its python> UL2_PYTHON=<ul2's python> \
#     bash tests/t5x_reference/check_t5x_train.sh
set -euo pipefail
UL2=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${OUT:-/tmp/ul2_t5x_check}
rm -rf "$OUT" && mkdir -p "$OUT"
# Short runs: evaluate and checkpoint every 2 steps.
cat > "$OUT/short.gin" <<'GIN'
from __gin__ import dynamic_registration
import __main__ as train_script
from t5x import utils
train_script.train.eval_period = 2
train_script.train.eval_steps = 1
utils.SaveCheckpointConfig.period = 2
GIN
cd "$T5X_DIR"
for L in 128 512; do  # MoD pretraining of T5X's T5 1.1 small at 128/128 and 512/512
  "$T5X_PYTHON" -m t5x.train --gin_search_paths="$T5X_DIR,$UL2/gin_configs" \
    --gin_file=t5x/examples/t5/t5_1_1/small.gin --gin_file=t5x/configs/runs/pretrain.gin \
    --gin_file=t5x/ul2_pretrain.gin --gin_file="$OUT/short.gin" \
    --gin.MODEL_DIR="'$OUT/pretrain_$L'" --gin.TASK_FEATURE_LENGTHS="{'inputs': $L, 'targets': $L}" \
    --gin.BATCH_SIZE=2 --gin.TRAIN_STEPS=2 > "$OUT/pretrain_$L.log" 2>&1
  echo "pretrain $L/$L: exit 0, $(ls -d "$OUT/pretrain_$L"/checkpoint_* | wc -l) checkpoints"
done
# SuperGLUE CB fine-tuning with T5X's infer_eval (ul2's postprocessor and metrics).
"$T5X_PYTHON" -m t5x.train --gin_search_paths="$T5X_DIR,$UL2/gin_configs" \
  --gin_file=t5x/examples/t5/t5_1_1/small.gin --gin_file=t5x/configs/runs/finetune.gin \
  --gin_file=t5x/ul2_finetune_superglue.gin --gin_file="$OUT/short.gin" \
  --gin.INITIAL_CHECKPOINT_PATH="'$OUT/pretrain_128/checkpoint_2'" --gin.MODEL_DIR="'$OUT/cb'" \
  --gin.TASK_FEATURE_LENGTHS="{'inputs': 256, 'targets': 8}" --gin.BATCH_SIZE=4 \
  --gin.TRAIN_STEPS_RELATIVE=2 --gin.EVALUATOR_NUM_EXAMPLES=8 > "$OUT/cb.log" 2>&1
echo "finetune cb: $(cat "$OUT"/cb/inference_eval/superglue_cb-metrics.jsonl)"
# The T5X checkpoint in ul2, sized by T5X's own model gin.
cd "$UL2"
"$UL2_PYTHON" scripts/eval.py --checkpoint "$OUT/cb" \
  --gin_file "$T5X_DIR/t5x/examples/t5/t5_1_1/small.gin" --tasks cb --inputs_length 256 \
  --targets_length 8 --max_examples 8 --batch_size 8 2>/dev/null | tail -3
"$UL2_PYTHON" scripts/export_hf.py --checkpoint "$OUT/cb" \
  --gin_file "$T5X_DIR/t5x/examples/t5/t5_1_1/small.gin" --output "$OUT/cb_hf" 2>/dev/null
