"""A run's record: step metrics with throughput, validation and task metrics, to TensorBoard,
to `metrics.jsonl` (one JSON object per value written, TensorBoard's record without
TensorBoard) and its plot `metrics.png`, and the progress shown (a bar on a terminal, plain
lines otherwise). The train loop (`ul2.train`) owns when; this module owns what and where.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable, Mapping

import jax
from jax.sharding import Mesh

from ul2 import checkpoints as checkpoints_lib
from ul2 import flops as flops_lib
from ul2 import network


class Records:
  """The run's record: per-step metrics with throughput, validation and task metrics, kept
  in memory, written to TensorBoard (chief, `summaries`) and shown on a progress bar.

  Step metrics stay on the device until `flush`: one device-to-host transfer per log
  interval is the loop's only sync point, besides the first step, which compiles: throughput
  is measured from its end. The summary files are written out at every
  checkpoint and on exit, however the loop ends. A resumed run recomputes exactly the steps
  after its checkpoint; those already in TensorBoard (logged before a crash) are not written
  twice.
  """

  def __init__(self, model_dir: str, steps: int, start: int, *, model: network.Config,
               batch_size: int, feature_lengths: Mapping[str, int], mesh: Mesh,
               peak_flops_per_device: float | None, progress_bar: bool | None,
               summaries: bool, log: Callable[[str], None]):
    inputs, targets = feature_lengths.get('inputs', 0), feature_lengths['targets']
    self.flops = flops_lib.flops_per_step(model, batch_size, inputs, targets)
    self.tokens_per_step = batch_size * (inputs + targets)
    self.devices = mesh.devices.size
    self.peak = peak_flops_per_device or flops_lib.peak_flops(mesh.devices.flat[0])
    is_chief = jax.process_index() == 0
    self.writers = _summary_writers(model_dir) if is_chief and summaries else None
    # The last step each split's summaries hold (a resumed run's earlier life).
    self.logged = ({split: _last_logged_step(checkpoints_lib.join(model_dir, split))
                    for split in self.writers} if self.writers else {})
    bar = progress_bar
    if bar is None:
      bar = sys.stdout.isatty() and sys.stderr.isatty()
    self.bar = _progress_bar(steps, start) if is_chief and bar else None
    self.lines = is_chief and not bar  # plain progress lines instead of the bar
    self.log = self.bar.write if self.bar is not None else log
    self.total_steps, self.start_time = steps, time.perf_counter()
    self.metrics_file = checkpoints_lib.join(model_dir, METRICS_JSONL) \
        if is_chief and summaries else None
    self.pending_lines: list[str] = []
    self.history, self.eval_history, self.metrics_history = [], [], []
    self.denoiser_history = []
    self.pending = []
    self.last_time, self.last_step = time.perf_counter(), start
    self.first_step_seconds = None  # the first step of this process, compilation included

  def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
    self.pending.append((step, metrics))
    if self.first_step_seconds is None:  # compilation and the first step: out of the rates
      jax.block_until_ready(metrics)
      now = time.perf_counter()
      self.first_step_seconds = now - self.last_time
      self.last_time, self.last_step = now, step

  def flush(self, step: int) -> list[dict[str, float]]:
    """Fetches the pending step metrics and logs them; returns their entries."""
    fetched = jax.device_get([m for _, m in self.pending])
    now = time.perf_counter()
    steps = step - self.last_step
    seconds_per_step = (now - self.last_time) / steps if steps else self.first_step_seconds
    self.last_time, self.last_step = now, step
    rates = flops_lib.throughput(self.flops, self.tokens_per_step, seconds_per_step,
                                 self.devices, self.peak)
    entries = []
    for (s, _), m in zip(self.pending, fetched):
      entries.append({'step': s, **{k: float(v) for k, v in m.items()},
                      'tokens_per_s': rates['tokens_per_s'], 'mfu': rates['mfu']})
      self._write('train', s, entries[-1])
    self.history += entries
    self.pending = []
    if self.bar is not None and entries:
      last = entries[-1]
      self.bar.set_postfix(loss=f'{last["loss"]:.3f}', tok_s=f'{last["tokens_per_s"]:,.0f}',
                           refresh=False)
      self.bar.update(step - self.bar.n)
    if self.lines and entries:
      last = entries[-1]
      eta = (self.total_steps - step) * seconds_per_step
      self.log(f'step {step}/{self.total_steps}: loss {last["loss"]:.4f}, '
               f'{last["tokens_per_s"]:,.0f} tokens/s, learning rate '
               f'{last["learning_rate"]:.3g}, ETA {duration(eta)}')
    return entries

  def persist(self, step: int) -> list[dict[str, float]]:
    """Fetches what is pending and writes the summary files out; returns the new entries."""
    entries = self.flush(step) if self.pending else []
    self._write_out()
    return entries

  def _write_out(self) -> None:
    for writer in (self.writers or {}).values():
      writer.flush()
    if self.metrics_file and self.pending_lines:
      with checkpoints_lib.open_file(self.metrics_file, 'a') as f:
        f.write(''.join(self.pending_lines))
      self.pending_lines = []

  def validation(self, step: int, result: dict[str, float]) -> None:
    self.eval_history.append({'step': step, **result})
    self._write('validation', step, result)
    self.log(f'step {step}: validation loss {result["loss"]:.4f}, accuracy '
             f'{result["accuracy"]:.3f}')

  def by_denoiser(self, step: int, results: Mapping[str, Mapping[str, float]]) -> None:
    """Per-denoiser and per-mode validation under 'denoiser/<name>/<metric>' and
    'mode/<mode>/<metric>'."""
    flat = {f'{group}/{k}': v for group, metrics in results.items()
            for k, v in metrics.items() if k != 'cross_entropy'}
    self.denoiser_history.append({'step': step, **flat})
    self._write('validation', step, flat)
    self.log(f'step {step}: validation loss by denoiser ' + ', '.join(
        f'{k.split("/", 1)[1]} {v["loss"]:.3f}' for k, v in results.items()
        if k.startswith('denoiser/')) + '; by mode ' + ', '.join(
        f'{k.split("/", 1)[1]} {v["loss"]:.3f}' for k, v in results.items()
        if k.startswith('mode/')))

  def task_metrics(self, step: int, task: str, metrics: dict[str, float]) -> None:
    """Task metrics under their own tags, '<task>/<metric>' (the validation loss and token
    accuracy keep 'loss' and 'accuracy')."""
    self.metrics_history.append({'step': step, **metrics})
    self._write('validation', step, {k if '/' in k else f'{task}/{k}': v
                                     for k, v in metrics.items()})
    self.log(f'step {step}: ' + ', '.join(f'{k} {v:.2f}' for k, v in metrics.items()))

  def _write(self, split: str, step: int, values: Mapping[str, float | None]) -> None:
    """To TensorBoard and metrics.jsonl ({'split', 'step', <tag>: value}, one line each)."""
    if self.writers is None or step <= self.logged.get(split, 0):
      return
    import tensorflow as tf
    values = {k: v for k, v in values.items() if k != 'step' and v is not None}
    with self.writers[split].as_default(step=step):
      for name, value in values.items():
        tf.summary.scalar(name, value)
    self.pending_lines.append(json.dumps({'split': split, 'step': step, **values}) + '\n')

  def __enter__(self) -> Records:
    return self

  def __exit__(self, *exc) -> None:
    if self.bar is not None:
      self.bar.close()
    self._write_out()


METRICS_JSONL = 'metrics.jsonl'  # model_dir/metrics.jsonl: every value TensorBoard gets
METRICS_PNG = 'metrics.png'


def duration(seconds: float) -> str:
  """A duration for an ETA.

  >>> duration(3725), duration(42.4), duration(75)
  ('1h02m', '42s', '1m15s')
  """
  seconds = int(round(seconds))
  if seconds >= 3600:
    return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'
  if seconds >= 60:
    return f'{seconds // 60}m{seconds % 60:02d}s'
  return f'{seconds}s'


def plot_metrics(model_dir: str) -> str | None:
  """Draws model_dir/metrics.png from metrics.jsonl: training and validation loss, and the
  task metrics of a fine-tuning run (a second panel); returns its path (None: no metrics).

  The file is the record TensorBoard also gets, so the picture needs no TensorBoard.
  """
  path = checkpoints_lib.join(model_dir, METRICS_JSONL)
  if not checkpoints_lib.exists(path):
    return None
  with checkpoints_lib.open_file(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  series: dict[tuple[str, str], list[tuple[int, float]]] = {}
  for row in rows:
    for name, value in row.items():
      if name not in ('split', 'step') and isinstance(value, (int, float)):
        series.setdefault((row['split'], name), []).append((row['step'], value))
  losses = {k: v for k, v in series.items() if k[1] == 'loss'}
  modes = {k: v for k, v in series.items()
           if k[0] == 'validation' and k[1].startswith('mode/') and k[1].endswith('/loss')}
  tasks = {k: v for k, v in series.items() if k[0] == 'validation' and '/' in k[1]
           and not k[1].startswith(('mode/', 'denoiser/'))}
  if not losses:
    return None
  import matplotlib
  matplotlib.use('Agg')  # files only: no display needed
  import matplotlib.pyplot as plt
  panels = 1 + bool(tasks) + bool(modes)
  fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
  for (split, _), points in sorted(losses.items()):
    steps, values = zip(*sorted(points))
    axes[0][0].plot(steps, values, label=f'{split} loss', marker='o' if split != 'train' else None)
  axes[0][0].set(xlabel='step', ylabel='loss', title=os.path.basename(model_dir.rstrip('/')))
  axes[0][0].legend()
  panel = 1
  for group, ylabel, title in ((modes, 'loss', 'validation loss by mode'),
                               (tasks, 'task metric', 'validation')):
    if not group:
      continue
    for (_, name), points in sorted(group.items()):
      steps, values = zip(*sorted(points))
      label = name.split('/')[1] if group is modes else name
      axes[0][panel].plot(steps, values, label=label, marker='o')
    axes[0][panel].set(xlabel='step', ylabel=ylabel, title=title)
    axes[0][panel].legend(fontsize='small')
    panel += 1
  fig.tight_layout()
  out = checkpoints_lib.join(model_dir, METRICS_PNG)
  with checkpoints_lib.open_file(out, 'wb') as f:
    fig.savefig(f, format='png', dpi=100)
  plt.close(fig)
  return out


def _progress_bar(steps: int, start: int):
  from tqdm import tqdm
  return tqdm(total=steps, initial=start, desc='train', unit='step', dynamic_ncols=True)


def _summary_writers(model_dir: str) -> dict[str, Any]:
  import tensorflow as tf
  return {split: tf.summary.create_file_writer(checkpoints_lib.join(model_dir, split))
          for split in ('train', 'validation')}


def _last_logged_step(directory: str) -> int:
  """The largest step of any scalar in the TensorBoard event files of `directory` (0: none)."""
  import tensorflow as tf
  last = 0
  for path in tf.io.gfile.glob(checkpoints_lib.join(directory, 'events.out.tfevents.*')):
    try:
      for record in tf.data.TFRecordDataset(path):
        event = tf.compat.v1.Event.FromString(record.numpy())
        if event.summary.value:
          last = max(last, event.step)
    except tf.errors.DataLossError:  # a file cut short by a kill: what was read counts
      pass
  return last
