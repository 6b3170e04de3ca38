#!/usr/bin/env bash
# Installs ul2 into ./.venv (created if missing) and runs the main job on the built-in default,
# on CPU, in two stages:
#   1. pretrain a small UL2 model with the Mixture-of-Denoisers on the bundled Gutenberg sample
#      (gin_configs/quickstart.gin -> runs/quickstart);
#   2. fine-tune it on the bundled CB task with its [NLU] mode token and print the metrics
#      table (gin_configs/quickstart_finetune.gin -> runs/quickstart_cb).
# Run it again and both stages resume from their checkpoints. Extra arguments go to the
# pretraining stage, e.g. --gin.TRAIN_STEPS=1000.
INSTALL_EXTRA=
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
echo "== 1/2 pretraining (MoD, bundled Gutenberg sample)"
python scripts/train.py --gin_file=quickstart.gin "$@"
echo "== 2/2 fine-tuning on CB with [NLU], then evaluating the best checkpoint"
python scripts/train.py --gin_file=quickstart_finetune.gin
python scripts/eval.py --checkpoint runs/quickstart_cb --best --tasks cb --method decode \
  --inputs_length 256 --targets_length 8 --output runs/quickstart_cb/eval
