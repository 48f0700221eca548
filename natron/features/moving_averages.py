"""Moving-average features: where the close sits relative to SMAs/EMAs, MA spreads and slopes, in ATR units.

Every MA is a price level, so each feature is a difference of two levels divided by ATR(14) (or a sign),
which makes it invariant to the price scale. EMA periods stop at 100: an EMA forgets its seed as
(1 - 2/(n+1))^t, and with n = 100 the difference between a full-history and a WARMUP-bar start is
~1e-8 after the warm-up (train/serve parity). SMAs are windowed and exact for any start, so SMA 200 is fine.

Precision: `c - EMA_n` is run as its own recursion on price changes (`ema_deviation`), so it keeps float32's
relative precision of the small deviation instead of inheriting ~1e-7 of the price level (1e-4..1e-3 ATR on
a calm FX pair). Likewise `c - SMA_n` is the mean of the exact differences c[t-k] - c[t]
(`centred_window_sums`), not c minus a float32 window sum of price levels.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from natron.features import indicators as ind
from natron.features import primitives as P
from natron.features.returns import finish

SMA_PERIODS = (10, 20, 50, 100, 200)
EMA_PERIODS = (10, 20, 50, 100)
SLOPE_LAG = 5
BLOCK = 10          # SMA periods are multiples of BLOCK (see centred_window_sums)

NAMES = (tuple(f'close_sma{n}_atr' for n in SMA_PERIODS)
         + tuple(f'close_ema{n}_atr' for n in EMA_PERIODS)
         + ('ema10_ema20_atr', 'ema20_ema50_atr', 'ema50_ema100_atr', 'sma50_sma200_atr',
            'sma20_slope5_atr', 'ema50_slope5_atr', 'ema_alignment'))
WARMUP = max(SMA_PERIODS) + SLOPE_LAG


def ema_deviation(c: jax.Array, n: int) -> jax.Array:
  """c - EMA_n(c) for TA-Lib's EMA (alpha 2/(n+1), SMA seed at n-1), as a recursion on dc, [T].

  d[t] = c[t] - e[t] = (1 - a) (d[t-1] + c[t] - c[t-1]), seeded with d[n-1] = mean(c[n-1] - c[0:n]); only
  small numbers are rounded. NaN before n-1.
  """
  c = jnp.asarray(c, jnp.float32)
  t_len = c.shape[0]
  if t_len < n:
    return jnp.full_like(c, jnp.nan)
  alpha = jnp.float32(2.0 / (n + 1.0))
  seed = jnp.mean(c[n - 1] - c[:n])

  def step(d, dc):
    s = d + dc
    d = s - alpha * s
    return d, d

  _, tail = lax.scan(step, seed, c[n:] - c[n - 1:-1])
  return jnp.concatenate([jnp.full((n - 1,), jnp.nan, c.dtype), seed[None], tail])


def centred_window_sums(x, c, windows, block: int, w=None) -> dict:
  """{n: sum_{k<n} w[t-k] (x[t-k] - c[t])} for n in `windows` (multiples of `block`), [T] each; w=None is 1.

  Centring on the current close keeps every term a small, exact float32 difference, so nothing inherits the
  rounding of a sum of price levels (~1e-6 of the price, ~1e-3 ATR on a calm FX pair), which moreover
  changes with the input length through reduce_window's summation order and would break train/serve parity.
  With k = block q + r the sum splits into sum_q [B[t - block q] + W[t - block q] (c[t - block q] - c[t])],
  B[s] = sum_{r<block} w[s-r] (x[s-r] - c[s]), W the block's weight: block + n/block passes over T, not n.
  NaN before n-1.
  """
  c = jnp.asarray(c, jnp.float32)
  t_len = c.shape[0]
  if any(n % block for n in windows):
    raise ValueError(f'windows {windows} must be multiples of the block {block}')
  if w is None:
    inner = P.lag_fold((x,), block, jnp.zeros_like(c), lambda acc, lagged, k: acc + (lagged[0] - c))
    weight = jnp.full_like(c, float(block))
  else:
    inner = P.lag_fold((x, w), block, jnp.zeros_like(c), lambda acc, lagged, k: acc + lagged[1] * (lagged[0] - c))
    weight = P.rolling_sum(w, block)
  q_max = max(windows) // block
  pad = (q_max - 1) * block
  padded = jnp.concatenate([jnp.full((3, pad), jnp.nan, c.dtype), jnp.stack([inner, weight, c])], axis=1)

  def step(q, acc):
    b_q, w_q, c_q = lax.dynamic_slice(padded, (0, pad - q * block), (3, t_len))
    term = b_q + w_q * (c_q - c)
    return tuple(s + jnp.where(q < n // block, term, 0.0) for s, n in zip(acc, windows))

  # Unrolled: one fused kernel (a while loop copies its tuple carry every iteration).
  sums = P.fori(q_max, step, tuple(jnp.zeros_like(c) for _ in windows), unroll=True)
  return dict(zip(windows, sums))


def sma_deviations(c: jax.Array, periods=SMA_PERIODS) -> dict:
  """{n: c - SMA_n(c)} from exact price differences (periods are multiples of BLOCK), [T] each."""
  return {n: -s / n for n, s in centred_window_sums(c, c, periods, BLOCK).items()}


def compute(o, h, l, c, v, *, atr=None):
  """Returns (names, columns), each column float32 [T]; `atr` is ATR(14) of the bars if already known."""
  del o, v
  atr = ind.atr(h, l, c, 14) if atr is None else atr
  sma_dev = sma_deviations(c)                               # c - SMA_n
  dev = {n: ema_deviation(c, n) for n in EMA_PERIODS}     # c - EMA_n
  in_atr = lambda x: P.safe_div(x, atr)
  cols = {f'close_sma{n}_atr': in_atr(sma_dev[n]) for n in SMA_PERIODS}
  cols.update({f'close_ema{n}_atr': in_atr(dev[n]) for n in EMA_PERIODS})
  cols['ema10_ema20_atr'] = in_atr(dev[20] - dev[10])
  cols['ema20_ema50_atr'] = in_atr(dev[50] - dev[20])
  cols['ema50_ema100_atr'] = in_atr(dev[100] - dev[50])
  cols['sma50_sma200_atr'] = in_atr(sma_dev[200] - sma_dev[50])
  # Slopes per bar, in ATR units; MA[t] - MA[t-k] = (c[t] - c[t-k]) - (dev[t] - dev[t-k]).
  sma_change = (c - P.lag(c, SLOPE_LAG)) - (sma_dev[20] - P.lag(sma_dev[20], SLOPE_LAG))
  cols['sma20_slope5_atr'] = in_atr(sma_change) / SLOPE_LAG
  ema_change = (c - P.lag(c, SLOPE_LAG)) - (dev[50] - P.lag(dev[50], SLOPE_LAG))
  cols['ema50_slope5_atr'] = in_atr(ema_change) / SLOPE_LAG
  # +1 when close > EMA10 > EMA20 > EMA50 > EMA100 (a bullish ribbon), -1 when fully inverted.
  gaps = (dev[10], dev[20] - dev[10], dev[50] - dev[20], dev[100] - dev[50])
  cols['ema_alignment'] = sum(jnp.sign(g) for g in gaps) / 4.0
  return finish(NAMES, cols)
