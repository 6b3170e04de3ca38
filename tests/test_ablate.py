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
    assert (cell / 'pretrain' / 'checkpoints' / '2').is_dir()
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


def test_the_tiny_preset_sets_defaults_that_given_flags_override():
  import ablate
  args = ablate.parse_args(['--output', '/tmp/unused', '--preset', 'tiny', '--seeds', '0,1,2',
                            '--finetune_steps', '7'])
  assert (args.model, args.decoder_only_model, args.inputs_length, args.batch_size) == (
      'tiny', 'decoder_only_tiny', 32, 8)
  assert args.tokens == 10 * 8 * (32 + 32)  # 10 pretraining steps a run
  assert (args.seeds, args.finetune_steps) == ('0,1,2', 7)  # given flags win
  assert ablate.parse_args(['--output', '/tmp/unused']).model == 'ul2_cpu'  # no preset: as was
