"""Vectorised, next-bar-execution backtests with costs, and the metrics a risk desk reads.

Conventions (DESIGN.md rule 3), exact and tested against an independent loop in tests/test_backtest.py:
- `position[t]` is decided at the close of bar t and held from close t to close t+1, so it earns
  `r[t+1] = close[t+1] / close[t] - 1`. The position before the first bar is flat. The position at the last
  bar earns nothing (there is no next bar) and is not force-closed: the equity is marked to market.
- Every change of position pays, per unit traded, `cost_bps * 1e-4` (commission + slippage) plus half the
  bar's quoted spread relative to price (`spread[t] / close[t] / 2`: a full round trip crosses one spread).
  The cost is charged on bar t, the bar at whose close the trade executes.
- Net return of step t -> t+1: `position[t] * r[t+1] - cost[t]`; equity compounds net returns from 1.0.
- Sharpe, Sortino and annualised volatility come from DAILY-resampled equity (last equity of each UTC date,
  or of each block of bars-per-day when no timestamps are given), annualised with `periods_per_year`
  trading days (260 for 24x5 FX markets, 252 for exchanges) and a zero risk-free rate.
All arithmetic is float64 numpy: backtests are cheap and money is not where to save precision.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pandas as pd

from natron.errors import UserError

POLICY_COLORS = {'ppo': 'tab:red', 'supervised': 'tab:blue', 'buy_and_hold': 'tab:gray',
                 'flat': 'black', 'random': 'tab:olive'}


@dataclasses.dataclass
class Result:
  """Backtest of one position series.

  Arrays have one entry per bar t (length T): `net[t]`/`gross[t]` are the returns of the step from close t to
  close t+1 (0 at the last bar), `cost[t]` the cost charged at bar t, `equity[t]` the equity after that step.
  """
  equity: np.ndarray
  net: np.ndarray
  gross: np.ndarray
  cost: np.ndarray
  position: np.ndarray
  metrics: dict

  @property
  def returns(self) -> np.ndarray:
    return self.net

  def drawdown(self) -> np.ndarray:
    return drawdown(self.equity)


def drawdown(equity: np.ndarray) -> np.ndarray:
  """Fractional drawdown from the running peak, the initial equity of 1.0 included (<= 0)."""
  return equity / np.maximum.accumulate(np.r_[1.0, equity])[1:] - 1.0


def bars_per_day(timeframe: str) -> float:
  """Bars in 24 hours for a pandas-style timeframe ('15min', '1h', '1D')."""
  try:
    delta = pd.Timedelta(timeframe)
  except ValueError as e:
    raise UserError(f'Unknown timeframe {timeframe!r}: use a pandas offset like "15min" or "1h".') from e
  if delta <= pd.Timedelta(0):
    raise UserError(f'Timeframe must be positive, got {timeframe!r}.')
  return pd.Timedelta('1D') / delta


def _as_1d(name: str, x, n: int | None = None) -> np.ndarray:
  a = np.asarray(x, dtype=np.float64)
  if a.ndim != 1:
    raise UserError(f'{name} must be 1-D, got shape {a.shape}.')
  if n is not None and a.shape[0] != n:
    raise UserError(f'{name} has {a.shape[0]} entries but close has {n}.')
  bad = ~np.isfinite(a)
  if bad.any():
    idx = np.flatnonzero(bad)
    raise UserError(f'{name} has {idx.size} non-finite value(s), first at index {idx[:5].tolist()}.')
  return a


def run(close, position, *, cost_bps: float = 1.0, spread=None, time=None, periods_per_year: float = 260,
        timeframe: str = '15min') -> Result:
  """Backtests `position` (units of notional, e.g. -1/0/+1) on `close` with next-bar execution and costs.

  Args:
    close: [T] prices, > 0.
    position: [T] target position decided at the close of each bar.
    cost_bps: commission + slippage per unit traded, in basis points.
    spread: optional [T] quoted spread in price units; half of it is paid per unit traded.
    time: optional [T] timestamps (UTC) used for daily resampling; else blocks of bars-per-day.
    periods_per_year: trading days per year for annualisation.
    timeframe: bar length, used when `time` is None.
  """
  close = _as_1d('close', close)
  t = close.shape[0]
  if t < 2:
    raise UserError(f'A backtest needs at least 2 bars, got {t}.')
  if (close <= 0).any():
    raise UserError(f'close must be > 0; first bad index {int(np.flatnonzero(close <= 0)[0])}.')
  position = _as_1d('position', position, t)
  unit_cost = np.full(t, cost_bps * 1e-4)
  if spread is not None:
    spread = _as_1d('spread', spread, t)
    if (spread < 0).any():
      raise UserError(f'spread must be >= 0; first bad index {int(np.flatnonzero(spread < 0)[0])}.')
    unit_cost = unit_cost + 0.5 * spread / close

  bar_ret = np.zeros(t)
  bar_ret[:-1] = close[1:] / close[:-1] - 1.0
  trade = np.abs(np.diff(position, prepend=0.0))
  cost = trade * unit_cost
  gross = position * bar_ret
  net = gross - cost
  equity = np.cumprod(1.0 + net)
  metrics = compute_metrics(equity, net, position, cost, unit_cost, bar_ret, time=time,
                            periods_per_year=periods_per_year, timeframe=timeframe)
  return Result(equity=equity, net=net, gross=gross, cost=cost, position=position, metrics=metrics)


def daily_returns(equity: np.ndarray, *, time=None, timeframe: str = '15min') -> np.ndarray:
  """Returns of the equity sampled at the last bar of each day (the first relative to 1.0)."""
  if time is not None:
    days = pd.DatetimeIndex(pd.to_datetime(np.asarray(time), utc=True)).normalize()
    if len(days) != len(equity):
      raise UserError(f'time has {len(days)} entries but the series has {len(equity)}.')
    last_of_day = np.flatnonzero(np.r_[days[1:] != days[:-1], True])
  else:
    per_day = max(int(round(bars_per_day(timeframe))), 1)
    last_of_day = np.r_[np.arange(per_day - 1, len(equity) - 1, per_day), len(equity) - 1]
    last_of_day = np.unique(last_of_day)
  daily_equity = np.r_[1.0, equity[last_of_day]]
  return daily_equity[1:] / daily_equity[:-1] - 1.0


def _trades(position: np.ndarray, net_bar: np.ndarray, unit_cost: np.ndarray, bar_ret: np.ndarray):
  """Per-trade net returns: a trade is a maximal run of bars with the same non-zero position sign.

  Costs are attributed to trades: on a bar where the sign changes, the part of the traded quantity that
  closes the old position (|p[t-1]|) is charged to the old trade and the part that opens the new one (|p[t]|)
  to the new trade; a resize within one sign is charged to the running trade.
  """
  sign = np.sign(position)
  prev_sign = np.r_[0.0, sign[:-1]]
  prev_pos = np.r_[0.0, position[:-1]]
  starts = (sign != 0) & (sign != prev_sign)
  if not starts.any():
    return np.zeros(0)
  trade_id = np.cumsum(starts) - 1           # id of the trade open at bar t (valid where sign != 0)
  flip = sign != prev_sign                   # old trade (if any) closes at t
  # Entry/resize part of the cost at bar t belongs to the trade open at t.
  own_cost = np.where(flip, np.abs(position), np.abs(position - prev_pos)) * unit_cost
  own = np.where(sign != 0, position * bar_ret - own_cost, 0.0)
  n_trades = int(starts.sum())
  log_growth = np.bincount(trade_id[sign != 0], weights=np.log1p(own[sign != 0]), minlength=n_trades)
  # Exit part: closing |p[t-1]| at bar t is charged to the trade that was open at t-1.
  exit_bars = np.flatnonzero(flip & (prev_sign != 0))
  if exit_bars.size:
    exit_ids = trade_id[exit_bars - 1]
    exit_cost = np.abs(prev_pos[exit_bars]) * unit_cost[exit_bars]
    log_growth += np.bincount(exit_ids, weights=np.log1p(-exit_cost), minlength=n_trades)
  return np.expm1(log_growth)


def compute_metrics(equity, net, position, cost, unit_cost, bar_ret, *, time=None, periods_per_year=260,
                    timeframe='15min') -> dict:
  """All reported metrics of one backtest (see module docstring for conventions)."""
  daily = daily_returns(equity, time=time, timeframe=timeframe)
  n_days = max(len(daily), 1)
  total = float(equity[-1] - 1.0)
  years = n_days / periods_per_year
  ann_return = float((1.0 + total) ** (1.0 / years) - 1.0) if total > -1 else -1.0
  std = float(np.std(daily, ddof=1)) if len(daily) > 1 else 0.0
  mean = float(np.mean(daily)) if len(daily) else 0.0
  downside = float(np.sqrt(np.mean(np.minimum(daily, 0.0) ** 2))) if len(daily) else 0.0
  dd = drawdown(equity)
  max_dd = float(-dd.min()) if len(dd) else 0.0
  under = dd < 0
  # Longest run of consecutive bars under water.
  run_ids = np.cumsum(~under)
  dd_bars = int(np.bincount(run_ids[under]).max()) if under.any() else 0
  trades = _trades(position, net, unit_cost, bar_ret)
  gains, losses = trades[trades > 0].sum(), -trades[trades < 0].sum()
  held = position[:-1]
  return {
      'total_return': total,
      'annual_return': ann_return,
      'annual_volatility': std * np.sqrt(periods_per_year),
      'sharpe': mean / std * np.sqrt(periods_per_year) if std > 0 else 0.0,
      'sortino': mean / downside * np.sqrt(periods_per_year) if downside > 0 else 0.0,
      'max_drawdown': max_dd,
      'max_drawdown_bars': dd_bars,
      'max_drawdown_days': dd_bars / bars_per_day(timeframe),
      'calmar': ann_return / max_dd if max_dd > 0 else 0.0,
      'turnover': float(np.abs(np.diff(position, prepend=0.0)).sum()),
      'annual_turnover': float(np.abs(np.diff(position, prepend=0.0)).sum() / years),
      'exposure': float(np.mean(held != 0)) if len(held) else 0.0,
      'total_cost': float(cost.sum()),
      'num_trades': int(trades.size),
      'win_rate': float(np.mean(trades > 0)) if trades.size else 0.0,
      'profit_factor': float(gains / losses) if losses > 0 else (float('inf') if gains > 0 else 0.0),
      'avg_trade': float(trades.mean()) if trades.size else 0.0,
      'days': n_days,
      'periods_per_year': periods_per_year,
  }


# --------------------------------------------------------------------------------------------------------
# Baseline policies.
# --------------------------------------------------------------------------------------------------------
def buy_and_hold(n: int) -> np.ndarray:
  return np.ones(n)


def always_flat(n: int) -> np.ndarray:
  return np.zeros(n)


def random_policy(n: int, *, seed: int = 0, mean_hold: float = 12.0) -> np.ndarray:
  """Random short/flat/long positions held for geometric durations (mean `mean_hold` bars).

  Re-drawing every bar would mostly measure costs; holding periods like a real strategy's make it a fair
  "no skill" baseline.
  """
  rng = np.random.default_rng(seed)
  change = rng.random(n) < 1.0 / mean_hold
  change[0] = True
  draws = rng.integers(-1, 2, size=int(change.sum())).astype(np.float64)
  return draws[np.cumsum(change) - 1]


def signal_positions(signal) -> np.ndarray:
  """Supervised signal policy from the predictor's BUY / SELL / HOLD strings: long / short / flat."""
  signal = np.asarray(signal, object)
  return (signal == 'BUY').astype(np.float64) - (signal == 'SELL').astype(np.float64)


# --------------------------------------------------------------------------------------------------------
# Tables and plots.
# --------------------------------------------------------------------------------------------------------
TABLE_METRICS = ('total_return', 'annual_return', 'sharpe', 'sortino', 'max_drawdown', 'calmar',
                 'num_trades', 'win_rate', 'profit_factor', 'exposure', 'turnover', 'total_cost')


def metrics_table(results: dict[str, Result]) -> str:
  """Markdown table, one row per policy; returns as percentages where that is how traders read them."""
  pct = {'total_return', 'annual_return', 'max_drawdown', 'win_rate', 'exposure', 'total_cost'}
  lines = ['| policy | ' + ' | '.join(TABLE_METRICS) + ' |', '|---' * (len(TABLE_METRICS) + 1) + '|']
  for name, res in results.items():
    cells = []
    for key in TABLE_METRICS:
      v = res.metrics[key]
      cells.append(f'{100 * v:.2f}%' if key in pct else (str(v) if isinstance(v, int) else f'{v:.3f}'))
    lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def plot_equity(results: dict[str, Result], path: str, *, time=None, title: str = 'Equity (net of costs)'):
  """Equity curves with a drawdown panel beneath (PNG, matplotlib Agg)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True, gridspec_kw={'height_ratios': [3, 1]})
  for name, res in results.items():
    x = pd.to_datetime(np.asarray(time), utc=True) if time is not None else np.arange(len(res.equity))
    kw = {'color': POLICY_COLORS.get(name), 'lw': 1.4 if name in ('ppo', 'supervised') else 1.0}
    ax1.plot(x, res.equity, label=f"{name} ({100 * res.metrics['total_return']:+.1f}%)", **kw)
    ax2.plot(x, 100 * res.drawdown(), **kw)
  ax1.axhline(1.0, color='black', lw=0.5, ls=':')
  ax1.set_ylabel('equity')
  ax1.set_title(title)
  ax1.legend(loc='best', fontsize=8)
  ax2.set_ylabel('drawdown %')
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def save_results(results: dict[str, Result], directory: str, *, time=None, title='Test span, net of costs'):
  """Writes metrics.json, table.md and equity.png for a set of policies into `directory`."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, 'metrics.json'), 'w') as f:
    json.dump({k: v.metrics for k, v in results.items()}, f, indent=2)
  table = metrics_table(results)
  with open(os.path.join(directory, 'table.md'), 'w') as f:
    f.write(table + '\n')
  plot_equity(results, os.path.join(directory, 'equity.png'), time=time, title=title)
  return table


# --------------------------------------------------------------------------------------------------------
# Phase: every policy on each symbol's held-out test span.
# --------------------------------------------------------------------------------------------------------
def _ppo_positions(workdir: str, symbol: str, time: np.ndarray | None, rows: np.ndarray):
  """PPO positions for `rows` of one symbol from workdir/rl/policy_test*.npz, aligned by timestamp."""
  for path in (os.path.join(workdir, 'rl', f'policy_test_{symbol}.npz'),
               os.path.join(workdir, 'rl', 'policy_test.npz')):
    if not os.path.exists(path):
      continue
    saved = np.load(path, allow_pickle=True)
    if 'symbol' in saved and str(saved['symbol']) not in ('', symbol):
      continue
    if time is not None and 'time' in saved:
      lookup = pd.Series(np.asarray(saved['position'], np.float64),
                         index=pd.DatetimeIndex(pd.to_datetime(saved['time'], utc=True)))
      wanted = pd.DatetimeIndex(pd.to_datetime(time[rows], utc=True))
      if not wanted.isin(lookup.index).all():
        raise UserError(f'{path} does not cover the test span of {symbol}; rerun the rl phase.')
      return lookup.reindex(wanted).to_numpy()
    if len(saved['position']) == len(rows):
      return np.asarray(saved['position'], np.float64)
  return None


def run_phase(config, workdir: str) -> dict:
  """Backtests PPO, the supervised signal, buy-and-hold, flat and random on every symbol's test span.

  Writes workdir/backtest/<symbol>/{metrics.json, table.md, equity.png} and backtest/settings.json.
  """
  from absl import logging  # pylint: disable=g-import-not-at-top
  from natron import data as data_lib  # pylint: disable=g-import-not-at-top
  from natron import dataset as dataset_lib  # pylint: disable=g-import-not-at-top
  from natron.predictor import Predictor  # pylint: disable=g-import-not-at-top

  bt = config.backtest
  frame = data_lib.load_market(config.data)
  ds = dataset_lib.build_dataset(frame, config)
  predictor = Predictor.load(workdir, buckets=(1,), threshold=float(bt.threshold))
  out_dir = os.path.join(workdir, 'backtest')
  summary, spans = {}, []
  for b in ds.bounds:
    sym = b['symbol']
    part = frame.iloc[b['start']:b['stop']].reset_index(drop=True)
    rows = np.arange(b['test_start'] - b['start'], b['stop'] - b['start'])
    if len(rows) < 2:
      raise UserError(f'symbol {sym}: the test span has {len(rows)} bars; use more data or a larger split.')
    pred = predictor.predict_series(part, with_encoded=False)
    close = part['close'].to_numpy(np.float64)[rows]
    spread = part['spread'].to_numpy(np.float64)[rows] if 'spread' in part else None
    time = part['time'].to_numpy() if 'time' in part else None
    kw = dict(cost_bps=float(bt.cost_bps), spread=spread, time=None if time is None else time[rows],
              periods_per_year=float(bt.periods_per_year), timeframe=str(config.data.timeframe))
    policies = {}
    ppo = _ppo_positions(workdir, sym, time, rows)
    if ppo is not None:
      policies['ppo'] = ppo
    else:
      logging.warning('backtest: no PPO policy in %s/rl; run the rl phase to include it.', workdir)
    policies['supervised'] = signal_positions(pred['signal'][rows])
    policies['buy_and_hold'] = buy_and_hold(len(rows))
    policies['flat'] = always_flat(len(rows))
    policies['random'] = random_policy(len(rows), seed=int(config.seed))
    results = {name: run(close, pos, **kw) for name, pos in policies.items()}
    span = (f'{pd.Timestamp(time[rows[0]])} .. {pd.Timestamp(time[rows[-1]])}' if time is not None
            else f'rows {rows[0]}..{rows[-1]}')
    spans.append(f'{sym}: {span} ({len(rows)} bars)')
    table = save_results(results, os.path.join(out_dir, str(sym)), time=kw['time'],
                         title=f'{sym} test span {span}, net of costs')
    logging.info('backtest %s (%s):\n%s', sym, span, table)
    summary[str(sym)] = {name: {k: res.metrics[k] for k in ('total_return', 'sharpe', 'max_drawdown',
                                                              'num_trades')} for name, res in results.items()}
  with open(os.path.join(out_dir, 'settings.json'), 'w') as f:
    json.dump({'cost_bps': float(bt.cost_bps), 'periods_per_year': float(bt.periods_per_year),
               'threshold': float(bt.threshold), 'span': '; '.join(spans)}, f, indent=2)
  return summary
