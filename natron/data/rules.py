"""The one definition of a valid candle: an array-level rule function that ingestion, serving and features call.

`candle_violations(time_ns, open, high, low, close, volume, spread=None, *, point=None)` returns every rule
broken, as `Violation(rule, rows, text, field)` in the fixed order of RULES; each caller formats its own
message (ingestion: rows and file lines; serving: window, candle index and field in its HTTP 422; features:
the row). Times are parsed by natron.data.times.parse_times, also shared.

  rule id          text (what must hold)                                   field
  not_finite       <field> must be finite (not NaN/inf/missing)             the column (one Violation each)
  price_positive   prices must be > 0                                       -
  high_low         high >= max(open, close)                                 high
  high_low         low <= min(open, close)                                  low
  volume_negative  volume >= 0                                              volume
  spread_negative  spread >= 0                                              spread
  off_grid         prices must lie on the quote grid (multiples of point)   -      (only when a point is given)
  time_order       timestamps must not repeat (duplicate of the previous row)   time (only with times)
  time_order       timestamps must increase (earlier than the previous row)     time
  time             time must be a valid timestamp (...)                     time   (times.parse_times callers)

The ids are the serving API's `rule` values (ErrorResponse); the texts are what ingestion messages quote.
Rows are 0-based indices into the arrays. A comparison rule is judged only where its values are finite (a
NaN open is `not_finite`, not also `high_low`; a NaN open beside a zero low is both). Prices are compared in float64: the caller's arrays are read
at their own precision, never rounded to float32 first (DESIGN.md rule 4).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from natron.data import grid
from natron.data.times import TIME_RULE
from natron.errors import UserError

PRICE_COLUMNS = ('open', 'high', 'low', 'close')

NOT_FINITE = '{field} must be finite (not NaN/inf/missing)'
PRICE_POSITIVE = 'prices must be > 0'
HIGH = 'high >= max(open, close)'
LOW = 'low <= min(open, close)'
VOLUME = 'volume >= 0'
SPREAD = 'spread >= 0'
ON_GRID = 'prices must lie on the quote grid (multiples of point)'
TIME_REPEAT = 'timestamps must not repeat (duplicate of the previous row)'
TIME_DECREASE = 'timestamps must increase (earlier than the previous row)'

# text -> rule id, in reporting order (NOT_FINITE is a template, one entry per column).
RULES = {NOT_FINITE: 'not_finite', PRICE_POSITIVE: 'price_positive', HIGH: 'high_low', LOW: 'high_low',
         VOLUME: 'volume_negative', SPREAD: 'spread_negative', ON_GRID: 'off_grid', TIME_REPEAT: 'time_order',
         TIME_DECREASE: 'time_order', TIME_RULE: 'time'}


@dataclasses.dataclass(frozen=True)
class Violation:
  """One broken rule: `rule` the id (RULES), `rows` int64 [k] ascending 0-based rows, `text` the rule as
  stated, `field` the column it is about (None for rules over several columns)."""
  rule: str
  rows: np.ndarray
  text: str
  field: str | None = None


def _f64(x) -> np.ndarray:
  a = np.asarray(x)
  return a if a.dtype == np.float64 else a.astype(np.float64)


def candle_violations(time_ns, open, high, low, close, volume, spread=None, *,  # pylint: disable=redefined-builtin
                      point=None) -> list[Violation]:
  """Every candle rule broken by the arrays (see the module docstring); [] when the candles are valid.

  Args:
    time_ns: int64 [N] nanoseconds since the epoch (one series, in row order), or None to skip the time rules
      (several series in one array are checked series by series by the caller).
    open, high, low, close, volume: [N] numbers (float32 or float64; compared in float64).
    spread: optional [N] spread in price units.
    point: optional quote-grid increment; prices off its grid break `off_grid`.
  """
  columns = {'open': _f64(open), 'high': _f64(high), 'low': _f64(low), 'close': _f64(close),
             'volume': _f64(volume)}
  if spread is not None:
    columns['spread'] = _f64(spread)
  sizes = {k: v.shape for k, v in columns.items()}
  if len(set(sizes.values())) > 1 or any(len(s) != 1 for s in sizes.values()):
    raise UserError(f'candle_violations needs 1-D arrays of one length, got shapes {sizes}')
  out = []

  def add(text, mask, field=None):
    rows = np.flatnonzero(mask)
    if rows.size:
      out.append(Violation(RULES[text], rows.astype(np.int64), text, field))

  finite = {}
  for name, x in columns.items():
    finite[name] = np.isfinite(x)
    rows = np.flatnonzero(~finite[name])
    if rows.size:   # one Violation per column: the message names the column
      out.append(Violation('not_finite', rows.astype(np.int64), NOT_FINITE.format(field=name), name))
  o, h, l, c = (columns[k] for k in PRICE_COLUMNS)
  with np.errstate(invalid='ignore'):
    add(PRICE_POSITIVE, (o <= 0) | (h <= 0) | (l <= 0) | (c <= 0))
    add(HIGH, h < np.maximum(o, c), 'high')
    add(LOW, l > np.minimum(o, c), 'low')
    add(VOLUME, columns['volume'] < 0, 'volume')
    if spread is not None:
      add(SPREAD, columns['spread'] < 0, 'spread')
  if point is not None:
    p = grid.check_point(point)
    ok = finite['open'] & finite['high'] & finite['low'] & finite['close']
    off = np.zeros(o.shape, bool)
    for name in PRICE_COLUMNS:   # in the caller's dtype: float32 prices get float32's grid tolerance
      x = np.asarray({'open': open, 'high': high, 'low': low, 'close': close}[name])
      off |= ok & grid.off_grid(np.where(ok, x, p), p)
    add(ON_GRID, off)
  if time_ns is not None:
    t = np.asarray(time_ns, np.int64)
    if t.shape != o.shape:
      raise UserError(f'candle_violations: time_ns has shape {t.shape}, prices {o.shape}')
    step = np.diff(t)
    add(TIME_REPEAT, np.concatenate([[False], step == 0]), 'time')
    add(TIME_DECREASE, np.concatenate([[False], step < 0]), 'time')
  return out


def first_violation(violations: list[Violation]) -> tuple[Violation, int] | None:
  """The violation at the lowest row (ties: the earlier rule) and that row; None when there is none."""
  best = None
  for v in violations:
    if best is None or int(v.rows[0]) < best[1]:
      best = (v, int(v.rows[0]))
  return best


__all__ = ['PRICE_COLUMNS', 'RULES', 'Violation', 'candle_violations', 'first_violation']
