#!/usr/bin/env bash
# Installs ul2 into ./.venv (created if missing) and runs the main job on the built-in default.
# Until the trainer lands this is one forward pass of the tiny model on real tokenized text.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
python scripts/forward.py --gin_file=models/tiny.gin "$@"
