"""Quote grids: prices as exact integer multiples of the symbol's point.

Real quotes live on a grid: 1.12345 is 112345 points of 1e-5 (5-digit FX), 151.234 is 151234 points of 1e-3
(3-digit JPY), 52.17 is 5217 points of 0.01 (2-digit stocks). Float32 cannot hold such price LEVELS exactly
(at 1.1 it resolves 1.2e-7, about 1% of a point), so two equal moves stop being equal, a flat typical price is
no longer flat and small differences lose digits (DESIGN.md rule 4). Integers below 2**24 ARE exact in
float32, and so are their sums, differences and comparisons while they stay below 2**24. Natron therefore
computes every feature on prices in points ("ticks"): `to_ticks(price, point)` once, in float64 numpy, at the
edge (training, batch inference and serving all call it), then the float32 feature graph sees exact integers.

Every feature is scale-free (ratios, z-scores, distances in ATR units), so nothing downstream depends on the
point itself, only on the prices being exact; a coarser grid that also fits the data (e.g. a window whose
prices all end in 0) gives the same features up to float32 rounding.

A point is either given (`data.point`, the request's `point`) or inferred as the coarsest decimal grid
10**-k (k = 0..MAX_DECIMALS) that every price lies on. Prices that lie on no such grid, or whose level in
points reaches 2**24 (where float32 integers stop being exact), are refused with a DataError that says what
to set; nothing is rounded silently.
"""
from __future__ import annotations

import numpy as np

from natron.errors import UserError

MAX_TICKS = float(1 << 24)   # integers are exact in float32 below this
MAX_DECIMALS = 8
# A float64 price parsed from decimal text is within ~1e-16 relative of its grid value, so |price / point -
# round| stays below 1e-6 for any level below MAX_TICKS; a price off the grid misses it by up to 0.5.
_GRID_TOL = 1e-6


class GridError(UserError):
  """Prices are not on the quote grid (or cannot be held exactly in float32 on it)."""


def _tolerance(prices: np.ndarray, point: float):
  """How far from an integer `prices / point` may be and still count as on the grid (in points).

  float64 input: the rounding of decimal text, 1e-6 of a point (a scalar). float32 input (a client that sent
  float32 prices): also half a float32 ulp of each price, which must stay under a quarter point to be
  recoverable.
  """
  if prices.dtype == np.float32:
    return _GRID_TOL + np.spacing(np.abs(prices)).astype(np.float64) / point
  return _GRID_TOL


def off_grid(prices, point: float) -> np.ndarray:
  """Boolean mask of the prices that are not integer multiples of `point` (within parsing error)."""
  x = np.asarray(prices)
  ratio = np.asarray(x, np.float64) / point
  miss = np.abs(ratio - np.rint(ratio))
  return ~(miss <= _tolerance(x, point))


def check_point(point) -> float:
  """A valid point size as a float, or GridError."""
  try:
    p = float(point)
  except (TypeError, ValueError):
    raise GridError(f'point must be a positive price increment such as 1e-5, got {point!r}') from None
  if not (np.isfinite(p) and p > 0):
    raise GridError(f'point must be a positive price increment such as 1e-5, got {point!r}')
  return p


_SAMPLE = 4096


def infer_point(prices) -> float:
  """The coarsest decimal grid 10**-k (k = 0..MAX_DECIMALS) that every price lies on.

  `prices` is any array of positive prices (all four price columns of a series). Raises GridError when no
  such grid holds the prices exactly in float32 (levels of 2**24 points or more).

  Long inputs are fast: a strided sample proposes the grid and one pass over every price verifies it. The
  answer is the same as trying each grid on everything: grids are nested (10**-k), the sample's coarsest grid
  is at least as coarse as the whole input's, and if every price lies on it, it is the input's coarsest grid.
  """
  x = np.asarray(prices).reshape(-1)
  if x.size > 2 * _SAMPLE:
    candidate = _infer_point(x[::x.size // _SAMPLE])
    if candidate is not None and float(np.max(np.abs(x))) / candidate < MAX_TICKS and \
        not off_grid(x, candidate).any():
      return candidate
  point = _infer_point(x)
  if point is None:
    raise _no_grid(x)
  return point


def _no_grid(x: np.ndarray) -> GridError:
  finite = x[np.isfinite(x)]
  top = float(np.max(np.abs(finite))) if finite.size else 0.0
  return GridError(
      f'prices are not on a decimal quote grid that float32 can hold exactly (the largest price {top:.10g} '
      f'must stay below 2**24 points of the grid): set data.point to the instrument\'s price increment, e.g. '
      f'1e-5 for EURUSD, 1e-3 for USDJPY, 0.01 for stocks; data must lie on that grid')


def _infer_point(x: np.ndarray):
  """infer_point over every element of x, or None when no grid fits."""
  if x.size == 0:
    raise GridError('cannot infer the point size from no prices')
  finite = x[np.isfinite(x)]
  top = float(np.max(np.abs(finite))) if finite.size else 0.0
  if top <= 0:
    raise GridError('cannot infer the point size: no positive prices')
  tol_ok = x.dtype != np.float32
  for k in range(MAX_DECIMALS + 1):
    point = float(10.0**-k)
    if top / point >= MAX_TICKS:
      break
    if not tol_ok and np.spacing(np.float32(top)) > point / 2:   # float32 input too coarse for this grid
      break
    if not off_grid(finite, point).any():
      return point
  return None


def to_ticks(prices, point: float) -> np.ndarray:
  """Prices -> float32 exact integers `round(price / point)` (same shape). Raises GridError off the grid.

  The division and rounding run in float64, so the result is the exact grid integer; it is exact in float32
  because it is checked to be below 2**24.
  """
  point = check_point(point)
  x = np.asarray(prices)
  if x.dtype not in (np.float32, np.float64):
    x = x.astype(np.float64)
  ratio = x.astype(np.float64) / point
  ticks = np.rint(ratio)
  bad = ~(np.abs(ratio - ticks) <= _tolerance(x, point))
  if bad.any():
    flat = np.flatnonzero(bad.reshape(-1))
    first = np.unravel_index(flat[0], x.shape) if x.ndim else ()
    raise GridError(
        f'{flat.size} price(s) are not multiples of point={point:g} (first at index {tuple(int(i) for i in first)}'
        f': {float(x.reshape(-1)[flat[0]]):.10g}); set point to the instrument\'s price increment (MT5: '
        f'SYMBOL_POINT) or leave it unset to infer it from the quotes')
  top = float(np.max(np.abs(ticks))) if ticks.size else 0.0
  if top >= MAX_TICKS:
    raise GridError(f'a price of {top * point:.10g} is {top:.0f} points of {point:g}: at 2**24 points or more '
                    f'float32 cannot hold prices exactly; use a coarser point (e.g. {point * 10:g})')
  return ticks.astype(np.float32)


def point_decimals(point: float) -> int:
  """Number of decimals of a decimal point size (1e-5 -> 5, 0.01 -> 2, 1 -> 0, 0.25 -> 2)."""
  for k in range(MAX_DECIMALS + 4):
    if abs(point * 10**k - round(point * 10**k)) < 1e-9 * max(1.0, point * 10**k):
      return k
  return MAX_DECIMALS + 4


__all__ = ['GridError', 'MAX_DECIMALS', 'MAX_TICKS', 'check_point', 'infer_point', 'off_grid',
           'point_decimals', 'to_ticks']
