"""Runs the T5 library's own SuperGLUE preprocessors and WSC postprocessor (t5/data/
preprocessors.py, postprocessors.py, not part of this project) on records and compares their
text with tasks/superglue.py's. Not part of the suite (T5 is not installed here); how it was run:

    git show HEAD:t5/data/preprocessors.py > /tmp/t5ref/t5/data/preprocessors.py   # and
    git show HEAD:t5/data/postprocessors.py > /tmp/t5ref/t5/data/postprocessors.py  # (empty
    touch /tmp/t5ref/t5/__init__.py /tmp/t5ref/t5/data/__init__.py                  #  inits)
    pip install babel   # preprocessors.py imports it
    python tests/t5_reference/check_superglue.py /tmp/t5ref /path/to/official/superglue

Checked on 2026-11-27: MultiRC (the first 3 paragraphs of the official train file, 209
answers, with their HTML), AX-b and AX-g as RTE, ReCoRD's highlights and per-answer examples,
WSC's plain and two special-cased records, and the WSC postprocessor: all identical.
"""
import json, sys
T5_DIR, SUPERGLUE_DIR = sys.argv[1], sys.argv[2]
sys.path.insert(0, T5_DIR)
sys.path.insert(1, __file__.rsplit('/tests/', 1)[0])
import tensorflow as tf
from t5.data import preprocessors as P, postprocessors as PP
from ul2_tasks import superglue as sg

def t5_glue(x, name, labels, feature_names=None):
  ds = P.glue(tf.data.Dataset.from_tensors(x), benchmark_name=name, label_names=labels, feature_names=feature_names)
  return {k: tf.constant(v) for k, v in next(ds.as_numpy_iterator()).items()}

def text(t): return t.numpy().decode()

# MultiRC: the official train file, first 3 paragraphs.
rows = [json.loads(l) for l in open(f'{SUPERGLUE_DIR}/MultiRC/train.jsonl')][:3]
n = 0
for r in rows:
  ours = sg.format_example('multirc', r, 'train')
  i = 0
  for q in r['passage']['questions']:
    for a in q['answers']:
      x = {'question': tf.constant(q['question']), 'answer': tf.constant(a['text']),
           'paragraph': tf.constant(r['passage']['text']), 'label': tf.constant(a['label']),
           'idx': {'paragraph': tf.constant(r['idx']), 'question': tf.constant(q['idx']), 'answer': tf.constant(a['idx'])}}
      t5 = t5_glue(x, 'multirc', ['False', 'True'], ('question', 'answer', 'paragraph'))
      assert text(t5['inputs']) == ours[i]['inputs'], (text(t5['inputs'])[:200], ours[i]['inputs'][:200])
      assert text(t5['targets']) == ours[i]['targets']
      i += 1; n += 1
print('multirc ok', n)

# AX-b as RTE (rekey premise<-sentence1, hypothesis<-sentence2), AX-g as RTE.
axb = {'sentence1': 'The cat sat on the mat.', 'sentence2': 'A cat sat.', 'label': 'entailment', 'idx': 3}
x = {'premise': tf.constant(axb['sentence1']), 'hypothesis': tf.constant(axb['sentence2']), 'label': tf.constant(0), 'idx': tf.constant(3)}
assert text(t5_glue(x, 'rte', ['entailment', 'not_entailment'])['inputs']) == sg.format_example('axb', axb)[0]['inputs']
axg = {'premise': 'The nurse said she was tired.', 'hypothesis': 'The nurse was tired.', 'label': 'entailment', 'idx': 0}
x = {'premise': tf.constant(axg['premise']), 'hypothesis': tf.constant(axg['hypothesis']), 'label': tf.constant(0), 'idx': tf.constant(0)}
assert text(t5_glue(x, 'rte', ['entailment', 'not_entailment'])['inputs']) == sg.format_example('axg', axg)[0]['inputs']
print('ax ok')

# ReCoRD: T5's record preprocessor on a TFDS-shaped example.
passage = 'Paris is in France.\n@highlight\nFrance is big\n@highlight\n"Paris!"\n@highlight\nBig city'
rec = {'idx': 9, 'passage': {'text': passage, 'entities': [{'start': 0, 'end': 4}, {'start': 12, 'end': 17}, {'start': 31, 'end': 36}]},
       'qas': [{'query': '@placeholder is a country.', 'idx': 0, 'answers': [{'start': 12, 'end': 17, 'text': 'France'}, {'start': 31, 'end': 36, 'text': 'France'}]}]}
ds = tf.data.Dataset.from_tensors({'passage': passage, 'query': '@placeholder is a country.', 'entities': ['France', 'Paris'],
                                   'answers': ['France', 'France'], 'idx': {'passage': 9, 'query': 0}})
t5 = [ {k: v for k, v in e.items()} for e in P.record(ds).as_numpy_iterator()]
ours = sg.format_example('record', rec, 'train')
assert [e['inputs'].decode() for e in t5] == [e['inputs'] for e in ours], ([e['inputs'] for e in t5], [e['inputs'] for e in ours])
assert [e['targets'].decode() for e in t5] == [e['targets'] for e in ours]
print('record ok', len(t5))

# WSC simple: T5 on TFDS wsc.fixed-shaped records (the special-cased texts and a plain one).
cases = [
  ('Mark told Pete many lies about himself, which Pete included in his book.', 'Mark', 'his', 11),
  ('When they had eventually calmed down a bit , and had gotten home, Mr. Farley put the magic pebble in an iron safe . Some day they might want to use it , but really for now, what more could they wish for?', 'the magic pebble', 'it', 31),
  ('The boy continued to whip the pony , and eventually the pony threw him over. John laughed out quite loud. "Good for him," he said. ', 'the pony', 'him', 20),
]
for text_, s1, s2, i2 in cases:
  ds = tf.data.Dataset.from_tensors({'text': text_, 'span1_text': s1, 'span2_text': s2, 'span2_index': i2, 'span1_index': 0, 'label': 1, 'idx': 0})
  [t5] = list(P.wsc_simple(ds, correct_referent_only=False).as_numpy_iterator())
  words = text_.split(' ')
  # the official files: an off-by-one index (at 'use') and a pronoun with the quote attached
  ours_index = (words.index('use') if 'use' in words else
                words.index('him,"') if 'him,"' in words else words.index(s2))
  rec = {'text': text_, 'idx': 0, 'label': True, 'target': {'span1_text': s1, 'span1_index': 0, 'span2_text': s2, 'span2_index': ours_index}}
  [ours] = sg.format_example('wsc', rec, 'validation')
  assert t5['inputs'].decode().rstrip() == ours['inputs'].rstrip(), (t5['inputs'], ours['inputs'])
  assert t5['targets'].decode() == ours['targets']
print('wsc ok')

# WSC postprocessor.
for pred, ref in [('Mark', 'Mark'), ('the mark', 'Mark'), ('Pete', 'Mark'), ('', 'Mark'), ("Mark's", 'Mark'), ('fuzzy bunny', 'the bunny'), ("Bob's hat", "Bob")]:
  assert PP.wsc_simple(pred, {'targets_pretokenized': ref}) == sg.names_referent(pred, ref), (pred, ref)
print('wsc postprocessor ok')
