"""Test environment: JAX on the CPU with 8 simulated devices, TensorFlow kept off any GPU.

This runs before any test module imports jax, so the flags take effect for the whole session.
"""

import os
import sys

os.environ['JAX_PLATFORMS'] = 'cpu'
_flag = '--xla_force_host_platform_device_count=8'
if _flag not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + _flag).strip()
# TensorFlow (seqio's data pipeline) must never grab a GPU the JAX side needs.
os.environ['CUDA_VISIBLE_DEVICES'] = ''
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

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
