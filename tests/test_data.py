"""The input layout a checkpointed position is saved with: what defines a stream, and what not."""

import os
import shutil

import pytest
import seqio

import train_setup
from ul2_tasks import pretrain
from ul2 import data as data_lib
from ul2 import denoisers as D
from ul2 import vocabulary

SAMPLE = os.path.join(vocabulary.DATA_DIR, 'gutenberg_sample')


def register(name, directory, mixture):
  """`<objective>_<name>` over the Gutenberg files in `directory`, with one objective."""
  source = pretrain.text_files_source(os.path.join(directory, 'gutenberg_train_*.txt'),
                                      os.path.join(directory, 'gutenberg_validation_*.txt'))
  return pretrain.register_corpus(name, source, objectives={'obj': mixture})[0]


def layout(task):
  return data_lib.input_layout(data_lib.DataConfig(task, train_setup.LENGTHS, batch_size=8),
                               seed=0)


def saved_position(tmp_path, task):
  """A saved layout of `task`'s pipeline, as a checkpoint writes it."""
  path = str(tmp_path / 'position' / 'process_0')
  data_lib.HostBatches([], layout(task)).save(path)
  return path


def test_changed_denoiser_rates_are_a_changed_stream(tmp_path):
  task = register('fp_rates', SAMPLE, D.MixtureConfig(D.UL2R_DENOISERS, D.UL2R_RATES))
  path = saved_position(tmp_path, task)
  assert data_lib.HostBatches([], layout(task)).layout_changes(path) == []
  register('fp_rates', SAMPLE, D.MixtureConfig(D.UL2R_DENOISERS, (0.5, 0.25, 0.25)))
  changes = data_lib.HostBatches([], layout(task)).layout_changes(path)
  assert changes == ['task_definition.preprocessors.4.config.rates: '
                     '[0.25, 0.25, 0.5] -> [0.5, 0.25, 0.25]']


def test_a_changed_denoiser_is_a_changed_stream(tmp_path):
  task = register('fp_denoiser', SAMPLE, D.MixtureConfig((D.R(3, 0.15),)))
  path = saved_position(tmp_path, task)
  register('fp_denoiser', SAMPLE, D.MixtureConfig((D.R(8, 0.15),)))
  changes = data_lib.HostBatches([], layout(task)).layout_changes(path)
  assert changes == ['task_definition.preprocessors.4.config.denoisers.0.mean_span_length: '
                     '3 -> 8']


def test_changed_mixture_rates_are_a_changed_stream(tmp_path):
  first = register('fp_mix_a', SAMPLE, D.MixtureConfig((D.R(3, 0.15),)))
  second = register('fp_mix_b', SAMPLE, D.MixtureConfig((D.S(),)))
  seqio.MixtureRegistry.remove('fp_mix')
  seqio.MixtureRegistry.add('fp_mix', [(first, 1.0), (second, 3.0)])
  path = saved_position(tmp_path, 'fp_mix')
  seqio.MixtureRegistry.remove('fp_mix')
  seqio.MixtureRegistry.add('fp_mix', [(first, 1.0), (second, 1.0)])
  changes = data_lib.HostBatches([], layout('fp_mix')).layout_changes(path)
  assert changes == [f'task_definition.mixture.{second}.rate: 3.0 -> 1.0']


def test_the_same_files_elsewhere_are_the_same_stream_and_other_files_are_not(tmp_path):
  """A moved checkout or data copy resumes; a different corpus behind the same names does
  not."""
  shutil.copytree(SAMPLE, tmp_path / 'moved')
  mixture = D.MixtureConfig((D.R(3, 0.15),))
  task = register('fp_files', SAMPLE, mixture)
  path = saved_position(tmp_path, task)
  register('fp_files', str(tmp_path / 'moved'), mixture)
  assert data_lib.HostBatches([], layout(task)).layout_changes(path) == []
  with open(tmp_path / 'moved' / 'gutenberg_train_00.txt', 'a') as f:
    f.write('One more paragraph.\n')
  size = os.path.getsize(os.path.join(SAMPLE, 'gutenberg_train_00.txt'))
  assert data_lib.HostBatches([], layout(task)).layout_changes(path) == [
      f"task_definition.source.files.train.0: ['gutenberg_train_00.txt', {size}] -> "
      f"['gutenberg_train_00.txt', {size + 20}]"]


def test_resuming_after_the_rates_changed_is_refused(tmp_path):
  """End to end: the trainer refuses to put a saved position into a re-weighted mixture."""
  task = register('fp_resume', SAMPLE, D.MixtureConfig(D.UL2R_DENOISERS, D.UL2R_RATES))
  model_dir = str(tmp_path / 'run')
  train_setup.run(model_dir, steps=1, checkpoint_every=1, eval_split=None, task=task)
  register('fp_resume', SAMPLE, D.MixtureConfig(D.UL2R_DENOISERS, (1.0, 1.0, 1.0)))
  with pytest.raises(ValueError, match=r'task_definition\.preprocessors\.4\.config\.rates: '
                                       r'\[0\.25, 0\.25, 0\.5\] -> \[1\.0, 1\.0, 1\.0\]'):
    train_setup.run(model_dir, steps=2, checkpoint_every=1, eval_split=None, task=task)


def test_a_layout_saved_before_task_definitions_still_resumes():
  """Positions written by earlier versions have no task_definition: it is not compared."""
  batches = data_lib.HostBatches([], {'task': 'ul2_mod_gutenberg', 'batch_size': 8,
                                      'task_definition': {'source': 'anything'}})
  assert batches._describe_changes({'task': 'ul2_mod_gutenberg', 'batch_size': 8}) == []
  assert batches._describe_changes({'task': 'c4', 'batch_size': 8}) == [
      'task: c4 -> ul2_mod_gutenberg']
