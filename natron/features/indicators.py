"""TA-Lib-compatible technical indicators on 1-D series (pure jnp, float32, jittable).

Every function takes 1-D arrays (cast to float32) and static Python-int periods with TA-Lib's defaults, and
returns float32 arrays of the input length in TA-Lib's output order. Rows before TA-Lib's first output
(its "lookback") are NaN, so `isnan` marks exactly the rows TA-Lib leaves out. Row t depends only on
rows <= t. Each function is jitted with its periods static; calls inside another jit are inlined.

Definitions follow TA-Lib 0.6+/0.8 with default settings (SMA matype, unstable period 0):
- EMA: alpha 2/(n+1), seeded with the SMA of the first n values (first value at n-1).
- Wilder smoothing (RSI, ATR, NATR): alpha 1/n seeded with the simple mean of the first n one-bar values
  (first value at index n). +DI/-DI/ADX use TA-Lib's running sums: seeded with the SUM of the first n-1
  one-bar values and updated with s - s/n + x (first DI at n, first ADX at 2n-1).
- Population standard deviation in BBANDS (default period 20, as TA-Lib 0.6+); mean absolute deviation
  and 0.015 in CCI; AROON over n+1 bars with ties going to the most recent bar; OBV starts at volume[0]
  and is unchanged on equal closes.
- Degenerate denominators give TA-Lib 0.8's value: 0 for RSI/DI/WILLR/STOCH/CCI/ROC/MFI on flat input, ADX
  unchanged when DX is undefined. TA-Lib 0.8 (fix #253/#244) tests the RSI gain+loss total, the DI running
  true-range sum and the MFI money-flow total EXACTLY against zero (older releases used a fixed 1e-8 band, or
  `total < 1` for MFI, which zeroed any instrument quoted small enough); the +DI + -DI sum, a ratio, keeps
  the fixed band TA_EPSILON = 1e-14. CCI/STOCH/WILLR use a band scaled to the price level (~1e-14 relative),
  which on exact tick inputs is the same as our exact zero test.

Inputs on a quote grid (what we match): prices IN POINTS, price / point as exact float32 integers below 2**24
(`natron.data.grid.to_ticks`, as `natron.features.compute_features` passes them). Then every difference,
tie and comparison of prices is exact: equal directional moves stay equal (+DM/-DM), a flat typical price
stays flat (MFI), equal highs stay equal (AROON). Every indicator equals TA-Lib run in float64 on the same
tick values (price / point) to ~1e-6 relative (float32 rounding of the smoothed values), tested on series
quantised to real grids. TA-Lib on the raw float64 QUOTES is not the same thing: float64 differences of
decimal quotes are not exact (1.10003 - 1.10000 != 1.09990 - 1.09987 in float64), so TA-Lib itself breaks grid
ties there and its ADX/DI differ from TA-Lib on price / point by up to ~10 DI points (measured on generated
grids: 9.5 on a 5-digit FX series, 14.5 on a 2-digit stock at 50); every other output agrees to ~1e-10. Unit-bearing outputs (SMA, EMA, ATR, MACD, BBANDS, TRANGE) are in
points: multiply by the point for price units. Float32 price LEVELS (1.12345) as inputs would break ties.

Precision (float32, DESIGN.md rule 4): windowed sums reduce the window itself (primitives), variances are
two-pass, recursions are `lax.scan`s. Where float32 rounding of LEVELS would swamp a small result (also for
inputs that are not on a grid), we work on differences of nearby prices instead: CCI on deviations from the
current close, MACD as the difference of two EMA deviations `x - EMA(x)` (recursion on `dx`), MFI's up/down
test on the sign of the typical-price change. A flat stretch longer than ~1,100 bars is the one divergence:
the float32 Wilder averages (RSI, DI) underflow to 0 there and read 0, where float64 keeps the last ratio. OBV is a cumulative sum by definition: it is accumulated in double-float32, so its
error stays at float32 rounding of its current level. Its LEVEL depends on where the series starts: use a
windowed OBV change as a feature, never the level.

Recursive indicators (EMA, Wilder, MACD, ADX, OBV) depend on where the input starts, exactly like TA-Lib's.
They are sequential scans on purpose: a blocked filter (Toeplitz matmul per 32-bar block, scan over block
boundaries) ran 2x faster on 1M bars, but GEMM kernels tile by row count, so a row's last bit depended on the
series length (prefix != full history), and MACD's cancelling sums lost 10x precision on choppy data. With
scans, values on a prefix are bit-identical to the full-series rows (BBANDS: within 1 ulp).
"""
from __future__ import annotations

import functools
import inspect
import numbers

import jax
import jax.numpy as jnp
from jax import lax

from natron.errors import UserError
from natron.features import primitives as P

NAN = jnp.nan
# TA-Lib 0.8's TA_EPSILON: |+DI + -DI| < 1e-14 leaves DX undefined (the other zero tests are exact).
_TA_EPS = 1e-14

__all__ = [
    'sma', 'ema', 'rsi', 'atr', 'natr', 'adx', 'plus_di', 'minus_di', 'dmi', 'cci', 'mfi', 'obv', 'willr',
    'roc', 'macd', 'bbands', 'stoch', 'aroon', 'true_range', 'LOOKBACK',
]


# ---------------------------------------------------------------------------------------------------------
# Input checks and small helpers.
# ---------------------------------------------------------------------------------------------------------


def _series(*arrays) -> tuple[jax.Array, ...]:
  """Casts inputs to float32 1-D arrays of one common length."""
  out = tuple(jnp.asarray(a, jnp.float32) for a in arrays)
  for a in out:
    if a.ndim != 1:
      raise UserError(f"indicators take 1-D series, got an array of shape {a.shape}")
  lengths = {a.shape[0] for a in out}
  if len(lengths) > 1:
    raise UserError(f"input series must have the same length, got lengths {sorted(lengths)}")
  return out


def _period(name: str, value, minimum: int) -> int:
  """Validates a static period (TA-Lib's minimum for that parameter)."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise UserError(f"{name} must be an int (a static argument under jit), got {value!r}")
  if value < minimum:
    raise UserError(f"{name} must be >= {minimum}, got {value}")
  return int(value)


def _jit_static(*static: str):
  """`jax.jit` with the named parameters static, checking first that they are plain numbers.

  Under an outer jit a period passed as a traced value cannot define output shapes; this turns JAX's
  unhashable-argument error into a `UserError` that says what to do.
  """

  def wrap(fn):
    jitted = jax.jit(fn, static_argnames=static)
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
      bound = signature.bind(*args, **kwargs)
      for name in static:
        value = bound.arguments.get(name)
        if value is not None and not isinstance(value, numbers.Real):
          raise UserError(f"{fn.__name__}: {name} must be a Python number (a static argument: it fixes "
                          f"the warm-up length), got {type(value).__name__}; pass it as a constant, "
                          f"not as a traced/array argument")
      return jitted(*args, **kwargs)

    return call

  return wrap


def _nan_before(y: jax.Array, first: int) -> jax.Array:
  """NaN for rows < first (TA-Lib's lookback)."""
  return jnp.where(jnp.arange(y.shape[0]) < first, NAN, y)


def _recursion(update, seeds: tuple, xs: tuple, seed_index: int) -> tuple:
  """Runs `state = update(state, x_t)` over rows seed_index+1.. of the [T] series in `xs`.

  `seeds` is the state at row `seed_index` (a tuple of scalars, one per output series). Returns one [T]
  array per state entry: NaN before `seed_index`, the seed at it, the recursion after it. Several
  recursions share one `lax.scan`: on CPU a scan step costs a few ns of loop overhead plus ~1.5 ns per op,
  so bodies stay minimal (ratios, masks and outputs are computed vectorised outside the scan).
  """
  seeds = tuple(jnp.asarray(v, jnp.float32) for v in seeds)

  def step(state, x):
    state = update(state, x)
    return state, state

  _, tails = lax.scan(step, seeds, tuple(a[seed_index + 1:] for a in xs))
  head = jnp.full((seed_index,), NAN, jnp.float32)
  return tuple(jnp.concatenate([head, v[None], tail]) for v, tail in zip(seeds, tails))


def _all_nan(length: int) -> jax.Array:
  return jnp.full((length,), NAN, jnp.float32)


def _div0(a: jax.Array, b: jax.Array, zero) -> jax.Array:
  """a / b, and 0 where `zero` (a boolean mask of degenerate denominators)."""
  return jnp.where(zero, 0.0, a / jnp.where(zero, 1.0, b))


def _diff(x: jax.Array) -> jax.Array:
  """x[t] - x[t-1] (NaN at row 0); exact in float32 for nearby prices (Sterbenz)."""
  return jnp.concatenate([jnp.full((1,), NAN, x.dtype), x[1:] - x[:-1]])


def _prev(x: jax.Array) -> jax.Array:
  """x[t-1] (NaN at row 0)."""
  return jnp.concatenate([jnp.full((1,), NAN, x.dtype), x[:-1]])


@_jit_static()
def true_range(high, low, close) -> jax.Array:
  """TA-Lib TRANGE: max(high - low, |high - close[t-1]|, |low - close[t-1]|); NaN at row 0.  [T] -> [T]."""
  high, low, close = _series(high, low, close)
  pc = _prev(close)
  return jnp.maximum(high - low, jnp.maximum(jnp.abs(high - pc), jnp.abs(low - pc)))


# ---------------------------------------------------------------------------------------------------------
# Moving averages.
# ---------------------------------------------------------------------------------------------------------


@_jit_static('timeperiod')
def sma(close, timeperiod: int = 30) -> jax.Array:
  """TA-Lib SMA: mean of the last `timeperiod` values (first at timeperiod-1).  [T] -> [T]."""
  (x,) = _series(close)
  n = _period('timeperiod', timeperiod, 2)
  return P.rolling_mean(x, n)


@_jit_static('timeperiod')
def ema(close, timeperiod: int = 30) -> jax.Array:
  """TA-Lib EMA: alpha 2/(n+1) seeded with the SMA of the first n values (first at n-1).  [T] -> [T]."""
  (x,) = _series(close)
  n = _period('timeperiod', timeperiod, 2)
  if x.shape[0] < n:
    return _all_nan(x.shape[0])
  return P.ema(x, n)


def _ema_deviations(x: jax.Array, periods: tuple, seed_index: int) -> tuple:
  """x - EMA_n(x) for each n in `periods`, every EMA seeded at `seed_index` with the SMA of the n values
  ending there; one [T] array per period, NaN before `seed_index`.

  The recursion runs on the deviation d[t] = x[t] - e[t] = (1 - a) * (d[t-1] + dx[t]), which only touches
  small numbers, so d keeps float32's relative precision (the plain EMA recursion on price levels loses
  ~1e-7 of the price, which is 1e-4 of a MACD value). `a` (not 1 - a) is the float32 constant: its absolute
  rounding error is ~10x smaller.
  """
  dx = _diff(x)
  alphas = tuple(jnp.float32(2.0 / (n + 1.0)) for n in periods)
  # x[seed] - SMA as a mean of exact differences.
  seeds = tuple(jnp.mean(x[seed_index] - x[seed_index + 1 - n:seed_index + 1]) for n in periods)

  def update(ds, dxt):
    (dxt,) = dxt
    return tuple((d + dxt) - a * (d + dxt) for d, a in zip(ds, alphas))

  return _recursion(update, seeds, (dx,), seed_index)


@_jit_static('fastperiod', 'slowperiod', 'signalperiod')
def macd(close, fastperiod: int = 12, slowperiod: int = 26, signalperiod: int = 9):
  """TA-Lib MACD -> (macd, signal, hist), each [T]; first valid row slowperiod + signalperiod - 2.

  As in TA-Lib, both EMAs start at row slow-1: the fast EMA is seeded with the SMA of the `fastperiod` values
  ending there (not of the first values). The signal is the EMA of the MACD line seeded with its first
  `signalperiod` values; all three outputs start together. TA-Lib swaps the periods if fast > slow.
  """
  (x,) = _series(close)
  fast = _period('fastperiod', fastperiod, 2)
  slow = _period('slowperiod', slowperiod, 2)
  sig = _period('signalperiod', signalperiod, 1)
  if slow < fast:
    fast, slow = slow, fast
  t = x.shape[0]
  first = slow + sig - 2
  if t <= first:
    nan = _all_nan(t)
    return nan, nan, nan
  # EMA_fast - EMA_slow = (x - EMA_slow) - (x - EMA_fast): differences of small, precise deviations.
  dev_slow, dev_fast = _ema_deviations(x, (slow, fast), slow - 1)
  line = dev_slow - dev_fast
  signal = P.ema(line, sig, start=slow - 1)
  line = _nan_before(line, first)
  return line, signal, line - signal


# ---------------------------------------------------------------------------------------------------------
# Wilder-smoothed indicators.
# ---------------------------------------------------------------------------------------------------------


@_jit_static('timeperiod')
def rsi(close, timeperiod: int = 14) -> jax.Array:
  """TA-Lib RSI: 100 * avg_gain / (avg_gain + avg_loss), Wilder-smoothed, first at n; 0 when nothing moved.

  [T] -> [T].
  """
  (x,) = _series(close)
  n = _period('timeperiod', timeperiod, 2)
  t = x.shape[0]
  if t <= n:
    return _all_nan(t)
  dx = _diff(x)
  gain = jnp.maximum(dx, 0.0)
  loss = jnp.maximum(-dx, 0.0)
  alpha = jnp.float32(1.0 / n)

  def update(state, x_t):
    return tuple(y + alpha * (v - y) for y, v in zip(state, x_t))

  g, l = _recursion(update, (jnp.mean(gain[1:n + 1]), jnp.mean(loss[1:n + 1])), (gain, loss), n)
  total = g + l   # >= 0: zero only when nothing moved since the seed (TA-Lib 0.8 tests it exactly)
  return _div0(100.0 * g, total, total <= 0)


@_jit_static('timeperiod')
def atr(high, low, close, timeperiod: int = 14) -> jax.Array:
  """TA-Lib ATR: Wilder smoothing of the true range seeded with its mean over rows 1..n (first at n).

  [T] x3 -> [T].
  """
  high, low, close = _series(high, low, close)
  n = _period('timeperiod', timeperiod, 1)
  if high.shape[0] <= n:
    return _all_nan(high.shape[0])
  return P.wilder(true_range(high, low, close), n, start=1)


@_jit_static('timeperiod')
def natr(high, low, close, timeperiod: int = 14) -> jax.Array:
  """TA-Lib NATR: 100 * ATR / close (0 where close is 0).  [T] x3 -> [T]."""
  high, low, close = _series(high, low, close)
  a = atr(high, low, close, timeperiod=timeperiod)
  return jnp.where(jnp.isnan(a), NAN, _div0(100.0 * a, close, close == 0))


def _directional_movement(high: jax.Array, low: jax.Array):
  """TA-Lib's one-bar +DM and -DM (0 unless that side's move is positive and strictly the larger)."""
  up = _diff(high)            # high[t] - high[t-1]
  down = -_diff(low)          # low[t-1] - low[t]
  plus = jnp.where((up > 0) & (up > down), up, 0.0)
  minus = jnp.where((down > 0) & (down > up), down, 0.0)
  return plus, minus


def _dmi_core(high, low, close, n: int):
  """(+DI, -DI, ADX), each [T]: one scan for TA-Lib's running sums, one for the ADX average (see `dmi`)."""
  t = high.shape[0]
  pdm, mdm = _directional_movement(high, low)
  tr = true_range(high, low, close)
  alpha = jnp.float32(1.0 / n)
  # The running sum S (seeded with the SUM of rows 1..n-1, then S - S/n + x) is carried as A = S/n, an EMA
  # with alpha 1/n; the DI ratios are unchanged. TA-Lib 0.8 tests S > 0 exactly (S >= 0 by construction).

  def update(state, x_t):
    return tuple(y + alpha * (v - y) for y, v in zip(state, x_t))

  seeds = tuple(jnp.sum(a[1:n]) * alpha for a in (pdm, mdm, tr))
  p, m, r = _recursion(update, seeds, (pdm, mdm, tr), n - 1)
  zero = r <= 0
  pdi = _nan_before(_div0(100.0 * p, r, zero), n)
  mdi = _nan_before(_div0(100.0 * m, r, zero), n)
  total = pdi + mdi
  defined = ~zero & (jnp.abs(total) >= _TA_EPS)
  dx = _div0(100.0 * jnp.abs(pdi - mdi), total, ~defined)
  if t < 2 * n:
    return pdi, mdi, _all_nan(t)
  # ADX: the mean DX of rows n..2n-1 (undefined DX counts as 0) at row 2n-1, then a Wilder average that
  # keeps its value on rows with undefined DX: adx = adx + w * (dx - adx) with w = alpha or 0.
  weight = jnp.where(defined, alpha, 0.0)

  def adx_update(state, x_t):
    (y,), (w, d) = state, x_t
    return (y + w * (d - y),)

  (adx_,) = _recursion(adx_update, (jnp.mean(dx[n:2 * n]),), (weight, dx), 2 * n - 1)
  return pdi, mdi, adx_


def _dmi_checked(high, low, close, timeperiod):
  high, low, close = _series(high, low, close)
  n = _period('timeperiod', timeperiod, 2)
  t = high.shape[0]
  if t <= n:
    nan = _all_nan(t)
    return nan, nan, nan
  return _dmi_core(high, low, close, n)


@_jit_static('timeperiod')
def dmi(high, low, close, timeperiod: int = 14):
  """Directional movement system in one pass -> (+DI, -DI, ADX), each [T].

  Same values as `plus_di`, `minus_di`, `adx` (first rows n, n, 2n-1); use it when you need all three.
  """
  return _dmi_checked(high, low, close, timeperiod)


@_jit_static('timeperiod')
def plus_di(high, low, close, timeperiod: int = 14) -> jax.Array:
  """TA-Lib PLUS_DI: 100 * smoothed(+DM) / smoothed(TR), TA-Lib's running sums; first at n.  [T] x3 -> [T].

  timeperiod >= 2: TA-Lib's period-1 special case returns the raw ratio without the factor 100.
  """
  return _dmi_checked(high, low, close, timeperiod)[0]


@_jit_static('timeperiod')
def minus_di(high, low, close, timeperiod: int = 14) -> jax.Array:
  """TA-Lib MINUS_DI: 100 * smoothed(-DM) / smoothed(TR); first at n; timeperiod >= 2.  [T] x3 -> [T]."""
  return _dmi_checked(high, low, close, timeperiod)[1]


@_jit_static('timeperiod')
def adx(high, low, close, timeperiod: int = 14) -> jax.Array:
  """TA-Lib ADX: Wilder average of DX = 100 |+DI - -DI| / (+DI + -DI); first at 2n-1.  [T] x3 -> [T].

  Seeded with the mean DX of rows n..2n-1; a row with undefined DX (zero range) keeps the previous ADX.
  """
  return _dmi_checked(high, low, close, timeperiod)[2]


# ---------------------------------------------------------------------------------------------------------
# Oscillators and bands over a window.
# ---------------------------------------------------------------------------------------------------------


@_jit_static('timeperiod')
def cci(high, low, close, timeperiod: int = 14) -> jax.Array:
  """TA-Lib CCI: (tp - SMA(tp)) / (0.015 * mean |tp - SMA(tp)|), tp = (h + l + c) / 3; first at n-1.

  Computed on u = 3 * (tp[t-k] - close[t]) built from exact float32 price differences, so the small numerator
  does not inherit the rounding of price levels (the 1/3 cancels).  [T] x3 -> [T].
  """
  high, low, close = _series(high, low, close)
  n = _period('timeperiod', timeperiod, 2)
  t = high.shape[0]
  if t < n:
    return _all_nan(t)

  def window(k):
    """u for lag k, aligned on rows n-1.. (row r of the result is bar n-1+r)."""
    ref = close[n - 1:]
    sl = slice(n - 1 - k, t - k)
    return (high[sl] - ref) + (low[sl] - ref) + (close[sl] - ref)

  # n is small (TA-Lib default 14): two passes over n shifted views, no [n, T] array.
  total = functools.reduce(lambda acc, k: acc + window(k), range(n), jnp.zeros((t - n + 1,), jnp.float32))
  mean = total / n
  mad = functools.reduce(lambda acc, k: acc + jnp.abs(window(k) - mean), range(n),
                         jnp.zeros_like(mean)) / n
  num = window(0) - mean
  value = _div0(num, 0.015 * mad, (mad == 0) | (num == 0))
  return jnp.concatenate([jnp.full((n - 1,), NAN, jnp.float32), value])


@_jit_static('timeperiod')
def mfi(high, low, close, volume, timeperiod: int = 14) -> jax.Array:
  """TA-Lib MFI: 100 * positive / (positive + negative) money flow over n bars; first at n.

  Money flow = tp * volume with tp = (h + l + c) / 3, positive when tp rose, negative when it fell, neither
  when it is unchanged (decided on the exact sign of the tp change, from price differences). As TA-Lib 0.8,
  0 when the window received no money flow at all (the total, a sum of non-negative flows, is exactly 0).
  [T] x4 -> [T].
  """
  high, low, close, volume = _series(high, low, close, volume)
  n = _period('timeperiod', timeperiod, 2)
  t = high.shape[0]
  if t <= n:
    return _all_nan(t)
  move = _diff(high) + _diff(low) + _diff(close)  # 3 * (tp[t] - tp[t-1]), exact sign
  flow = (high + low + close) / 3.0 * volume
  pos = P.rolling_sum(jnp.where(move > 0, flow, 0.0)[1:], n)
  neg = P.rolling_sum(jnp.where(move < 0, flow, 0.0)[1:], n)
  total = pos + neg
  value = _div0(100.0 * pos, total, total <= 0)
  return jnp.concatenate([jnp.full((1,), NAN, jnp.float32), _nan_before(value, n - 1)])


@_jit_static('timeperiod')
def willr(high, low, close, timeperiod: int = 14) -> jax.Array:
  """TA-Lib WILLR: -100 * (highest high - close) / (highest high - lowest low) over n bars; first at n-1.

  0 when the range is 0.  [T] x3 -> [T].
  """
  high, low, close = _series(high, low, close)
  n = _period('timeperiod', timeperiod, 2)
  hh = P.rolling_max(high, n)
  ll = P.rolling_min(low, n)
  rng = hh - ll
  return jnp.where(jnp.isnan(rng), NAN, _div0(-100.0 * (hh - close), rng, rng == 0))


@_jit_static('timeperiod')
def roc(close, timeperiod: int = 10) -> jax.Array:
  """TA-Lib ROC: (x[t] / x[t-n] - 1) * 100 (0 where x[t-n] is 0); first at n.  [T] -> [T].

  Computed as (x[t] - x[t-n]) / x[t-n] so the small result keeps float32's relative precision.
  """
  (x,) = _series(close)
  n = _period('timeperiod', timeperiod, 1)
  t = x.shape[0]
  if t <= n:
    return _all_nan(t)
  prev = x[:-n]
  value = _div0(100.0 * (x[n:] - prev), prev, prev == 0)
  return jnp.concatenate([jnp.full((n,), NAN, jnp.float32), value])


@_jit_static('timeperiod', 'nbdevup', 'nbdevdn')
def bbands(close, timeperiod: int = 20, nbdevup: float = 2.0, nbdevdn: float = 2.0):
  """TA-Lib BBANDS (SMA middle band, population std) -> (upper, middle, lower), each [T]; first at n-1.

  The default period is 20, TA-Lib 0.6+'s default (older TA-Lib releases defaulted to 5).
  """
  (x,) = _series(close)
  n = _period('timeperiod', timeperiod, 2)
  middle = P.rolling_mean(x, n)
  std = P.rolling_std(x, n)
  return middle + float(nbdevup) * std, middle, middle - float(nbdevdn) * std


@_jit_static('fastk_period', 'slowk_period', 'slowd_period')
def stoch(high, low, close, fastk_period: int = 5, slowk_period: int = 3, slowd_period: int = 3):
  """TA-Lib STOCH with SMA smoothing (matype 0) -> (slowk, slowd), each [T].

  fastk = 100 * (close - lowest low) / (highest high - lowest low) over fastk_period (0 on a zero range),
  slowk = SMA(fastk, slowk_period), slowd = SMA(slowk, slowd_period). Both outputs start together at row
  fastk_period + slowk_period + slowd_period - 3, as in TA-Lib.
  """
  high, low, close = _series(high, low, close)
  nk = _period('fastk_period', fastk_period, 1)
  ns = _period('slowk_period', slowk_period, 1)
  nd = _period('slowd_period', slowd_period, 1)
  t = high.shape[0]
  first = nk + ns + nd - 3
  if t <= first:
    nan = _all_nan(t)
    return nan, nan
  ll = P.rolling_min(low, nk)[nk - 1:]
  rng = P.rolling_max(high, nk)[nk - 1:] - ll
  fastk = _div0(100.0 * (close[nk - 1:] - ll), rng, rng == 0)
  slowk = P.rolling_mean(fastk, ns)[ns - 1:]
  slowd = P.rolling_mean(slowk, nd)[nd - 1:]
  head = jnp.full((first,), NAN, jnp.float32)
  return jnp.concatenate([head, slowk[nd - 1:]]), jnp.concatenate([head, slowd])


@_jit_static('timeperiod')
def aroon(high, low, timeperiod: int = 14):
  """TA-Lib AROON -> (aroondown, aroonup), each [T]; first at n.

  Over the last n+1 bars: up = 100 * (n - bars since the highest high) / n, down likewise with the lowest
  low; ties go to the most recent bar.
  """
  high, low = _series(high, low)
  n = _period('timeperiod', timeperiod, 2)
  if high.shape[0] <= n:
    nan = _all_nan(high.shape[0])
    return nan, nan
  down = 100.0 * (n - P.bars_since_min(low, n + 1)) / n
  up = 100.0 * (n - P.bars_since_max(high, n + 1)) / n
  return down, up


# ---------------------------------------------------------------------------------------------------------
# Volume.
# ---------------------------------------------------------------------------------------------------------


@_jit_static()
def obv(close, volume) -> jax.Array:
  """TA-Lib OBV: starts at volume[0]; adds volume on an up close, subtracts on a down close.  [T] x2 -> [T].

  A cumulative sum by definition, so it is accumulated in double-float32 (an exact TwoSum of the running
  value and a low-order word): the error stays at float32 rounding of the current level, also when the level
  returns near 0 after a long excursion (plain Kahan drifted by ~4e-5 of a bar's volume over 200k bars). The
  level depends on where the series starts.
  """
  close, volume = _series(close, volume)
  t = close.shape[0]
  if t == 0:
    return close
  dc = _diff(close)
  signed = jnp.where(dc > 0, volume, jnp.where(dc < 0, -volume, 0.0))

  def update(state, x_t):
    (hi, lo), (x,) = state, x_t
    # TwoSum: s + e == hi + x exactly.
    s = hi + x
    b = s - hi
    e = (hi - (s - b)) + (x - b)
    lo = lo + e
    # Fast2Sum renormalisation keeps |lo| <= ulp(hi) / 2.
    hi = s + lo
    return hi, lo - (hi - s)

  return _recursion(update, (volume[0], 0.0), (signed,), 0)[0]


# First valid row of each indicator at its default parameters (TA-Lib's lookback), for callers that size
# warm-ups without running the functions.
LOOKBACK = {
    'sma': 29, 'ema': 29, 'rsi': 14, 'atr': 14, 'natr': 14, 'adx': 27, 'plus_di': 14, 'minus_di': 14,
    'cci': 13, 'mfi': 14, 'obv': 0, 'willr': 13, 'roc': 10, 'macd': 33, 'bbands': 19, 'stoch': 8, 'aroon': 14,
    'true_range': 1,
}
