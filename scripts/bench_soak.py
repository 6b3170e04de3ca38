"""Soak: a long training run of the tiny model with frequent checkpoints, its resident memory
(RSS) and model_dir's disk use sampled while it runs, to show both flat.

    python scripts/bench_soak.py                        # 1,000 steps, a checkpoint every 10
    python scripts/bench_soak.py --steps 5000 --json    # longer; one JSON object

The run is `scripts/train.py --gin_file=smoke.gin` (the tiny model, the MoD at 64/64 tokens,
batch 8, validation every 30 steps) with `--steps`, `--checkpoint_every` and
`keep_checkpoints=3`, in a process of its own, sampled every `--sample_s` seconds (RSS from
/proc/<pid>/status, disk as the bytes under model_dir). Its own progress lines give the step of
each sample.

Reported: RSS and disk per tenth of the run, and two ratios against the run's own baseline,
its second tenth (warm: compiled, the input pipeline filled, `keep` checkpoints on disk): the
mean RSS of the last tenth over the second's, and the largest disk use of the last tenth over
the second's. Targets: <= 1.10 both (a rotation that keeps one step too many shows as +33%
disk; a leak of 100 KB per step as +5% RSS over 1,000 steps).
Exit status 1 when a target is missed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from typing import Sequence

import gin_cli

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
TARGET = 1.10
KEEP = 3


def parse_args(argv: Sequence[str] | None):
  p = gin_cli.argument_parser(__doc__)
  p.add_argument('--steps', type=int, default=1000, help='training steps')
  p.add_argument('--checkpoint_every', type=int, default=10, help='steps between checkpoints')
  p.add_argument('--sample_s', type=float, default=0.5, help='seconds between samples')
  p.add_argument('--model_dir', default=None,
                 help='where the run writes (default: a temporary folder, removed after)')
  p.add_argument('--json', action='store_true', help='print one JSON object instead of tables')
  args = p.parse_args(argv)
  if args.steps < 10 * args.checkpoint_every:
    p.error(f'--steps must be at least 10 checkpoints (10 x --checkpoint_every = '
            f'{10 * args.checkpoint_every})')
  return args


def rss_bytes(pid: int) -> int | None:
  try:
    with open(f'/proc/{pid}/status') as f:
      return int(re.search(r'VmRSS:\s+(\d+) kB', f.read()).group(1)) * 1024
  except (OSError, AttributeError):  # the process ended
    return None


def disk_bytes(folder: str) -> int:
  total = 0
  for where, _, files in os.walk(folder):
    for name in files:
      try:
        total += os.lstat(os.path.join(where, name)).st_size
      except OSError:  # a temporary file orbax renamed meanwhile
        pass
  return total


def soak(args, model_dir: str) -> dict:
  command = [sys.executable, os.path.join(SCRIPTS, 'train.py'), '--gin_file=smoke.gin',
             f'--gin.TRAIN_STEPS={args.steps}', f'--gin.CHECKPOINT_EVERY={args.checkpoint_every}',
             f"--gin.MODEL_DIR='{model_dir}'", f'--gin.train.TrainConfig.keep_checkpoints={KEEP}',
             f'--gin.train.TrainConfig.log_every={args.checkpoint_every}']
  started = time.time()
  proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  step, output = 0, []

  def follow():  # the run's progress lines: 'step 40/1000: loss ...'
    nonlocal step
    for line in proc.stdout:
      output.append(line)
      found = re.match(r'step (\d+)/\d+:', line)
      if found:
        step = int(found.group(1))

  reader = threading.Thread(target=follow, daemon=True)
  reader.start()
  samples = []  # (seconds, step, rss, disk)
  while proc.poll() is None:
    rss = rss_bytes(proc.pid)
    if rss is not None and step > 0:
      samples.append((time.time() - started, step, rss, disk_bytes(model_dir)))
    time.sleep(args.sample_s)
  reader.join(timeout=10)
  if proc.returncode != 0:
    raise SystemExit(f'error: the soak run failed (exit status {proc.returncode}):\n'
                     + proc.stderr.read()[-3000:])
  return {'command': ' '.join(command), 'seconds': time.time() - started, 'samples': samples}


def summarise(args, run: dict) -> dict:
  samples = run['samples']
  tenth = args.steps / 10
  in_tenth = lambda k: [s for s in samples if k * tenth < s[1] <= (k + 1) * tenth]
  mean = lambda values: sum(values) / len(values)
  # Warm from the second tenth on: compiled, the input pipeline filled, `keep` checkpoints on
  # disk (keep x checkpoint_every <= a tenth). Disk is compared max to max: while a save is in
  # flight the directory holds keep + 1 steps.
  base_rss = mean([s[2] for s in in_tenth(1)])
  last_rss = mean([s[2] for s in in_tenth(9)])
  base_disk = max(s[3] for s in in_tenth(1))
  last_disk = max(s[3] for s in in_tenth(9))
  table = []
  for k in range(10):
    rows = in_tenth(k)
    if rows:
      table.append({'steps': f'{int(k * tenth) + 1}-{int((k + 1) * tenth)}',
                    'rss_mb': round(mean([s[2] for s in rows]) / 2**20, 1),
                    'rss_max_mb': round(max(s[2] for s in rows) / 2**20, 1),
                    'disk_mb': round(max(s[3] for s in rows) / 2**20, 2)})
  return {
      'date': time.strftime('%Y-%m-%d'), 'steps': args.steps,
      'checkpoint_every': args.checkpoint_every, 'keep_checkpoints': KEEP,
      'seconds': round(run['seconds'], 1), 'samples': len(samples), 'table': table,
      'rss_last_over_second_tenth': round(last_rss / base_rss, 3),
      'disk_last_over_second_tenth': round(last_disk / base_disk, 3),
      'target': TARGET, 'command': run['command']}


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  with tempfile.TemporaryDirectory(prefix='ul2-soak-') as scratch:
    model_dir = args.model_dir or os.path.join(scratch, 'run')
    report = summarise(args, soak(args, model_dir))
  ok = (report['rss_last_over_second_tenth'] <= TARGET
        and report['disk_last_over_second_tenth'] <= TARGET)
  if args.json:
    print(json.dumps({**report, 'ok': ok}))
    return 0 if ok else 1
  print(f"{report['steps']} steps, a checkpoint every {report['checkpoint_every']} (keep "
        f"{KEEP}), {report['seconds']:.0f} s, {report['samples']} samples")
  print(f"{'steps':>11}  {'RSS MB':>8}  {'max MB':>8}  {'disk MB':>8}")
  for row in report['table']:
    print(f"{row['steps']:>11}  {row['rss_mb']:>8.1f}  {row['rss_max_mb']:>8.1f}  "
          f"{row['disk_mb']:>8.2f}")
  print(f"last tenth / second tenth: RSS (mean) {report['rss_last_over_second_tenth']:.3f}x, "
        f"disk (max) {report['disk_last_over_second_tenth']:.3f}x (targets <= {TARGET:.2f}x): "
        f"{'ok' if ok else 'MISSED'}")
  return 0 if ok else 1


if __name__ == '__main__':  # --help and flag mistakes answer before anything heavy loads
  sys.exit(main())
