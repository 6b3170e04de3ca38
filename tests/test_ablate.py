"""scripts/ablate.py end to end at a tiny budget: the grid, its table, resuming."""

import json

import pytest


@pytest.mark.slow
def test_the_ablation_grid_runs_end_to_end_and_resumes(tmp_path):
  import ablate

  decoder_only = tmp_path / 'tiny_decoder_only.gin'
  decoder_only.write_text("include 'models/tiny.gin'\nMODEL_ARCH = 'decoder_only'\n")
  argv = ['--output', str(tmp_path / 'grid'), '--model', 'tiny',
          '--decoder_only_model', str(decoder_only),
          '--objectives', 't5_span_corruption,causal_lm', '--tokens', '1024',
          '--inputs_length', '32', '--targets_length', '32', '--batch_size', '8',
          '--finetune_tasks', 'cb', '--finetune_steps', '2', '--finetune_batch_size', '8',
          '--finetune_inputs_length', '128', '--metrics_examples', '4',
          '--denoiser_batches', '1', '--generation_examples', '4', '--generation_length', '8']
  rows = ablate.main(argv)
  # causal LM only for the decoder-only model: 3 runs, each its own model dir.
  assert [(r['architecture'], r['objective']) for r in rows] == [
      ('encoder_decoder', 't5_span_corruption'), ('decoder_only', 't5_span_corruption'),
      ('decoder_only', 'causal_lm')]
  for arch, objective in (('encoder_decoder', 't5_span_corruption'),
                          ('decoder_only', 'causal_lm')):
    cell = tmp_path / 'grid' / arch / objective / 'seed0'
    result = json.loads((cell / 'results.json').read_text())
    assert result['steps'] == 2 and result['tokens'] == 1024  # the same budget for every run
    assert (cell / 'pretrain' / 'checkpoint_2').is_dir()
    assert (cell / 'finetune_cb' / 'best.json').is_file()
    assert {'mode/[NLU]', 'mode/[S2S]', 'mode/[NLG]'} <= set(result['validation'])
    assert set(result['generation']) == {'rouge1', 'rouge2', 'rougeL'}
    assert {'accuracy', 'f1_macro', 'average'} <= set(result['superglue']['cb'])
  model_config = json.loads((tmp_path / 'grid' / 'decoder_only' / 'causal_lm' / 'seed0' /
                             'pretrain' / 'model_config.json').read_text())
  assert model_config['architecture'] == 'decoder_only'
  table = (tmp_path / 'grid' / 'ablation.md').read_text()
  assert ('| architecture | objective | seeds | loss [NLU] | loss [S2S] | loss [NLG] | cb | '
          'SuperGLUE avg | ROUGE-L |') in table
  assert (tmp_path / 'grid' / 'ablation.png').read_bytes()[:4] == b'\x89PNG'
  # Run again: every run is read back, nothing retrains, the same table.
  (tmp_path / 'grid' / 'ablation.md').unlink()
  again = ablate.main(argv)
  assert again == rows and (tmp_path / 'grid' / 'ablation.md').read_text() == table


def test_summary_gives_mean_and_standard_deviation_over_seeds():
  import ablate
  args = ablate.parse_args(['--output', '/tmp/unused', '--finetune_tasks', 'cb'])
  runs = [{'architecture': 'decoder_only', 'objective': 'ul2_mod', 'seed': s,
           'validation': {'mode/[NLU]': {'loss': loss}},
           'superglue': {'cb': {'accuracy': acc, 'f1_macro': acc, 'average': acc}},
           'generation': {'rougeL': 10.0}} for s, loss, acc in ((0, 4.0, 50.0), (1, 5.0, 70.0))]
  table, rows = ablate.summarize(args, runs)
  assert rows[0]['loss [NLU]'] == {'mean': 4.5, 'std': pytest.approx(0.70710678)}
  assert rows[0]['cb']['mean'] == 60.0 and rows[0]['seeds'] == 2
  assert '| decoder_only | ul2_mod | 2 | 4.500 ± 0.707 | 60.0 ± 14.1 | 60.0 ± 14.1 | 10.0 ± 0.0 |' \
      in table


def test_the_price_of_generality_pairs_seeds_and_says_whether_it_is_noise(tmp_path):
  """MoD against each specialist on the specialist's own stream, per architecture, paired by
  seed: a gap larger than twice the seeds' spread is not noise, a smaller one is."""
  import ablate
  import numpy as np
  losses = {  # (architecture, objective): per seed, {stream: loss}
      ('encoder_decoder', 'ul2_mod'): [(5.10, 6.0), (5.20, 6.1), (5.15, 6.2)],
      ('encoder_decoder', 't5_span_corruption'): [(5.00, 7.0), (5.05, 7.1), (5.00, 7.2)],
      ('encoder_decoder', 'prefix_lm'): [(6.0, 6.05), (6.1, 6.0), (6.2, 6.1)],
      ('decoder_only', 'ul2_mod'): [(5.5, 6.40), (5.6, 6.50), (5.7, 6.45)],
      ('decoder_only', 'causal_lm'): [(6.5, 6.10), (6.6, 6.15), (6.7, 6.12)],
  }
  runs = [{'architecture': arch, 'objective': objective, 'seed': seed,
           'validation': {'denoiser/R(3,0.15)': {'loss': r}, 'mode/[S2S]': {'loss': s2s}},
           'superglue': {}}
          for (arch, objective), values in losses.items()
          for seed, (r, s2s) in enumerate(values)]
  table, rows = ablate.generality_gaps(runs)
  by = {(r['architecture'], r['specialist']): r for r in rows}
  assert sorted(by) == [('decoder_only', 'causal_lm'), ('encoder_decoder', 'prefix_lm'),
                        ('encoder_decoder', 't5_span_corruption')]
  span = by['encoder_decoder', 't5_span_corruption']
  gap = np.array([5.10, 5.20, 5.15]) - np.array([5.00, 5.05, 5.00])
  assert span['gap'] == {'mean': round(gap.mean(), 3), 'std': round(gap.std(ddof=1), 3)}
  assert span['stream'] == 'denoiser/R(3,0.15)' and span['seeds'] == 3
  assert not span['within_seed_noise']  # 0.133 against 2 x 0.05
  assert by['encoder_decoder', 'prefix_lm']['within_seed_noise']  # 0.05 against 2 x 0.1
  assert by['decoder_only', 'causal_lm']['gap']['mean'] == pytest.approx(0.327, abs=1e-3)
  assert ('| encoder_decoder | t5_span_corruption | denoiser/R(3,0.15) | 3 | 5.150 ± 0.050 | '
          '5.017 ± 0.029 | 0.133 ± 0.029 | no |') in table

  args = ablate.parse_args(['--output', str(tmp_path), '--finetune_tasks', 'cb'])
  _, summary = ablate.summarize(args, runs)
  limits = ablate.plot(summary, str(tmp_path / 'ablation.png'))
  assert limits['loss [S2S]'][0] > 5.5  # around the data (6.0-6.6), not from 0


def test_the_tiny_preset_sets_defaults_that_given_flags_override():
  import ablate
  args = ablate.parse_args(['--output', '/tmp/unused', '--preset', 'tiny', '--seeds', '0,1,2',
                            '--finetune_steps', '7'])
  assert (args.model, args.decoder_only_model, args.inputs_length, args.batch_size) == (
      'tiny', 'decoder_only_tiny', 32, 8)
  assert args.tokens == 10 * 8 * (32 + 32)  # 10 pretraining steps a run
  assert (args.seeds, args.finetune_steps) == ('0,1,2', 7)  # given flags win
  assert ablate.parse_args(['--output', '/tmp/unused']).model == 'ul2_cpu'  # no preset: as was
