#!/usr/bin/env bash
# Installs ul2 with its test and hf extras into ./.venv (created if missing) and runs the whole
# suite (the hf extra: torch 2.13.0 CPU and transformers 5.x, for the interop tests; and the
# T5 library without its dependencies, the data benchmark's reference; libtpu in its own folder,
# XLA's TPU compiler for test_aot.py).
INSTALL_EXTRA=test,hf
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
# transformers 4.x beside it, in its own folder: the export is also checked with 4.x, loaded
# in a subprocess with this folder first on PYTHONPATH.
T4="$VENV/transformers4"
if [ ! -f "$T4/.installed-4.57.1" ]; then
  echo "== installing transformers 4.57.1 into $T4 (for the 4.x interop test)"
  rm -rf "$T4"
  python -m pip install --quiet --disable-pip-version-check --no-deps --target "$T4" \
    transformers==4.57.1 huggingface-hub==0.36.0 tokenizers==0.22.1 >"$VENV/install4.log" 2>&1 \
    || { cat "$VENV/install4.log" >&2; exit 1; }
  touch "$T4/.installed-4.57.1"
fi
# libtpu beside it, in its own folder: scripts/compile_tpu.py and test_aot.py compile for
# abstract TPU slices with it; in the environment itself every JAX process on this TPU-less
# machine would try to start a TPU and print libtpu's errors.
LIBTPU="$VENV/libtpu"
if [ ! -f "$LIBTPU/.installed-0.0.42" ]; then
  echo "== installing libtpu 0.0.42 into $LIBTPU (XLA's TPU compiler, for test_aot.py)"
  rm -rf "$LIBTPU"
  python -m pip install --quiet --disable-pip-version-check --no-deps --target "$LIBTPU" \
    'libtpu==0.0.42.*' >"$VENV/install_libtpu.log" 2>&1 \
    || { cat "$VENV/install_libtpu.log" >&2; exit 1; }
  touch "$LIBTPU/.installed-0.0.42"
fi
# The T5 library, without its dependencies: bench_data.py runs T5's own span_corruption
# pipeline as the reference (its preprocessors.py needs only seqio, TensorFlow, gin and babel).
if ! python -c 'import babel, importlib.util as u; assert u.find_spec("t5")' 2>/dev/null; then
  echo "== installing the T5 library (t5==0.9.4, --no-deps) for the data benchmark's reference"
  python -m pip install --quiet --disable-pip-version-check --no-deps t5==0.9.4 babel==2.19.0 \
    >"$VENV/install_t5.log" 2>&1 || { cat "$VENV/install_t5.log" >&2; exit 1; }
fi
# Two workers (UL2_TEST_WORKERS; 0 runs in one process): most tests are bound by XLA's
# single-threaded compilation, so two of them share a 2-core machine better than one does.
python -m pytest -n "${UL2_TEST_WORKERS:-2}" --durations=15 "$@"
