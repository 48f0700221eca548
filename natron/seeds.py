"""More than one draw: the same phases for N seeds, and the mean and spread of every figure.

  python launch.py --config=configs/seeds.py:quick --workdir=runs/seeds

A single test span is one draw (the issue that motivated this measured a momentum rule's direction accuracy
anywhere from 0.69 to 0.81 across generator seeds). Seed k runs `seeds.phases` (default finetune, rl, backtest)
into workdir/seeds/seed_<k>/ with config.seed = seed + k and, when `seeds.vary_data` (synthetic data only), a new
market: data.synthetic_seed = synthetic_seed + k. Finished seeds are skipped on a rerun (same config). Writes
workdir/seeds/{summary.json, report.md}: per seed and across seeds (mean ± std) the supervised test accuracy of
the model and of every baseline, its margins over them with the 95% intervals and verdicts of each seed, and
each policy's backtest figures. Folds of walk-forward (natron.walkforward) are the other way to get N draws.
"""
from __future__ import annotations

import json
import os
import time

from absl import logging
import numpy as np

from natron import walkforward as wf
from natron.errors import UserError

PHASE = 'seeds'


def seed_config(config, k: int):
  """The config seed k runs with: model seed (and, with vary_data, the synthetic market's seed) shifted by k."""
  cfg = config.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.seed = int(config.seed) + k
    if bool(config.seeds.get('vary_data', True)):
      if str(config.data.get('path', '') or ''):
        raise UserError('seeds.vary_data needs the built-in synthetic market (data.path is set): set '
                        'seeds.vary_data=False to vary only the model seed on your data.')
      cfg.data.synthetic_seed = int(config.data.synthetic_seed) + k
    cfg.phase = ''
    cfg.phases = tuple(config.seeds.phases)
    if 'rl' not in cfg.phases and 'finetune' in cfg:
      cfg.finetune.rl_holdout = 0.0    # no PPO to hold bars out for: fine-tune on the whole training span
  return cfg


def run_phase(config, workdir: str) -> dict:
  if 'seeds' not in config:
    raise UserError('The config has no seeds section: use configs/seeds.py.')
  n = int(config.seeds.n)
  if n < 1:
    raise UserError(f'seeds.n must be >= 1, got {n}.')
  phases = tuple(config.seeds.phases)
  unknown = [p for p in phases if p not in wf.FOLD_PHASES]
  if not phases or unknown:
    raise UserError(f'seeds.phases must name phases among {sorted(wf.FOLD_PHASES)}, got {phases}')
  out_dir = os.path.join(workdir, PHASE)
  rows, durations = [], []
  for k in range(n):
    seed_dir = os.path.join(out_dir, f'seed_{k}')
    cfg = seed_config(config, k)
    fingerprint = wf.config_fingerprint(cfg)
    done = wf._load_json(os.path.join(seed_dir, 'summary.json'))  # pylint: disable=protected-access
    if done is not None and done.get('config_sha256') == fingerprint:
      logging.info('seeds: seed_%d already done; skipped.', k)
    else:
      t0 = time.time()
      results = wf._run_phases(cfg, seed_dir, phases)  # pylint: disable=protected-access
      with open(os.path.join(seed_dir, 'summary.json'), 'w') as f:
        json.dump({'seed': cfg.seed, 'synthetic_seed': cfg.data.synthetic_seed, 'config_sha256': fingerprint,
                   'results': results}, f, indent=2, default=str)
      durations.append(time.time() - t0)
      logging.info('seeds: seed_%d of %d done in %.0f s; ETA %.0f s.', k + 1, n, durations[-1],
                   np.mean(durations) * (n - k - 1))
    rows.append({'fold': k, 'seed': int(cfg.seed), 'synthetic_seed': int(cfg.data.synthetic_seed),
                 **wf.fold_metrics(seed_dir)})
  summary = {'n': n, 'phases': list(phases), 'vary_data': bool(config.seeds.get('vary_data', True)),
             'seeds': rows, 'aggregate': wf.aggregate(rows)}
  with open(os.path.join(out_dir, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=2, default=wf._json_default)  # pylint: disable=protected-access
  with open(os.path.join(out_dir, 'report.md'), 'w') as f:
    f.write(report_markdown(summary))
  return {'seeds': n, **wf._flat_headline(summary['aggregate'])}  # pylint: disable=protected-access


def report_markdown(summary: dict) -> str:
  """Per seed and across seeds (mean ± std): supervised figures beside the baselines, and the backtests."""
  rows, agg = summary['seeds'], summary['aggregate']
  lines = ['# Several draws', '',
           f"{summary['n']} runs of {', '.join(summary['phases'])} with model seeds "
           f"{', '.join(str(r['seed']) for r in rows)}"
           + (f" on synthetic markets {', '.join(str(r['synthetic_seed']) for r in rows)}" if summary['vary_data']
              else ' on the same data') + '. "Fold" below means seed run.', '']
  ms = lambda s, fn, std_fn=None: wf._ms(s, fn, std_fn) if s else 'n/a'  # pylint: disable=protected-access
  acc = lambda x: wf._num(x, '.3f')  # pylint: disable=protected-access
  if agg['supervised']:
    lines += ['## Supervised test accuracy across seeds (mean ± std)', '',
              '| task | model | majority | momentum | linear | seeds with skill over the best baseline |',
              '|---|---|---|---|---|---|']
    for t, m in agg['supervised'].items():
      lines.append(f"| {t} | {ms(m.get('accuracy'), acc)} | {ms(m.get('majority_baseline'), acc)} | "
                   f"{ms(m.get('momentum_accuracy'), acc)} | {ms(m.get('linear_accuracy'), acc)} | "
                   f"{m.get('folds_with_skill', 'n/a')} of {m.get('folds_with_verdict', 'n/a')} |")
    lines.append('')
    lines += wf.baseline_lines(rows, agg)
  for sym, pols in agg['backtest'].items():
    lines += [f'## Backtest across seeds: {sym}', '',
              '| policy | total return (mean ± std) | Sharpe (mean ± std) | max drawdown (mean) | beats flat |',
              '|---|---|---|---|---|']
    for p, m in pols.items():
      lines.append(f"| {p} | {ms(m['total_return'], wf._pct, lambda x: wf._pct(x, sign=False))} | "
                   f"{ms(m['sharpe'], wf._num)} | "  # pylint: disable=protected-access
                   f"{wf._drawdown(m['max_drawdown']['mean'])} | {wf._wins(m, 'flat')} |")  # pylint: disable=protected-access
    lines += ['', '| seed | policy | total return | 95% CI | verdict |', '|---|---|---|---|---|']
    for r in rows:
      for p, m in r['backtest'].get(sym, {}).items():
        ci = m.get('total_return_ci')
        lines.append(f"| {r['fold']} | {p} | {wf._pct(m['total_return'])} | "  # pylint: disable=protected-access
                     f"{f'[{wf._pct(ci[0])}, {wf._pct(ci[1])}]' if ci else 'n/a'} | {m.get('verdict', '')} |")  # pylint: disable=protected-access
    lines.append('')
  return '\n'.join(lines) + '\n'
