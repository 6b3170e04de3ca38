"""The tiny training run the trainer tests share (also imported by multiprocess_train.py)."""


import jax
import numpy as np

import ul2_tasks  # noqa: F401  (registers ul2_mod_gutenberg)
from ul2 import data as data_lib
from ul2 import network, partitioning
from ul2 import train as T

TINY = network.Config(vocab_size=32128, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64,
                      num_encoder_layers=2, num_decoder_layers=2)
LENGTHS = {'inputs': 64, 'targets': 64}
OPTIMIZER = T.OptimizerConfig(schedule='constant', learning_rate=0.01, warmup_steps=0)


def run(model_dir, steps, *, model=TINY, batch_size=8, mesh=partitioning.MeshConfig(),
        devices=None, microbatches=1, input_shards=None, checkpoint_every=1000, batches=None,
        eval_split='validation', async_checkpointing=True, seed=0, task='ul2_mod_gutenberg',
        lengths=LENGTHS, denoiser_eval_batches=0, log=lambda _: None, **run_options):
  return T.train(
      model=model,
      data=data_lib.DataConfig(task, lengths, batch_size=batch_size,
                             input_shards=input_shards, eval_split=eval_split),
      run=T.TrainConfig(model_dir, steps=steps, microbatches=microbatches, eval_every=1000,
                        eval_batches=2, checkpoint_every=checkpoint_every, log_every=2,
                        progress_bar=False, async_checkpointing=async_checkpointing,
                        seed=seed, denoiser_eval_batches=denoiser_eval_batches,
                        **run_options),
      optimizer=OPTIMIZER, mesh=mesh, devices=devices, batches=batches, log=log)


def fixed_batch(batch_size=8):
  """One real packed batch from the MoD task, as host numpy arrays."""
  data = data_lib.DataConfig('ul2_mod_gutenberg', LENGTHS, batch_size=batch_size)
  return next(data_lib.HostBatches(data_lib.make_datasets(data, 'train', 0, repeat=True,
                                                          shuffle=False)))


def param_checksum(params) -> float:
  return float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in jax.tree.leaves(params)))


def saved_steps(model_dir) -> list[int]:
  """The steps of a run's checkpoints: model_dir/checkpoint_<step>/ (T5X's layout)."""
  import os
  import re
  names = os.listdir(model_dir) if os.path.isdir(model_dir) else []
  return sorted(int(m.group(1)) for m in map(re.compile(r'checkpoint_(\d+)').fullmatch,
                                                 map(str, names)) if m)


def step_dir(model_dir, step):
  """model_dir/checkpoint_<step> (a pathlib path for a pathlib model_dir)."""
  import os
  return (model_dir / f'checkpoint_{step}' if hasattr(model_dir, 'joinpath')
          else os.path.join(model_dir, f'checkpoint_{step}'))
