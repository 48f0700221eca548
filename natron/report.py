"""workdir/report.md: the one page a trader reads first.

It only collects what the phases wrote (nothing is recomputed here, so the report cannot disagree with the
artefacts): the data and label summary, supervised metrics beside their baselines (majority, momentum, linear) with
block-bootstrap intervals and verdicts, the test-span backtest table of every policy (PPO, supervised, momentum,
linear, buy-and-hold, flat, random) with return / Sharpe intervals, PSR, DSR and verdicts, and the plots. A phase that did
not run is named as missing, never silently left out, and losses are shown as losses.
"""
from __future__ import annotations

import glob
import json
import os

from absl import logging

from natron.backtest import cost_text

TASKS = ('buy', 'sell', 'direction', 'regime')


def _load_json(path):
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return None


def _read(path):
  if os.path.exists(path):
    with open(path) as f:
      return f.read().strip()
  return None


def _pct(x):
  return f'{100 * x:.1f}%' if isinstance(x, (int, float)) else 'n/a'


def data_section(workdir: str) -> list[str]:
  summary = _load_json(os.path.join(workdir, 'dataset', 'summary.json'))
  if summary is None:
    return ['## Data and labels', '', '_The dataset phase did not run in this workdir._', '']
  lines = ['## Data and labels', '']
  md = _read(os.path.join(workdir, 'dataset', 'summary.md'))
  if md:
    lines += [md, '']
  else:
    lines += ['```json', json.dumps(summary, indent=2, default=str)[:4000], '```', '']
  return lines


def supervised_section(workdir: str) -> list[str]:
  report = _load_json(os.path.join(workdir, 'finetune', 'report.json'))
  lines = ['## Supervised heads (held-out, chronologically later data)', '']
  if report is None:
    return lines + ['_The finetune phase did not run in this workdir._', '']
  lines += ['| split | task | accuracy | majority baseline | margin | macro-F1 |', '|---|---|---|---|---|---|']
  for split in ('val', 'test'):
    for task in TASKS:
      m = (report.get(split) or {}).get(task)
      if not m:
        continue
      margin = m['accuracy'] - m['majority_baseline']
      lines.append(f"| {split} | {task} | {_pct(m['accuracy'])} | {_pct(m['majority_baseline'])} | "
                   f"{100 * margin:+.1f} pts | {m['macro_f1']:.3f} |")
  lines.append('')
  from natron.train import evaluate  # pylint: disable=g-import-not-at-top
  for split in ('val', 'test'):
    table = evaluate.baseline_table(report.get(split) or {}, TASKS)
    if table:
      lines += [f'### {split}: beside majority, momentum and linear baselines (95% block-bootstrap intervals)', '']
      lines += table + ['']
      lines += [f"- {split} / {task}: {report[split][task]['verdict']}." for task in TASKS
                if 'verdict' in (report[split].get(task) or {})] + ['']
  for png in sorted(glob.glob(os.path.join(workdir, 'inspect', '*confusion*.png')))[:4]:
    lines.append(f'![{os.path.basename(png)}]({os.path.relpath(png, workdir)})')
  return lines + ['']


def backtest_section(workdir: str) -> list[str]:
  lines = ['## Backtest on the test span (next-bar execution, net of costs)', '']
  dirs = sorted(d for d in glob.glob(os.path.join(workdir, 'backtest', '*')) if os.path.isdir(d))
  if not dirs:
    return lines + ['_The backtest phase did not run in this workdir._', '']
  settings = _load_json(os.path.join(workdir, 'backtest', 'settings.json'))
  if settings:
    lines += [f"Annualised with {settings.get('periods_per_year')} trading days from daily equity; "
              f"test span {settings.get('span', 'n/a')}. Costs per symbol below, as the backtest applied them.",
              '']
    for sym, why in (settings.get('skipped') or {}).items():
      lines += [f'- {sym}: not backtested ({why}).', '']
  for d in dirs:
    table = _read(os.path.join(d, 'table.md'))
    metrics = _load_json(os.path.join(d, 'metrics.json')) or {}
    cost = next((m.get('cost_model') for m in metrics.values() if isinstance(m, dict) and m.get('cost_model')),
                None)
    if table and 'Costs (' in table:
      table = table[:table.index('Costs (')].rstrip()   # stated once below, the same words
    lines += [f'### {os.path.basename(d)}', '', table or '_no table_', '',
              f'Costs ({os.path.basename(d)}): {cost_text(cost)}.', '']
    days = next(iter(metrics.values()), {}).get('days')
    if days is not None and days < 126:
      lines.append(f'- Caution: the test span is {days} trading days; annualised return, Sharpe, Sortino and '
                   'Calmar extrapolate it to a year and overstate what a year would look like.')
    for name in ('ppo', 'supervised', 'momentum', 'linear'):
      if name in metrics:
        m = metrics[name]
        total = m['total_return']
        verdict = 'made' if total > 0 else 'LOST'
        flat = metrics.get('flat', {}).get('total_return', 0.0)
        bh = metrics.get('buy_and_hold', {}).get('total_return')
        ci = m.get('total_return_ci')
        interval = f' [95% CI {_pct(ci[0])}, {_pct(ci[1])}]' if ci else ''
        sharpe = (f"; PSR {m['psr']:.2f}, DSR {m['dsr']:.2f}" if 'psr' in m and 'dsr' in m else '')
        lines.append(f'- {name}: {verdict} {100 * abs(total):.2f}% after costs{interval} '
                     f'(flat {100 * flat:+.2f}%, buy-and-hold {_pct(bh)}){sharpe}'
                     + (f". Verdict: {m['verdict']}." if 'verdict' in m else '.'))
    lines += ['', f'![equity]({os.path.relpath(os.path.join(d, "equity.png"), workdir)})', '']
  return lines


def rl_section(workdir: str) -> list[str]:
  metrics = _load_json(os.path.join(workdir, 'rl', 'metrics.json'))
  lines = ['## PPO training', '']
  if metrics is None:
    return lines + ['_The rl phase did not run in this workdir._', '']
  keep = {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}
  lines += ['| key | value |', '|---|---|'] + [f'| {k} | {v} |' for k, v in keep.items()]
  lines += ['', f"Costs ({metrics.get('symbol', 'n/a')}, test span): {cost_text(metrics.get('cost_model'))}."]
  return lines + ['']


def attention_section(workdir: str) -> list[str]:
  pngs = sorted(glob.glob(os.path.join(workdir, 'inspect', '*attention*.png')))[:2]
  if not pngs:
    return []
  return ['## Attention (test windows)', ''] + [
      f'![{os.path.basename(p)}]({os.path.relpath(p, workdir)})' for p in pngs] + ['']


def build_report(workdir: str) -> str:
  config = _load_json(os.path.join(workdir, 'config.json')) or {}
  data = config.get('data', {})
  source = data.get('path') or f"built-in synthetic market ({data.get('synthetic_bars')} bars)"
  lines = ['# Natron report', '', f'Workdir: `{os.path.abspath(workdir)}`  ', f'Data: {source}', '',
           'Every figure below is measured on data chronologically after the training span, separated by a '
           'purge gap, next to baselines fitted on the training span only (majority, a momentum rule, a linear model), '
           'with 95% block-bootstrap intervals and a verdict: "skill over <baseline>" only when the whole interval '
           'of the margin lies above zero.', '']
  for section in (data_section, supervised_section, backtest_section, rl_section, attention_section):
    lines += section(workdir)
  if os.path.exists(os.path.join(workdir, 'walkforward', 'report.md')):
    lines += ['## Walk-forward', '', 'Per-fold and aggregate test metrics: '
              '[walkforward/report.md](walkforward/report.md).', '']
  return '\n'.join(lines) + '\n'


def run_phase(config, workdir: str) -> dict:
  del config
  import jax  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, 'report.md')
  if jax.process_index() != 0:   # multi-host: process 0 alone writes
    return {'report': path}
  text = build_report(workdir)
  with open(path, 'w') as f:
    f.write(text)
  logging.info('Report written to %s', path)
  return {'report': path}
