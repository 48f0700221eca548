"""Return features (multi-horizon log returns, volatility-normalised returns, intrabar returns), and the small
return helpers every category shares (this module imports only the primitives, so all of them can use it).

Log returns are scale-free by construction. They are computed as `log1p((c[t] - c[t-k]) / c[t-k])`: the
difference of two nearby float32 prices is exact, so the return keeps full relative precision, where
`log(c[t]) - log(c[t-k])` would lose ~3 digits to the size of the logarithm of the price level.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from natron.features import primitives as P

HORIZONS = (1, 2, 3, 5, 10, 20, 50, 96)   # 96 bars = one day of 15-minute bars
VOL_WINDOW = 20

NAMES = tuple(f'logret_{k}' for k in HORIZONS) + (
    'logret_1_z20', 'logret_10_z20', 'logret_intrabar', 'logret_high', 'logret_low')
WARMUP = max(max(HORIZONS), VOL_WINDOW)


def log_return(x: jax.Array, k: int = 1) -> jax.Array:
  """log(x[t] / x[t-k]) for positive x, [T] (NaN for t < k)."""
  prev = P.lag(x, k)
  return P.log1p((x - prev) / prev)


def log_ratio(a: jax.Array, b: jax.Array) -> jax.Array:
  """log(a / b) for nearby positive a, b, with the precision of their difference."""
  return P.log1p((a - b) / b)


def returns_var(r: jax.Array, n: int) -> jax.Array:
  """Rolling population variance of returns over n bars, [T].

  One pass (E[r^2] - E[r]^2) over windowed sums is acceptable here and only here: returns are centred near
  zero (|mean| << std over any window), so there is no cancellation; never use it on price levels. It keeps
  the long windows (up to 200 bars) cheap, where a two-pass lag fold would cost one pass over T per bar.
  """
  mean = P.rolling_mean(r, n)
  return jnp.maximum(P.rolling_mean(r * r, n) - mean * mean, 0.0)


def compute(o, h, l, c, v, *, atr=None):
  """Returns (names, columns), each column float32 [T]."""
  del v, atr
  cols = {f'logret_{k}': log_return(c, k) for k in HORIZONS}
  r1 = cols['logret_1']
  sd = jnp.sqrt(returns_var(r1, VOL_WINDOW))
  cols['logret_1_z20'] = P.safe_div(r1, sd)
  cols['logret_10_z20'] = P.safe_div(cols['logret_10'], sd * jnp.sqrt(10.0))
  prev_c = P.lag(c, 1)
  cols['logret_intrabar'] = log_ratio(c, o)
  cols['logret_high'] = log_ratio(h, prev_c)
  cols['logret_low'] = log_ratio(l, prev_c)
  return finish(NAMES, cols)


def finish(names, cols: dict):
  """Checks the computed columns against the declared names (the order is the contract) -> (names, list)."""
  if tuple(cols) != tuple(names):
    raise AssertionError(f'feature columns {tuple(cols)} do not match the declared names {tuple(names)}')
  return list(names), [jnp.asarray(cols[n], jnp.float32) for n in names]
