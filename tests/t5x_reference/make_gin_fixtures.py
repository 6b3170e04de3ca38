"""Writes fixtures/t5x_configurables.json: the parameter names of the T5X configurables that
T5X's run gins (configs/runs/{pretrain,finetune}.gin) and T5 1.1 model gins bind, read from
T5X's own code by `inspect`. `tests/test_t5x_gins.py` checks every binding of T5X's files plus
ul2's `gin_configs/t5x/*.gin` against them. Run where `t5x.train` imports (README.md):

    PYTHONPATH=T5X_DIR:. python tests/t5x_reference/make_gin_fixtures.py
"""
import dataclasses
import inspect
import json
import os

import seqio
from t5x import adafactor, gin_utils, models, partitioning, trainer, utils
from t5x import train as train_script
from t5x.examples.t5 import network

# The configurables as T5X's gin files name them (module alias . name).
CONFIGURABLES = {
    'train_script.train': train_script.train,
    'utils.DatasetConfig': utils.DatasetConfig,
    'utils.CheckpointConfig': utils.CheckpointConfig,
    'utils.RestoreCheckpointConfig': utils.RestoreCheckpointConfig,
    'utils.SaveCheckpointConfig': utils.SaveCheckpointConfig,
    'utils.create_learning_rate_scheduler': utils.create_learning_rate_scheduler,
    'partitioning.PjitPartitioner': partitioning.PjitPartitioner,
    'trainer.Trainer': trainer.Trainer,
    'adafactor.Adafactor': adafactor.Adafactor,
    'models.EncoderDecoderModel': models.EncoderDecoderModel,
    'network.Transformer': network.Transformer,
    'network.T5Config': network.T5Config,
    'seqio.SentencePieceVocabulary': seqio.SentencePieceVocabulary,
    'seqio.Evaluator': seqio.Evaluator,
    'seqio.JSONLogger': seqio.JSONLogger,
    'gin_utils.summarize_gin_config': gin_utils.summarize_gin_config,
}


def parameters(obj):
  if dataclasses.is_dataclass(obj):
    return sorted(f.name for f in dataclasses.fields(obj))
  target = obj.__init__ if inspect.isclass(obj) else obj
  return sorted(p for p in inspect.signature(target).parameters if p != 'self')


def main():
  out = {name: parameters(obj) for name, obj in CONFIGURABLES.items()}
  path = os.path.join(os.path.dirname(__file__), 'fixtures', 't5x_configurables.json')
  with open(path, 'w') as f:
    json.dump(out, f, indent=1, sort_keys=True)
  print('wrote', path)


if __name__ == '__main__':
  main()
