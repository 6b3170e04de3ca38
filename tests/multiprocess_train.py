"""One process of the two-process localhost training test (run by tests/test_train.py).

    python tests/multiprocess_train.py PROCESS_ID PORT MODEL_DIR OUT_JSON

Each process has 4 simulated CPU devices; together they form the 8-device mesh and exchange
collectives over gloo, as hosts of a pod would.
"""

import json
import os
import sys

os.environ['JAX_PLATFORMS'] = 'cpu'
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'
os.environ['CUDA_VISIBLE_DEVICES'] = ''

import jax  # noqa: E402

from ul2 import partitioning  # noqa: E402

process_id, port, model_dir, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize(coordinator_address=f'localhost:{port}', num_processes=2,
                           process_id=process_id)

# As scripts/train.py runs: the step on the calling thread, freed memory kept for the next.
assert partitioning.reuse_freed_memory()
assert not jax.config.read('jax_cpu_enable_async_dispatch')

assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_setup  # noqa: E402

result = train_setup.run(model_dir, steps=4, input_shards=2)
if jax.process_index() == 0:
  with open(out, 'w') as f:
    json.dump({'losses': [h['loss'] for h in result.history],
               'param_sum': train_setup.param_checksum(result.state.params)}, f)
