"""Return features (multi-horizon log returns, volatility-normalised returns, intrabar returns), and the small
windowed helpers every category shares (this module imports only the primitives, so all of them can use it).

Log returns are scale-free by construction. They are computed as `log1p((c[t] - c[t-k]) / c[t-k])`: the
difference of two nearby float32 prices is exact, so the return keeps full relative precision, where
`log(c[t]) - log(c[t-k])` would lose ~3 digits to the size of the logarithm of the price level.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from natron.features import primitives as P

HORIZONS = (1, 2, 3, 5, 10, 20, 50, 96)   # 96 bars = one day of 15-minute bars
VOL_WINDOW = 20

NAMES = tuple(f'logret_{k}' for k in HORIZONS) + (
    'logret_1_z20', 'logret_10_z20', 'logret_intrabar', 'logret_high', 'logret_low')
WARMUP = max(max(HORIZONS), VOL_WINDOW)


def log_return(x: jax.Array, k: int = 1) -> jax.Array:
  """log(x[t] / x[t-k]) for positive x, [T] (NaN for t < k)."""
  prev = P.lag(x, k)
  return jnp.log1p((x - prev) / prev)


def log_ratio(a: jax.Array, b: jax.Array) -> jax.Array:
  """log(a / b) for nearby positive a, b, with the precision of their difference."""
  return jnp.log1p((a - b) / b)


def lag_fold(xs, n: int, init, body):
  """Folds `body(acc, lagged, k)` over lags k = n-1 .. 0 (oldest first) of the [T] series in `xs`.

  `lagged` is a tuple with lagged[i][t] = xs[i][t-k] (NaN before the series starts) and `k` is a traced
  int32. One fori_loop pass per lag, each a fused elementwise kernel over T: the [n, T] matrix of lags is
  never materialised.
  """
  xs = jnp.stack([jnp.asarray(x, jnp.float32) for x in xs])
  t_len = xs.shape[1]
  padded = jnp.concatenate([jnp.full((xs.shape[0], n - 1), jnp.nan, xs.dtype), xs], axis=1)

  def step(i, acc):
    lagged = lax.dynamic_slice(padded, (0, i), (xs.shape[0], t_len))
    return body(acc, tuple(lagged), n - 1 - i)

  return lax.fori_loop(0, n, step, init)


def _window(x, n: int, init, op):
  """Causal window reduction of a 1-D series over n bars (rows t < n-1 are partial windows)."""
  return lax.reduce_window(x, jnp.asarray(init, x.dtype), op, (n,), (1,), [(n - 1, 0)])


def _lag(x, k: int):
  """x[t-k] of a 1-D series (NaN for t < k)."""
  return x if k == 0 else jnp.concatenate([jnp.full((k,), jnp.nan, x.dtype), x[:-k]])


def _blocked(x, n: int, init, op):
  """Window reduction over n bars as `op` of the b-bar reductions at lags 0, b, 2b, ... (b ~ sqrt n).

  Exact for max/min and the same sum up to float32 reassociation; O(T (b + n/b)) instead of XLA CPU's
  O(T n) reduce_window. Windowed, so independent of where the input starts. x is [..., T]; each series is
  reduced on its own.
  """
  x = jnp.asarray(x, jnp.float32)
  if x.ndim > 1:
    rows = x.reshape(-1, x.shape[-1])
    # The barrier keeps XLA from fusing every row's chain into the stacking concatenate, whose per-element
    # operand selection does not vectorise (measured ~10x slower).
    out = lax.optimization_barrier(tuple(_blocked(row, n, init, op) for row in rows))
    return jnp.stack(out).reshape(x.shape)
  b = max(1, int(math.sqrt(n)))
  if n <= 2 * b:
    out = _window(x, n, init, op)
  else:
    m, r = divmod(n, b)
    t_len = x.shape[0]
    # Lags as static slices of one front-padded copy (cheap offset reads in the fused chain, no
    # per-lag concatenate).
    pad = (m - 1) * b
    base = jnp.concatenate([jnp.full((pad,), jnp.nan, x.dtype), _window(x, b, init, op)])
    out = base[pad:]
    for q in range(1, m):
      out = op(out, base[pad - q * b:pad - q * b + t_len])
    if r:
      out = op(out, _lag(_window(x, r, init, op), m * b))
  return jnp.where(jnp.arange(x.shape[0]) < n - 1, jnp.nan, out)


def window_sum(x: jax.Array, n: int) -> jax.Array:
  """Sum of x[..., t-n+1..t] (NaN for t < n-1), [..., T]."""
  return _blocked(x, n, 0.0, lax.add)


def window_mean(x: jax.Array, n: int) -> jax.Array:
  """Mean of x[..., t-n+1..t] (NaN for t < n-1), [..., T]; for small-magnitude series, not price levels."""
  return window_sum(x, n) / n


def window_max(x: jax.Array, n: int) -> jax.Array:
  """max of x[..., t-n+1..t] (NaN for t < n-1), [..., T]."""
  return _blocked(x, n, -jnp.inf, lax.max)


def window_min(x: jax.Array, n: int) -> jax.Array:
  """min of x[..., t-n+1..t] (NaN for t < n-1), [..., T]."""
  return _blocked(x, n, jnp.inf, lax.min)


def returns_var(r: jax.Array, n: int) -> jax.Array:
  """Rolling population variance of returns over n bars, [T].

  One pass (E[r^2] - E[r]^2) over windowed sums is acceptable here and only here: returns are centred near
  zero (|mean| << std over any window), so there is no cancellation; never use it on price levels. It keeps
  the long windows (up to 200 bars) cheap, where a two-pass lag fold would cost one pass over T per bar.
  """
  mean = window_mean(r, n)
  return jnp.maximum(window_mean(r * r, n) - mean * mean, 0.0)


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
