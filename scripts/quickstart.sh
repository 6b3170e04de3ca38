#!/usr/bin/env bash
# Installs ul2 into ./.venv (created if missing) and runs the main job on the built-in default:
# pretrain a small UL2 model with the Mixture-of-Denoisers on the bundled Gutenberg sample, on
# CPU (gin_configs/quickstart.gin). Run it again and it resumes from its last checkpoint.
# Extra arguments go to scripts/train.py, e.g. --gin.TRAIN_STEPS=1000.
INSTALL_EXTRA=
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
python scripts/train.py --gin_file=quickstart.gin "$@"
