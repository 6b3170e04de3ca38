"""Test environment: JAX on the CPU with 8 simulated devices, TensorFlow kept off any GPU.

This runs before any test module imports jax, so the flags take effect for the whole session.
"""

import os
import shutil
import sys
import tempfile

os.environ['JAX_PLATFORMS'] = 'cpu'
_flag = '--xla_force_host_platform_device_count=8'
if _flag not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + _flag).strip()
# TensorFlow (seqio's data pipeline) must never grab a GPU the JAX side needs.
os.environ['CUDA_VISIBLE_DEVICES'] = ''
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# One persistent compilation cache for this run: its workers and the script processes the
# tests start compile the same small programs many times. Fresh for every run (nothing is
# carried between runs); the controller removes it at the end.
_RUN = os.environ.get('PYTEST_XDIST_TESTRUNUID') or f'{os.getpid()}'
JAX_CACHE = os.path.join(tempfile.gettempdir(), f'ul2_tests_jax_cache_{_RUN}')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', JAX_CACHE)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.2')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# libtpu, for compiling for abstract TPU slices (test_aot.py), kept out of the environment
# (scripts/test.sh installs it here; scripts/compile_tpu.py looks here too).
_LIBTPU = os.environ.get('UL2_LIBTPU_DIR', os.path.join(sys.prefix, 'libtpu'))
if os.path.isdir(_LIBTPU):
  sys.path.insert(0, _LIBTPU)
# Scripts are tested through their importable pieces (gin parsing, entry points).
sys.path.insert(0, os.path.join(REPO, 'scripts'))

import jax  # noqa: E402

jax.config.update('jax_platforms', 'cpu')
assert jax.device_count() == 8, f'expected 8 simulated CPU devices, got {jax.devices()}'


def pytest_sessionfinish(session):
  if not os.environ.get('PYTEST_XDIST_WORKER'):  # the controller, after every worker ended
    shutil.rmtree(JAX_CACHE, ignore_errors=True)
