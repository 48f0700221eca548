"""Vectorised, next-bar-execution backtests with costs, and the metrics a risk desk reads.

Conventions (DESIGN.md rule 3), exact and tested against an independent loop in tests/test_backtest.py:
- `position[t]` is decided at the close of bar t and held from close t to close t+1, so it earns
  `r[t+1] = close[t+1] / close[t] - 1`. The position before the first bar is flat.
- The book is closed at the last bar: the position held into it (`position[T-2]`) is closed at the last close
  and pays its exit cost there. `position[T-1]` is never executed (there is no next bar to hold it to), so the
  executed positions (`Result.position`) end at 0 and every trade is a full round trip.
- Every change of position pays, per unit traded, `cost_bps * 1e-4` (commission + slippage) plus half the
  bar's quoted spread relative to price (`spread[t] / close[t] / 2`: a full round trip crosses one spread).
  The cost is charged on bar t, the bar at whose close the trade executes.
- Net return of step t -> t+1: `position[t] * r[t+1] - cost[t]`; equity compounds net returns from 1.0.
- Sharpe, Sortino and annualised volatility come from DAILY-resampled equity (the last equity of each trading
  day, or of each block of bars-per-day when no timestamps are given), annualised with `periods_per_year`
  trading days (260 for 24x5 FX markets, 252 for exchanges) and a zero risk-free rate.
- Trading days (`trading_days`): a bar's day is its date in the session clock, which starts the day at
  17:00 New York (the FX roll-over: 22:00 UTC in winter, 21:00 UTC in summer; broker server time UTC+2/+3
  is this clock's midnight). A bar that falls on a Saturday of that clock (Friday after the roll) belongs to
  Friday, one on a Sunday (a Sunday open before the roll) to Monday. A 24x5 market of N weeks therefore has
  exactly 5N days, whether its times came in UTC or in broker time (converted to UTC at load); exchanges
  (sessions inside one New York day) keep their calendar dates.

Costs in the phases (`resolve_costs`): commission from config.backtest.cost_bps (rl.cost_bps in the rl
phase), spread from the data (price units) or, for a symbol whose data has none, from config.backtest.spread
(price units or points); with neither the run stops with a UserError: it never falls back silently to
commission only. `run(spread=None)` means zero spread and is for library callers that pass costs explicitly.
All arithmetic is float64 numpy: backtests are cheap and money is not where to save precision.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import numpy as np
import pandas as pd

from natron import stats
from natron.errors import UserError

POLICY_COLORS = {'ppo': 'tab:red', 'supervised': 'tab:blue', 'buy_and_hold': 'tab:gray',
                 'flat': 'black', 'random': 'tab:olive', 'momentum': 'tab:orange', 'linear': 'tab:purple'}
# Policies a model must beat: each traded with the same costs. A model's verdict is against the best of them.
BASELINE_POLICIES = ('flat', 'buy_and_hold', 'momentum', 'linear')

# The session clock of `trading_days`: 'HH:MM <IANA zone>' at which a trading day starts.
TRADING_DAY = '17:00 America/New_York'


@dataclasses.dataclass
class Result:
  """Backtest of one position series.

  Arrays have one entry per bar t (length T): `net[t]`/`gross[t]` are the returns of the step from close t to
  close t+1 (0 at the last bar), `cost[t]` the cost charged at bar t (at the last bar: closing the book),
  `equity[t]` the equity after that step, `position[t]` the EXECUTED position (the input with the last entry
  0: the book is closed at the last bar).
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
        timeframe: str = '15min', trading_day: str = TRADING_DAY) -> Result:
  """Backtests `position` (units of notional, e.g. -1/0/+1) on `close` with next-bar execution and costs.

  The position held into the last bar is closed at the last close and pays its cost there; `position[T-1]`
  is not executed (see the module docstring).

  Args:
    close: [T] prices, > 0.
    position: [T] target position decided at the close of each bar.
    cost_bps: commission + slippage per unit traded, in basis points.
    spread: optional [T] quoted spread in price units; half of it is paid per unit traded. None means ZERO
      spread: the phases never pass None, they go through `resolve_costs`.
    time: optional [T] timestamps (UTC when naive) used for daily resampling; else blocks of bars-per-day.
    periods_per_year: trading days per year for annualisation.
    timeframe: bar length, used when `time` is None.
    trading_day: the session clock of `trading_days`.
  """
  close = _as_1d('close', close)
  t = close.shape[0]
  if t < 2:
    raise UserError(f'A backtest needs at least 2 bars, got {t}.')
  if (close <= 0).any():
    raise UserError(f'close must be > 0; first bad index {int(np.flatnonzero(close <= 0)[0])}.')
  position = _as_1d('position', position, t).copy()
  position[-1] = 0.0   # the book is closed at the last close (the position held into it pays its exit)
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
                            periods_per_year=periods_per_year, timeframe=timeframe, trading_day=trading_day)
  metrics['commission_bps'] = float(cost_bps)
  metrics['mean_spread'] = float(np.mean(spread)) if spread is not None else 0.0
  return Result(equity=equity, net=net, gross=gross, cost=cost, position=position, metrics=metrics)


def _utc_index(time) -> pd.DatetimeIndex:
  """Timestamps as a UTC DatetimeIndex: naive values are taken as UTC, aware ones converted."""
  if isinstance(time, (pd.DatetimeIndex, pd.Series)):
    index = pd.DatetimeIndex(time)
  else:
    arr = np.asarray(time)
    index = pd.DatetimeIndex(pd.to_datetime(arr, utc=arr.dtype == object))
  return index.tz_localize('UTC') if index.tz is None else index.tz_convert('UTC')


def _parse_trading_day(spec: str) -> tuple[pd.Timedelta, str]:
  match = re.fullmatch(r'\s*(\d{1,2}):(\d{2})\s+(\S+)\s*', str(spec))
  if not match:
    raise UserError(f"trading_day must be 'HH:MM <time zone>' such as {TRADING_DAY!r}, got {spec!r}.")
  hours, minutes, tz = int(match.group(1)), int(match.group(2)), match.group(3)
  if hours > 23 or minutes > 59:
    raise UserError(f'trading_day {spec!r}: not a time of day.')
  try:
    pd.Timestamp('2024-01-01', tz=tz)
  except Exception as e:  # pylint: disable=broad-except  (pytz / zoneinfo raise different types)
    raise UserError(f'trading_day {spec!r}: unknown time zone {tz!r} (use an IANA name).') from e
  return pd.Timedelta(hours=hours, minutes=minutes), tz


def trading_days(time, trading_day: str = TRADING_DAY) -> np.ndarray:
  """datetime64[D] [T]: the trading day of each bar (rule in the module docstring).

  A day starts at `trading_day` ('HH:MM zone', default 17:00 New York); a bar's day is the date of
  `local time - start + 24h`; Saturdays of that clock join the Friday before, Sundays the Monday after.
  """
  start, tz = _parse_trading_day(trading_day)
  local = _utc_index(time).tz_convert(tz).tz_localize(None)
  days = (local - start + pd.Timedelta('1D')).normalize().to_numpy().astype('datetime64[D]')
  weekday = (days.astype(np.int64) + 3) % 7           # 1970-01-01 was a Thursday: Monday = 0
  shift = np.where(weekday == 5, -1, np.where(weekday == 6, 1, 0))
  return days + shift.astype('timedelta64[D]')


def daily_returns(equity: np.ndarray, *, time=None, timeframe: str = '15min',
                  trading_day: str = TRADING_DAY) -> np.ndarray:
  """Returns of the equity sampled at the last bar of each trading day (the first relative to 1.0)."""
  if time is not None:
    days = trading_days(time, trading_day)
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
                    timeframe='15min', trading_day: str = TRADING_DAY) -> dict:
  """All reported metrics of one backtest (see module docstring for conventions)."""
  daily = daily_returns(equity, time=time, timeframe=timeframe, trading_day=trading_day)
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
# Costs: one resolver for every phase (backtest, rl, walk-forward).
# --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CostModel:
  """The costs one symbol's run pays: commission per unit traded plus half of each bar's spread.

  spread: float64 [T] quoted spread in price units, one per bar of the span it was resolved for;
  spread_source: where the spread came from (the data, or config.backtest.spread and how it was converted);
  point: the symbol's price increment (None when unknown: the spread in points is then not reported).
  """
  symbol: str
  commission_bps: float
  spread: np.ndarray
  spread_source: str
  point: float | None = None
  commission_source: str = 'backtest.cost_bps'

  def span(self, start: int, stop: int) -> 'CostModel':
    """The same model over bars [start, stop) (reports describe the span actually traded)."""
    return dataclasses.replace(self, spread=self.spread[start:stop])

  @property
  def mean_spread(self) -> float:
    return float(np.mean(self.spread)) if len(self.spread) else 0.0

  def describe(self) -> dict:
    """JSON-able: what every report states per symbol."""
    mean = self.mean_spread
    return {'symbol': self.symbol, 'commission_bps': self.commission_bps,
            'commission_source': self.commission_source, 'spread_source': self.spread_source,
            'mean_spread': mean, 'mean_spread_points': mean / self.point if self.point else None,
            'point': self.point, 'bars': int(len(self.spread))}


def cost_text(cost: dict | None) -> str:
  """One line for reports from `CostModel.describe()` (or a saved copy of it)."""
  if not cost:
    return 'cost model not recorded (an artefact written before costs were reported; rerun the phase)'
  points = cost.get('mean_spread_points')
  in_points = f' = {points:.2f} points' if isinstance(points, (int, float)) else ''
  spread = (f"plus half the spread, mean {cost.get('mean_spread', 0.0):.6g} in price units{in_points}, "
            f"from {cost.get('spread_source')}")
  if not cost.get('mean_spread'):
    spread = f"and a ZERO spread ({cost.get('spread_source')})"
  return f"commission {cost.get('commission_bps')} bps per unit traded ({cost.get('commission_source')}) {spread}"


_SPREAD_ENTRY = re.compile(r'^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(points?|pts?)?\s*$')


def parse_spread(text) -> dict:
  """config.backtest.spread -> {symbol or '*': (value, 'points' | 'price')}.

  '1.2 points' and '0.00012' (price units) apply to every symbol; 'EURUSD=1.2 points,USDJPY=0.015' per symbol
  (an entry without a name is the default for the others).
  """
  out = {}
  for part in str(text).split(','):
    if not part.strip():
      continue
    name, _, value = part.rpartition('=')
    name = name.strip() or '*'
    match = _SPREAD_ENTRY.match(value)
    if not match:
      raise UserError(f"backtest.spread: cannot read {part.strip()!r}; write '1.2 points', a price such as "
                      "'0.00012', or per symbol 'EURUSD=1.2 points,USDJPY=0.015'.")
    if name in out:
      raise UserError(f'backtest.spread names {name if name != "*" else "a default"} twice: {text!r}.')
    out[name] = (float(match.group(1)), 'points' if match.group(2) else 'price')
  if not out:
    raise UserError(f'backtest.spread {text!r} names no spread.')
  return out


def _point_of(symbol: str, config, points) -> float | None:
  """The symbol's point: market.attrs['points'] (set by natron.data.load_market), else config.data.point."""
  if points and points.get(symbol):
    return float(points[symbol])
  text = config.data.get('point', None) if 'data' in config else None
  if not text:
    return None
  from natron.data import parse_point_setting  # pylint: disable=g-import-not-at-top
  if isinstance(text, str) and '=' in text:   # per symbol: only this symbol's entry matters here
    entries = dict(part.split('=', 1) for part in text.split(',') if '=' in part)
    text = entries.get(symbol)
    if text is None:
      return None
  return parse_point_setting(text, [symbol])[symbol]


def resolve_costs(part: pd.DataFrame, symbol: str, config, points: dict | None = None, *,
                  spread_sources: dict | None = None, cost_bps: float | None = None,
                  commission_source: str = 'backtest.cost_bps') -> CostModel:
  """The cost model of one symbol's rows, the only place the phases get costs from.

  Args:
    part: the symbol's rows (a `spread` column in price units when the data has one).
    symbol: its name (as in config.backtest.spread and `points`).
    config: the full config (backtest.cost_bps, backtest.spread, data.point).
    points: {symbol: point}, market.attrs['points'] from natron.data.load_market (else data.point is read).
    spread_sources: {symbol: text or None}, market.attrs['spread_sources']: how the data's spread was made.
    cost_bps: commission override (the rl phase's rl.cost_bps), named by `commission_source`.

  Returns:
    CostModel over all rows of `part`: the data's spread when it has one, else config.backtest.spread.

  Raises:
    UserError: no spread in the data and none in config.backtest.spread (never commission only), a spread in
      points for a symbol without a known point, a missing or negative spread value.
  """
  from absl import logging  # pylint: disable=g-import-not-at-top
  symbol = str(symbol)
  n = len(part)
  commission = float(config.backtest.cost_bps) if cost_bps is None else float(cost_bps)
  if not (np.isfinite(commission) and commission >= 0):
    raise UserError(f'{commission_source} must be a finite number >= 0, got {commission}.')
  point = _point_of(symbol, config, points)
  spec_text = config.backtest.get('spread', None)
  spec = parse_spread(spec_text) if spec_text else {}

  data, data_source = None, None
  if 'spread' in part.columns and not part['spread'].isna().all():
    data = part['spread'].to_numpy(np.float64)
    data_source = (spread_sources or {}).get(symbol) or "the data's spread column (price units)"
  elif 'spread_points' in part.columns and not part['spread_points'].isna().all():
    if point is None:
      raise UserError(f'symbol {symbol}: the data has spreads in points (MT5 <SPREAD>) but no point to convert '
                      'them: set data.point (e.g. 1e-5 for EURUSD, 1e-3 for USDJPY).')
    data = part['spread_points'].to_numpy(np.float64) * point
    data_source = f'the data\'s spread in points x point {point:g}'
  if data is not None:
    bad = ~np.isfinite(data) | (data < 0)
    if bad.any():
      rows = np.flatnonzero(bad)
      raise UserError(f'symbol {symbol}: the spread is missing or negative in {rows.size} of {n} rows (first '
                      f'rows {rows[:5].tolist()}); fix the data or drop the column and set backtest.spread.')
    source = f'data: {data_source}'
    if spec:
      logging.warning('costs: %s uses the spread of its data; backtest.spread=%r is for data without one.',
                      symbol, spec_text)
      source += f'; backtest.spread={spec_text!r} not used (the data has a spread)'
    return CostModel(symbol, commission, data, source, point, commission_source)

  entry = spec.get(symbol, spec.get('*'))
  if entry is None:
    named = '' if not spec else f' (backtest.spread={spec_text!r} names no spread for {symbol})'
    raise UserError(
        f'symbol {symbol}: the data has no spread and no spread is configured{named}. A backtest never falls '
        f"back to commission only: set --config.backtest.spread='1.2 points' (needs the point: data.point or "
        f"inferred from the quotes), a price such as '0.00012', or per symbol "
        f"'EURUSD=1.2 points,USDJPY=0.015'; '0' states a zero spread explicitly.")
  value, unit = entry
  if unit == 'points':
    if point is None:
      raise UserError(f'symbol {symbol}: backtest.spread={spec_text!r} is in points but the point of {symbol} '
                      'is unknown: set data.point (e.g. 1e-5), or give the spread in price units.')
    price, source = value * point, f'config backtest.spread: {value:g} points x point {point:g}'
  else:
    price, source = value, f'config backtest.spread: {value:g} (price units)'
  return CostModel(symbol, commission, np.full(n, price), source, point, commission_source)


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


def baseline_positions(workdir: str, ds, bound: dict, rows: np.ndarray, threshold: float) -> dict:
  """{'momentum', 'linear'}: positions [len(rows)] of the finetune phase's baselines on one symbol's `rows`.

  momentum: the fitted direction rule (+1 UP / -1 DOWN / 0); linear: the linear model's buy / sell
  probabilities through the supervised signal rule at `threshold`, flat where a bar has no full window. Empty
  when workdir/finetune/baselines does not exist (a bundle trained before the baselines were).
  """
  from absl import logging  # pylint: disable=g-import-not-at-top
  from natron import baselines  # pylint: disable=g-import-not-at-top
  from natron.predictor import signal_rule  # pylint: disable=g-import-not-at-top
  saved = baselines.load(os.path.join(workdir, 'finetune', 'baselines'))
  if saved is None:
    logging.warning('backtest: no baselines in %s/finetune/baselines; rerun finetune to trade momentum and '
                    'the linear model.', workdir)
    return {}
  momentum, linear = saved
  rows_global = int(bound['start']) + np.asarray(rows, np.int64)
  out = {'momentum': baselines.momentum_position(ds, momentum)[rows_global]}
  valid = np.unique(np.concatenate([ds.ends[s] for s in ds.ends]))
  have = np.isin(rows_global, valid)
  position = np.zeros(len(rows_global))
  if have.any():
    probs = baselines.linear_probabilities(linear, ds, rows_global[have])
    position[have] = signal_positions(signal_rule(probs['buy'][:, 1], probs['sell'][:, 1], float(threshold)))
  out['linear'] = position
  return out


def evidence(results: dict, *, time=None, timeframe: str = '15min', trading_day: str = TRADING_DAY,
             block_days: int = -1, horizon_bars: int = 48, n_boot: int = 1000, seed: int = 0,
             level: float = 0.95, trials: dict | None = None) -> dict:
  """Per policy: total_return_ci, sharpe_ci, psr, dsr, margins and a verdict (natron.stats).

  Daily net returns (the same trading days for every policy) are resampled in circular blocks of
  `block_days` days (-1: the longer of the label horizon in days and D^(1/3), D the number of days), paired
  across policies. psr = P(true Sharpe > 0); dsr deflates it for `trials[name]` configurations tried (default
  1). A model's margin is its total return minus a baseline policy's (BASELINE_POLICIES present in
  `results`), `verdict` against the best of them by total return; `verdicts` against each.
  """
  daily = {name: daily_returns(res.equity, time=time, timeframe=timeframe, trading_day=trading_day)
           for name, res in results.items()}
  days = len(next(iter(daily.values())))
  if block_days <= 0:
    block_days = max(math.ceil(horizon_bars / bars_per_day(timeframe)), math.ceil(days ** (1 / 3)), 1)
  ppy = float(next(iter(results.values())).metrics['periods_per_year'])
  boot = stats.return_intervals(daily, block=block_days, periods_per_year=ppy, n_boot=n_boot, seed=seed,
                                level=level)
  trials = trials or {}
  base = [b for b in BASELINE_POLICIES if b in results]
  out = {}
  for name, res in results.items():
    entry = {'total_return_ci': boot[name]['total_return_ci'], 'sharpe_ci': boot[name]['sharpe_ci'],
             'psr': stats.probabilistic_sharpe(daily[name]),
             'dsr': stats.deflated_sharpe(daily[name], int(trials.get(name, 1))),
             'trials': int(trials.get(name, 1))}
    # A model (and random) is judged against every baseline policy, a baseline policy against flat alone.
    if name in BASELINE_POLICIES:
      opponents = ['flat'] if name != 'flat' and 'flat' in results else []
    else:
      opponents = base
    margins = {}
    for b in opponents:
      margins[b] = {'value': float(res.metrics['total_return'] - results[b].metrics['total_return']),
                    'ci': stats.interval(boot[name]['_total_return_samples'] - boot[b]['_total_return_samples'],
                                         level)}
    entry['margins'] = margins
    if margins:
      best = max(opponents, key=lambda b: results[b].metrics['total_return'])
      entry['margin_over_best_baseline'] = {**margins[best], 'baseline': best, 'metric': 'total_return'}
      entry['verdict'] = stats.verdict(margins[best], best, metric='total return', unit='%', level=level)
      entry['verdicts'] = {b: stats.verdict(m, b, metric='total return', unit='%', level=level)
                           for b, m in margins.items()}
    else:
      entry['verdict'] = 'reference (no position, no risk)'
      entry['verdicts'] = {}
    out[name] = entry
  meta = {'kind': 'circular block', 'block_days': int(block_days), 'days': int(days), 'replicates': int(n_boot),
          'level': level, 'seed': int(seed)}
  for entry in out.values():
    entry['bootstrap'] = meta
  return out


def evaluate_policies(close, policies: dict, cost: 'CostModel', config, *, time=None,
                      trials: dict | None = None) -> tuple[dict, dict]:
  """The one test-span evaluator of the rl and backtest phases: every policy traded with `cost`.

  Returns ({name: Result}, evidence {name: intervals, psr, dsr, verdict}). Settings come from config.backtest
  (periods_per_year, trading_day), config.data.timeframe, config.labels.regime_horizon / horizon (bootstrap
  block) and config.evaluation (replicates, level, block in days when > 0, trials).
  """
  bt = config.backtest
  trading_day = str(bt.get('trading_day', None) or TRADING_DAY)
  kw = dict(cost_bps=cost.commission_bps, spread=cost.spread, time=time,
            periods_per_year=float(bt.periods_per_year), timeframe=str(config.data.timeframe),
            trading_day=trading_day)
  results = {name: run(close, pos, **kw) for name, pos in policies.items()}
  ev = config.get('evaluation', None) or {}
  get = lambda key, default: ev.get(key, default) if hasattr(ev, 'get') else default
  base_trials = int(get('trials', 1))
  trials = {name: base_trials * int((trials or {}).get(name, 1)) for name in results}
  labels = config.get('labels', None) or {}
  horizon = max(int(labels.get('horizon', 12)), int(labels.get('regime_horizon', 48)))
  block = int(get('block_days', -1))
  found = evidence(results, time=time, timeframe=kw['timeframe'], trading_day=trading_day, block_days=block,
                   horizon_bars=horizon, n_boot=int(get('bootstrap', 1000)), seed=int(config.get('seed', 0)),
                   level=float(get('level', 0.95)), trials=trials)
  return results, found


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


def evidence_table(found: dict) -> str:
  """Markdown: each policy's total return and Sharpe intervals, PSR, DSR and verdict."""
  lines = ['| policy | total return CI | Sharpe CI | PSR | DSR (trials) | verdict |', '|---|---|---|---|---|---|']
  for name, e in found.items():
    lo, hi = e['total_return_ci']
    slo, shi = e['sharpe_ci']
    lines.append(f"| {name} | [{100 * lo:+.2f}%, {100 * hi:+.2f}%] | [{slo:+.2f}, {shi:+.2f}] | {e['psr']:.3f} | "
                 f"{e['dsr']:.3f} ({e['trials']}) | {e['verdict']} |")
  meta = next(iter(found.values()), {}).get('bootstrap', {})
  lines += ['', f"Intervals: {meta.get('kind')} bootstrap of {meta.get('days')} daily net returns, blocks of "
            f"{meta.get('block_days')} days, {meta.get('replicates')} replicates, {100 * meta.get('level', 0.95):.0f}%;"
            ' margins are paired. PSR: probability that the true Sharpe exceeds 0; DSR: the same against the best '
            'of `trials` zero-skill configurations (Bailey & López de Prado).']
  return '\n'.join(lines)


def results_table(results: dict[str, Result], *, cost: CostModel | None = None,
                  evidence_: dict | None = None) -> str:
  """The text of table.md (`save_results`): metrics, then the evidence table and the cost line when given."""
  table = metrics_table(results)
  if evidence_:
    table += '\n\n' + evidence_table(evidence_)
  if cost is not None:
    described = cost.describe()
    table += f'\n\nCosts ({described["symbol"]}): {cost_text(described)}.'
  return table


def save_results(results: dict[str, Result], directory: str, *, time=None, title='Test span, net of costs',
                 cost: CostModel | None = None, evidence_: dict | None = None):
  """Writes metrics.json, table.md and equity.png for a set of policies into `directory`.

  With `cost` (the span's CostModel) every policy's metrics.json entry carries `cost_model` (its `describe()`)
  and table.md ends with the cost line, so each artefact states the costs it was computed with. With
  `evidence_` (from `evidence` / `evaluate_policies`) each entry also carries total_return_ci, sharpe_ci, psr,
  dsr, margins and verdict, and table.md a second table with them.
  """
  os.makedirs(directory, exist_ok=True)
  described = cost.describe() if cost is not None else None
  with open(os.path.join(directory, 'metrics.json'), 'w') as f:
    json.dump({k: {**v.metrics, **((evidence_ or {}).get(k) or {}),
                   **({'cost_model': described} if described else {})} for k, v in results.items()},
              f, indent=2)
  table = results_table(results, cost=cost, evidence_=evidence_)
  with open(os.path.join(directory, 'table.md'), 'w') as f:
    f.write(table + '\n')
  plot_equity(results, os.path.join(directory, 'equity.png'), time=time, title=title)
  return table


# --------------------------------------------------------------------------------------------------------
# Phase: every policy on each symbol's held-out test span.
# --------------------------------------------------------------------------------------------------------
def _ppo_positions(workdir: str, symbol: str, time: np.ndarray | None, rows: np.ndarray):
  """(PPO positions for `rows` of one symbol from workdir/rl/policy_test*.npz aligned by timestamp, the
  number of PPO seeds the policy was chosen from), or (None, 1)."""
  for path in (os.path.join(workdir, 'rl', f'policy_test_{symbol}.npz'),
               os.path.join(workdir, 'rl', 'policy_test.npz')):
    if not os.path.exists(path):
      continue
    saved = np.load(path, allow_pickle=True)
    trials = int(saved['trials']) if 'trials' in saved else 1
    if 'symbol' in saved and str(saved['symbol']) not in ('', symbol):
      continue
    if time is not None and 'time' in saved:
      lookup = pd.Series(np.asarray(saved['position'], np.float64),
                         index=pd.DatetimeIndex(pd.to_datetime(saved['time'], utc=True)))
      wanted = pd.DatetimeIndex(pd.to_datetime(time[rows], utc=True))
      if not wanted.isin(lookup.index).all():
        raise UserError(f'{path} does not cover the test span of {symbol}; rerun the rl phase.')
      return lookup.reindex(wanted).to_numpy(), trials
    if len(saved['position']) == len(rows):
      return np.asarray(saved['position'], np.float64), trials
  return None, 1


def test_policies(workdir: str, ds, bound: dict, rows: np.ndarray, signal, config, *, time=None,
                  ppo_position=None, ppo_trials: int = 1) -> tuple[dict, dict]:
  """Every policy of the test-span table of one symbol, in report order, and their trial counts.

  ppo (from `ppo_position`, else workdir/rl/policy_test*.npz; left out with a warning when neither exists),
  supervised (the bundle's signal over `rows`), momentum and linear (finetune/baselines), buy_and_hold, flat,
  random (seed config.seed). The rl and backtest phases both build their tables here, so they cannot differ.
  """
  from absl import logging  # pylint: disable=g-import-not-at-top
  policies, trials = {}, {}
  sym = bound['symbol']
  if ppo_position is None:
    ppo_position, ppo_trials = _ppo_positions(workdir, sym, time, rows)
  if ppo_position is not None:
    policies['ppo'] = np.asarray(ppo_position, np.float64)
    trials['ppo'] = int(ppo_trials)
  else:
    logging.warning('backtest: no PPO policy in %s/rl; run the rl phase to include it.', workdir)
  policies['supervised'] = signal_positions(signal)
  policies.update(baseline_positions(workdir, ds, bound, rows, float(config.backtest.threshold)))
  policies['buy_and_hold'] = buy_and_hold(len(rows))
  policies['flat'] = always_flat(len(rows))
  policies['random'] = random_policy(len(rows), seed=int(config.seed))
  return policies, trials


def run_phase(config, workdir: str) -> dict:
  """Backtests PPO, the supervised signal, momentum, the linear model, buy-and-hold, flat and random on every symbol's test span.

  Costs come from `resolve_costs` (the data's spread, else config.backtest.spread, else a UserError). A symbol
  with fewer than 2 test bars (its data ends before the common test split) is skipped and named in
  settings.json. Writes workdir/backtest/<symbol>/{metrics.json, table.md, equity.png} and
  backtest/settings.json (with the cost model of every symbol).

  Multi-host (jax.distributed): every process computes the same tables from the same files (so a user error
  stops every process alike and each returns the same summary); process 0 alone writes.
  """
  from absl import logging  # pylint: disable=g-import-not-at-top
  from natron import data as data_lib  # pylint: disable=g-import-not-at-top
  from natron import dataset as dataset_lib  # pylint: disable=g-import-not-at-top
  from natron.predictor import Predictor  # pylint: disable=g-import-not-at-top

  from natron import bundle_settings  # pylint: disable=g-import-not-at-top
  from natron.train import state as train_state  # pylint: disable=g-import-not-at-top
  main = train_state.is_main_process()
  # Data, labels and splits as the fine-tuning run recorded them in its bundle.
  config = bundle_settings.resolve(config, workdir, 'backtest')
  bt = config.backtest
  frame = data_lib.load_market(config.data)
  ds = dataset_lib.build_dataset(frame, config)
  # Costs first: a missing spread stops the run before the model is loaded.
  costs = {}
  for b in ds.bounds:
    part = frame.iloc[b['start']:b['stop']]
    costs[b['symbol']] = resolve_costs(part, b['symbol'], config, frame.attrs.get('points'),
                                       spread_sources=frame.attrs.get('spread_sources'))
  predictor = Predictor.load(workdir, buckets=(1,), threshold=float(bt.threshold))
  out_dir = os.path.join(workdir, 'backtest')
  if main:
    os.makedirs(out_dir, exist_ok=True)
  trading_day = str(bt.get('trading_day', None) or TRADING_DAY)
  summary, spans, used, skipped = {}, [], {}, {}
  for b in ds.bounds:
    sym = b['symbol']
    part = frame.iloc[b['start']:b['stop']].reset_index(drop=True)
    rows = np.arange(min(b['test_start'], b['stop']) - b['start'], b['stop'] - b['start'])
    if len(rows) < 2:
      skipped[str(sym)] = f'{len(rows)} test bars (its data ends before the common test split)'
      logging.warning('backtest: symbol %s skipped: %s.', sym, skipped[str(sym)])
      continue
    cost = costs[sym].span(int(rows[0]), int(rows[-1]) + 1)
    pred = predictor.predict_series(part, with_encoded=False)
    close = part['close'].to_numpy(np.float64)[rows]
    time = part['time'].to_numpy() if 'time' in part else None
    policies, trials = test_policies(workdir, ds, b, rows, pred['signal'][rows], config, time=time)
    results, found = evaluate_policies(close, policies, cost, config,
                                       time=None if time is None else time[rows], trials=trials)
    kw = {'time': None if time is None else time[rows]}
    span = (f'{pd.Timestamp(time[rows[0]])} .. {pd.Timestamp(time[rows[-1]])}' if time is not None
            else f'rows {rows[0]}..{rows[-1]}')
    spans.append(f'{sym}: {span} ({len(rows)} bars)')
    used[str(sym)] = cost.describe()
    table = (save_results(results, os.path.join(out_dir, str(sym)), time=kw['time'],
                          title=f'{sym} test span {span}, net of costs', cost=cost, evidence_=found) if main
             else results_table(results, cost=cost, evidence_=found))
    logging.info('backtest %s (%s):\n%s', sym, span, table)
    summary[str(sym)] = {name: {**{k: res.metrics[k] for k in ('total_return', 'sharpe', 'max_drawdown',
                                                                 'num_trades')},
                                'verdict': found[name]['verdict']} for name, res in results.items()}
  if not summary:
    raise UserError(f'backtest: no symbol has a test span of 2 bars or more ({skipped}); use more data.')
  if main:
    with open(os.path.join(out_dir, 'settings.json'), 'w') as f:
      json.dump({'cost_bps': float(bt.cost_bps), 'periods_per_year': float(bt.periods_per_year),
                 'trading_day': trading_day, 'threshold': float(bt.threshold), 'span': '; '.join(spans),
                 'costs': used, 'skipped': skipped}, f, indent=2)
  return summary
