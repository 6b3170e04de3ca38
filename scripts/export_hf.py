"""Export a checkpoint of ours as a Hugging Face `T5ForConditionalGeneration` directory.

    python scripts/export_hf.py --checkpoint runs/quickstart --output /tmp/ul2_hf
    python -c "import transformers; transformers.T5ForConditionalGeneration.from_pretrained('/tmp/ul2_hf')"

`--checkpoint` is a model_dir (its latest step), one of its checkpoint_<step> folders or `best/`.
The model config comes from the model_dir's model_config.json (written by training), or from
`--gin_file=models/<size>.gin`. Writes config.json (feed_forward_proj and tie setting),
model.safetensors, generation_config.json and the SentencePiece tokenizer files.
"""

import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import gin_cli  # noqa: E402


def main(argv=None):
  parser = gin_cli.argument_parser(__doc__)
  parser.add_argument('--checkpoint', required=True,
                      help='a model_dir, its best/, checkpoint_<step> or a T5X directory')
  parser.add_argument('--output', required=True, help='the HF model directory to write')
  parser.add_argument('--gin_file', action='append', default=[],
                      help='model gin file, when the checkpoint has no model_config.json')
  parser.add_argument('--ignore_extra_params', action='store_true',
                      help='drop checkpoint entries the model config does not have')
  parser.add_argument('--overwrite', action='store_true',
                      help='replace the contents of a non-empty --output')
  args = parser.parse_args(argv)
  gin_cli.check_checkpoint(args.checkpoint)
  gin_cli.require_extra('hf', 'safetensors', 'scripts/export_hf.py')
  from ul2 import checkpoints, interop
  params, config = checkpoints.load(args.checkpoint, gin_cli.model_config(args.gin_file),
                                    args.ignore_extra_params)
  try:  # after reading: a failed read leaves an existing export as it was
    interop.prepare_export_dir(args.output, args.overwrite)
  except ValueError as e:
    parser.error(str(e))
  interop.save_hf(params, config, args.output)
  print(f'Exported {args.checkpoint} to {args.output} (T5ForConditionalGeneration, '
        f'{interop.hf_config(config)["feed_forward_proj"]}, tie_word_embeddings='
        f'{config.logits_via_embedding}).')


if __name__ == '__main__':
  gin_cli.exit_on_user_error(main, sys.argv[1:])
