#!/usr/bin/env bash
# The whole pipeline on the tiny model, in about a minute on a 2-core CPU: pretrain with the
# Mixture-of-Denoisers (gin_configs/smoke.gin -> runs/smoke), fine-tune on CB with [NLU]
# (smoke_finetune.gin -> runs/smoke_cb), evaluate the best checkpoint. A check that everything
# runs on this machine, not a model: its scores mean nothing. Installs ul2 into ./.venv as
# quickstart.sh does; the two run folders (under UL2_SMOKE_DIR, default runs/) start afresh.
INSTALL_EXTRA=
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
DIR="${UL2_SMOKE_DIR:-runs}"
rm -rf "$DIR/smoke" "$DIR/smoke_cb"
echo "== 1/3 pretraining the tiny model (MoD, 30 steps)"
python scripts/train.py --gin_file=smoke.gin --gin.MODEL_DIR="'$DIR/smoke'"
echo "== 2/3 fine-tuning on CB with [NLU] (20 steps)"
python scripts/train.py --gin_file=smoke_finetune.gin --gin.MODEL_DIR="'$DIR/smoke_cb'" \
  --gin.INITIAL_CHECKPOINT_PATH="'$DIR/smoke'"
echo "== 3/3 evaluating the best checkpoint on CB validation"
python scripts/eval.py --checkpoint "$DIR/smoke_cb" --best --tasks cb --method rank \
  --inputs_length 128 --targets_length 8 --output "$DIR/smoke_cb/eval"
