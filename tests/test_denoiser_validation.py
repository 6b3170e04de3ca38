"""Per-denoiser and per-mode validation: fixed streams, during training and for a checkpoint."""

import json

import numpy as np
import pytest

import train_setup
from ul2 import data as data_lib
from ul2 import denoisers as D
from ul2 import train as T
from ul2 import vocabulary

VOCAB = vocabulary.get_vocabulary()


def test_each_stream_has_its_one_denoiser_and_the_corpus_validation_text():
  tasks = data_lib.denoiser_tasks('t5_span_corruption_gutenberg', D.UL2_DENOISERS)
  assert list(tasks) == [d.name for d in D.UL2_DENOISERS]
  for d in D.UL2_DENOISERS:
    examples = list(tasks[d.name].get_dataset(
        train_setup.LENGTHS, split='validation', shuffle=False, seed=0).take(4)
        .as_numpy_iterator())
    mode = VOCAB.encode(d.mode)
    assert all(ex['denoiser'] == 0 for ex in examples)  # the only denoiser of its mixture
    assert all(list(ex['inputs'][:len(mode)]) == mode for ex in examples), d.name
  # The same stream every time (seed 0, unshuffled): what makes steps comparable.
  again = data_lib.denoiser_tasks('ul2_mod_gutenberg', [D.X(3, 0.5)])['X(3,0.5)']
  first = [ex['inputs'].tolist() for ex in tasks['X(3,0.5)'].get_dataset(
      train_setup.LENGTHS, split='validation', shuffle=False, seed=0).take(3)
      .as_numpy_iterator()]
  second = [ex['inputs'].tolist() for ex in again.get_dataset(
      train_setup.LENGTHS, split='validation', shuffle=False, seed=0).take(3)
      .as_numpy_iterator()]
  assert first == second
  # Tasks without a denoising or LM objective have no such streams.
  import ul2_tasks  # noqa: F401
  assert data_lib.denoiser_tasks('superglue_cb', D.UL2_DENOISERS) == {}


@pytest.mark.slow
def test_training_reports_per_denoiser_validation_and_eval_reproduces_it(tmp_path, capsys):
  """The run logs loss and accuracy per denoiser and mode at each validation (console,
  TensorBoard, metrics.jsonl); eval.py --by_denoiser on the checkpoint gives the same figures."""
  import eval as eval_script

  model_dir = tmp_path / 'run'
  result = T.train(
      model=train_setup.TINY,
      data=data_lib.DataConfig('ul2_mod_gutenberg', train_setup.LENGTHS, batch_size=8),
      run=T.TrainConfig(str(model_dir), steps=4, eval_every=2, eval_batches=1, log_every=2,
                        progress_bar=False, denoiser_eval_batches=1,
                        denoiser_eval=(D.R(3, 0.15), D.S(), D.X(8, 0.5), D.X(3, 0.5))),
      optimizer=train_setup.OPTIMIZER)
  assert [h['step'] for h in result.denoiser_history] == [2, 4]
  last = result.denoiser_history[-1]
  assert set(last) == {'step'} | {f'{g}/{m}' for g in (
      'denoiser/R(3,0.15)', 'denoiser/S(uniform)', 'denoiser/X(8,0.5)', 'denoiser/X(3,0.5)',
      'mode/[NLU]', 'mode/[S2S]', 'mode/[NLG]') for m in ('loss', 'accuracy')}
  # Training lowers every denoiser's loss on its fixed stream.
  first = result.denoiser_history[0]
  assert all(last[k] < first[k] for k in last if k.endswith('/loss'))
  # [NLG] is X(8,0.5) and X(3,0.5) together: between the two.
  x8, x3, nlg = last['denoiser/X(8,0.5)/loss'], last['denoiser/X(3,0.5)/loss'], \
      last['mode/[NLG]/loss']
  assert min(x8, x3) <= nlg <= max(x8, x3)
  out = capsys.readouterr().out
  assert 'step 4: validation loss by denoiser R(3,0.15) ' in out and '; by mode [NLG] ' in out
  rows = [json.loads(line) for line in (model_dir / 'metrics.jsonl').read_text().splitlines()]
  logged = [r for r in rows if r['split'] == 'validation' and 'mode/[S2S]/loss' in r]
  assert [r['step'] for r in logged] == [2, 4]

  results = eval_script.main([
      '--checkpoint', str(model_dir), '--by_denoiser', 'ul2_mod_gutenberg',
      '--inputs_length', '64', '--targets_length', '64', '--batch_size', '8',
      '--denoiser_batches', '1', '--output', str(tmp_path / 'eval')])
  for name in ('R(3,0.15)', 'S(uniform)', 'X(3,0.5)', 'X(8,0.5)'):
    np.testing.assert_allclose(results[f'denoiser/{name}']['loss'],
                               last[f'denoiser/{name}/loss'], rtol=1e-6)
  table = (tmp_path / 'eval' / 'by_denoiser.md').read_text()
  assert '| S(uniform) |' in table and '| [NLU] |' in table
