"""Natron's feature engine: OHLCV -> a causal, scale-free float32 feature matrix [T, F] in pure JAX.

`compute_features_jax(o, h, l, c, v)` is the jittable core (the Predictor calls it inside its one jitted
function); `compute_features(ohlcv, point=None)` is the numpy wrapper used by the phases, jitted once per input
length.

Prices enter the core IN POINTS (`natron.data.grid.to_ticks`: price / point as exact float32 integers), never
as float32 price levels: at 1.1 float32 resolves 1.2e-7 (about 1% of a 5-digit point), so equal moves, flat
bars and equal highs would stop being equal (DESIGN.md rule 4). Integers below 2**24 are exact in float32, and
so are their differences and comparisons, so every tie on the quote grid stays a tie. Every feature is
scale-free, so the point itself does not matter (any grid the prices lie on gives the same features up to
float32 rounding), only that the inputs are exact integers. `compute_features` does the conversion (in float64
numpy); callers of `compute_features_jax` (the Predictor) must convert with `to_ticks` first.

Eleven categories, one module each (`natron.features.<category>`), each exposing `NAMES`, `WARMUP` (its own
look-back) and `compute(o, h, l, c, v, *, atr=None) -> (names, columns)`. Every feature is scale-free
(ratios, log returns, z-scores, distances in ATR units, bounded oscillators), never a price level or raw
volume, and causal: row t uses bars <= t only.

WARMUP (1000 bars) is chosen for train/serve parity, not just for the longest window (~216 bars): recursive
indicators (EMA <= 100, Wilder <= 28 bars) forget where the input started as (1 - alpha)^t, so features
computed from the last WARMUP + window bars equal the full-history ones to float32 rounding
((1 - 2/101)^(1000 - 100) ~ 2e-8). Rows before WARMUP are NaN; the dataset layer drops them.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from natron.data import grid
from natron.data import rules as data_rules
from natron.errors import UserError
from natron.features import indicators
from natron.features import market_profile
from natron.features import momentum
from natron.features import moving_averages
from natron.features import patterns
from natron.features import returns
from natron.features import smart_money
from natron.features import statistics
from natron.features import support_resistance
from natron.features import trend
from natron.features import volatility
from natron.features import volume

FEATURES_VERSION = 'natron-features-v2'   # v2: computed on prices in points (exact on quote grids)

# Category name -> module, in the column order of the feature matrix.
CATEGORIES = {
    'moving_averages': moving_averages,
    'momentum': momentum,
    'volatility': volatility,
    'volume': volume,
    'patterns': patterns,
    'returns': returns,
    'trend': trend,
    'statistics': statistics,
    'support_resistance': support_resistance,
    'smart_money': smart_money,
    'market_profile': market_profile,
}

WARMUP = 1000
LOOKBACK = max(m.WARMUP for m in CATEGORIES.values())   # longest window of any feature
assert LOOKBACK < WARMUP, (LOOKBACK, WARMUP)

FEATURE_NAMES = tuple(name for m in CATEGORIES.values() for name in m.NAMES)
NUM_FEATURES = len(FEATURE_NAMES)
CATEGORY_OF = {name: cat for cat, m in CATEGORIES.items() for name in m.NAMES}
CATEGORY_COUNTS = {cat: len(m.NAMES) for cat, m in CATEGORIES.items()}
assert len(set(FEATURE_NAMES)) == NUM_FEATURES, 'feature names must be unique'

_COLUMNS = ('open', 'high', 'low', 'close', 'volume')


def feature_schema_hash() -> str:
  """sha256 of the feature names, WARMUP and FEATURES_VERSION: what a checkpoint was trained on."""
  text = '\n'.join([FEATURES_VERSION, f'warmup={WARMUP}', *FEATURE_NAMES])
  return hashlib.sha256(text.encode()).hexdigest()


def compute_features_jax(o, h, l, c, v) -> jax.Array:
  """The feature matrix float32 [T, F] of 1-D OHLCV series [T] (jittable; T is static).

  o, h, l, c are prices IN POINTS, exact float32 integers below 2**24 (`natron.data.grid.to_ticks`); v is the
  volume (any non-negative scale). Columns follow FEATURE_NAMES; rows t < WARMUP are NaN (all rows when
  T <= WARMUP). Float32 price levels (1.12345 rather than 112345) give the same features only up to the
  rounding of the levels, which breaks grid ties (equal moves, flat bars, equal highs).
  """
  o, h, l, c, v = (jnp.asarray(x, jnp.float32) for x in (o, h, l, c, v))
  t_len = c.shape[0]
  if t_len <= WARMUP:
    return jnp.full((t_len, NUM_FEATURES), jnp.nan, jnp.float32)
  atr = indicators.atr(h, l, c, 14)   # shared by every category
  warmup = jnp.arange(t_len) < WARMUP
  columns = []
  for module in CATEGORIES.values():
    _, cols = module.compute(o, h, l, c, v, atr=atr)
    # Masked per column, fused into its producer (not a second pass over the [T, F] matrix).
    columns.extend(jnp.where(warmup, jnp.nan, col) for col in cols)
  # The barrier materialises each column first: fused into the stacking concatenate, every output element
  # would select among F operand expressions, which does not vectorise on XLA CPU.
  return jnp.stack(lax.optimization_barrier(tuple(columns)), axis=1)


_compute_jit = jax.jit(compute_features_jax)   # jax caches one executable per input length


def _arrays(ohlcv) -> tuple[np.ndarray, ...]:
  """(open, high, low, close, volume) float64 [T] from a DataFrame, a mapping or a 5-tuple of arrays."""
  if hasattr(ohlcv, 'columns'):           # a pandas DataFrame
    if 'symbol' in ohlcv.columns and ohlcv['symbol'].nunique() > 1:
      raise UserError('compute_features got several symbols in one frame; compute them one symbol at a time '
                      '(features must not cross symbols)')
    missing = [k for k in _COLUMNS if k not in ohlcv.columns]
    if missing:
      raise UserError(f'compute_features: the frame lacks column(s) {missing}; needs {list(_COLUMNS)}')
    raw = [ohlcv[k].to_numpy() for k in _COLUMNS]
  elif isinstance(ohlcv, Mapping):
    missing = [k for k in _COLUMNS if k not in ohlcv]
    if missing:
      raise UserError(f'compute_features: the mapping lacks key(s) {missing}; needs {list(_COLUMNS)}')
    raw = [ohlcv[k] for k in _COLUMNS]
  elif isinstance(ohlcv, (tuple, list)) and len(ohlcv) == 5:
    raw = list(ohlcv)
  else:
    raise UserError('compute_features takes a DataFrame, a mapping with keys open/high/low/close/volume, or '
                    f'a 5-tuple of arrays; got {type(ohlcv).__name__}')
  out = []
  for name, a in zip(_COLUMNS, raw):
    try:
      a = np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError) as e:
      raise UserError(f'compute_features: column {name!r} is not numeric ({e})') from None
    if a.ndim != 1:
      raise UserError(f'compute_features: column {name!r} must be 1-D, got shape {a.shape}')
    out.append(a)
  if len({a.shape[0] for a in out}) > 1:
    raise UserError(f'compute_features: columns have different lengths {[a.shape[0] for a in out]}')
  # The one definition of a valid candle (natron.data.rules), as ingestion and serving apply it.
  found = data_rules.first_violation(data_rules.candle_violations(None, *out))
  if found is not None:
    violation, row = found
    column = f' (column {violation.field!r})' if violation.field else ''
    raise UserError(f'compute_features: rule {violation.text!r} broken in {violation.rows.size} row(s){column}, '
                    f'first at row {row}')
  return tuple(out)


def to_points(ohlcv, point=None) -> tuple[tuple[np.ndarray, ...], float]:
  """((open, high, low, close in points as exact float32 integers, volume float32), each [T]; the point).

  `point`: the price increment; None takes a DataFrame's `attrs['point']`, else the coarsest decimal grid
  that all four price columns lie on (`grid.infer_point`). Same input forms and checks as `compute_features`;
  raises GridError (a UserError) for prices that are off the grid or too fine for float32.
  """
  *prices, volume = _arrays(ohlcv)
  if point is None and hasattr(ohlcv, 'attrs'):
    point = ohlcv.attrs.get('point')
    if isinstance(point, Mapping):   # {symbol: point} of a multi-symbol frame: this frame's one symbol
      symbols = ohlcv['symbol'].unique() if 'symbol' in ohlcv.columns else ()
      point = point.get(symbols[0]) if len(symbols) == 1 else None
  volume = volume.astype(np.float32)
  point = grid.infer_point(np.concatenate(prices)) if point is None else grid.check_point(point)
  return tuple(grid.to_ticks(p, point) for p in prices) + (volume,), point


def compute_features(ohlcv, point=None) -> tuple[np.ndarray, list[str]]:
  """Feature matrix of one symbol's bars: (float32 [T, F], names). Rows t < WARMUP are NaN.

  `ohlcv`: a DataFrame with columns open, high, low, close, volume (one symbol), a mapping with those keys,
  or a tuple (open, high, low, close, volume) of 1-D arrays. `point`: the quote grid (price increment, e.g.
  1e-5 for EURUSD); None takes a DataFrame's `attrs['point']`, else infers it from the four price columns.
  Prices are converted to points (exact integers) in float64 before the float32 core. Raises UserError on
  malformed input, GridError (a UserError) for prices that are not on the grid.
  """
  arrays, _ = to_points(ohlcv, point)
  x = np.asarray(_compute_jit(*arrays))
  return x, list(FEATURE_NAMES)


__all__ = ['CATEGORIES', 'CATEGORY_COUNTS', 'CATEGORY_OF', 'FEATURES_VERSION', 'FEATURE_NAMES', 'LOOKBACK',
           'NUM_FEATURES', 'WARMUP', 'compute_features', 'compute_features_jax', 'feature_schema_hash',
           'to_points']
