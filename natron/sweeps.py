"""Sweep tables that cannot be used to pick on the test span (issue 13, item 5).

`launch.py --sweep` runs one configuration per override; this module ranks them by a VALIDATION metric only,
shows validation figures for every run and test figures for the chosen configuration alone, and tells every run
how many configurations were tried (`trials_config`) so its Deflated Sharpe counts them.
"""
from __future__ import annotations

import math

# The validation metric sweeps rank by, in order of preference; else the first '*.val_*' number.
VALIDATION_KEYS = ('finetune.val_mean_macro_f1', 'rl.val_total_return', 'pretrain.val_loss')


def is_test_key(key: str) -> bool:
  """A flattened summary key that holds a test-span figure ('finetune.test_buy_accuracy', 'backtest.X.ppo...')."""
  return any(part.startswith('test') or part == 'test' for part in key.split('.')) or key.startswith('backtest.')


def ranking_key(rows: list[dict]) -> str | None:
  keys = list(dict.fromkeys(k for r in rows for k in r))
  for key in VALIDATION_KEYS:
    if key in keys:
      return key
  return next((k for k in keys if '.val_' in k and any(isinstance(r.get(k), (int, float)) for r in rows)), None)


def rank(rows: list[dict]) -> tuple[list[dict], dict | None, str | None]:
  """(rows sorted best first by the validation metric, the chosen row, the metric); unranked without one."""
  key = ranking_key(rows)
  if key is None:
    return list(rows), None, None
  lower_is_better = key.endswith('loss')

  def score(r):
    v = r.get(key)
    ok = isinstance(v, (int, float)) and math.isfinite(v)
    return (0, v if lower_is_better else -v) if ok else (1, 0.0)

  ordered = sorted(rows, key=score)
  return ordered, ordered[0], key


def trials_config(config, n_runs: int) -> None:
  """Multiplies config.evaluation.trials by the sweep size (in place; the config must be unlocked)."""
  if 'evaluation' in config:
    config.evaluation.trials = int(config.evaluation.trials) * int(n_runs)


def _fmt(v):
  return f'{v:.4g}' if isinstance(v, float) else str(v)


def markdown(rows: list[dict]) -> str:
  """sweep.md: every run's overrides and validation figures, ranked; the chosen run's test figures below."""
  ordered, chosen, key = rank(rows)
  keys = [k for k in dict.fromkeys(k for r in ordered for k in r) if not is_test_key(k)]
  lines = ['| ' + ' | '.join(keys) + ' |', '|' + '---|' * len(keys)]
  lines += ['| ' + ' | '.join(_fmt(r.get(k, '')) for k in keys) + ' |' for r in ordered]
  if chosen is None:
    lines += ['', 'No validation metric in the summaries: runs are not ranked and no test figure is shown.']
    return '\n'.join(lines) + '\n'
  lines += ['', f'Ranked by validation {key} ({len(rows)} configurations tried; each run\'s Deflated Sharpe counts '
            f'them). Test figures of the chosen configuration ({chosen.get("run")}) only:', '',
            '| metric | value |', '|---|---|']
  lines += [f'| {k} | {_fmt(v)} |' for k, v in chosen.items() if is_test_key(k)]
  return '\n'.join(lines) + '\n'
