"""Causal rolling and recursive operations on 1-D float32 series (pure jnp, jittable).

Every function maps a series `x[T]` to an output `[T]` whose row t depends only on `x[:t+1]`.
Rows without a full look-back are NaN (never zero-filled), so the warm-up is visible downstream.

Precision rules (DESIGN.md, rule 4):
- windowed sums use `lax.reduce_window` over the window itself; there is no global float32 cumsum whose
  rounding error grows with the series length (a cumsum SMA drifts to ~1% error over 1M bars);
- variances and higher moments are two-pass: the window mean first, then the centred powers
  (`E[x^2] - E[x]^2` on price levels loses every significant digit in float32);
- EMA / Wilder recursions are a `lax.scan`: error stays bounded because the recursion is contractive.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

NAN = jnp.nan


def _nan_head(y: jax.Array, n: int) -> jax.Array:
  """Sets the first n rows to NaN."""
  idx = jnp.arange(y.shape[0])
  return jnp.where(idx < n, NAN, y)


def _reduce(x: jax.Array, n: int, init, op) -> jax.Array:
  """Causal window reduction over the last n values (rows < n-1 are NaN)."""
  if n < 1:
    raise ValueError(f"window length must be >= 1, got {n}")
  x = jnp.asarray(x, jnp.float32)
  y = lax.reduce_window(x, jnp.asarray(init, x.dtype), op, (n,), (1,), [(n - 1, 0)])
  return _nan_head(y, n - 1)


def rolling_sum(x: jax.Array, n: int) -> jax.Array:
  """Sum of x[t-n+1..t]."""
  return _reduce(x, n, 0.0, lax.add)


def rolling_mean(x: jax.Array, n: int) -> jax.Array:
  """Simple moving average (TA-Lib SMA)."""
  return rolling_sum(x, n) / n


def rolling_max(x: jax.Array, n: int) -> jax.Array:
  return _reduce(x, n, -jnp.inf, lax.max)


def rolling_min(x: jax.Array, n: int) -> jax.Array:
  return _reduce(x, n, jnp.inf, lax.min)


def lag(x: jax.Array, k: int) -> jax.Array:
  """x[t-k] (NaN for t < k). k >= 0."""
  x = jnp.asarray(x, jnp.float32)
  if k == 0:
    return x
  if k >= x.shape[0]:
    return jnp.full_like(x, NAN)
  return jnp.concatenate([jnp.full((k,), NAN, x.dtype), x[:-k]])


def _lag_fold(x: jax.Array, n: int, init, body):
  """Folds `body(acc, x_lagged, k)` over lags k = n-1 .. 0 (oldest first) without materialising [n, T].

  x_lagged[t] = x[t-k]; values before the start of the series are NaN.
  """
  x = jnp.asarray(x, jnp.float32)
  t = x.shape[0]
  padded = jnp.concatenate([jnp.full((n - 1,), NAN, x.dtype), x])

  def step(i, acc):
    k = n - 1 - i
    xk = lax.dynamic_slice(padded, (n - 1 - k,), (t,))
    return body(acc, xk, k)

  return lax.fori_loop(0, n, step, init)


def rolling_central_moments(x: jax.Array, n: int, max_order: int = 2):
  """Two-pass rolling mean and central moments over windows of n.

  Returns (mean, m2, m3, ...) up to `max_order`, each the population moment E[(x - mean)^k] of the window.
  """
  mean = rolling_mean(x, n)
  orders = tuple(range(2, max_order + 1))
  zeros = tuple(jnp.zeros_like(mean) for _ in orders)

  def body(acc, xk, _):
    d = xk - mean
    return tuple(a + d**p for a, p in zip(acc, orders))

  sums = _lag_fold(x, n, zeros, body)
  return (mean,) + tuple(s / n for s in sums)


def rolling_var(x: jax.Array, n: int, ddof: int = 0) -> jax.Array:
  """Two-pass rolling variance (population by default, as TA-Lib's STDDEV/BBANDS)."""
  mean, m2 = rolling_central_moments(x, n, 2)
  del mean
  return m2 * n / (n - ddof)


def rolling_std(x: jax.Array, n: int, ddof: int = 0) -> jax.Array:
  return jnp.sqrt(jnp.maximum(rolling_var(x, n, ddof), 0.0))


def rolling_mean_abs_dev(x: jax.Array, n: int) -> jax.Array:
  """Mean absolute deviation from the window mean (TA-Lib CCI)."""
  mean = rolling_mean(x, n)
  total = _lag_fold(x, n, jnp.zeros_like(mean), lambda acc, xk, _: acc + jnp.abs(xk - mean))
  return total / n


def bars_since_max(x: jax.Array, n: int) -> jax.Array:
  """Bars since the maximum of x[t-n+1..t] (0 = now); ties go to the most recent bar (TA-Lib AROON)."""
  return _bars_since_extreme(x, n, jnp.greater_equal)


def bars_since_min(x: jax.Array, n: int) -> jax.Array:
  """Bars since the minimum of x[t-n+1..t] (0 = now); ties go to the most recent bar."""
  return _bars_since_extreme(x, n, jnp.less_equal)


def _bars_since_extreme(x: jax.Array, n: int, better) -> jax.Array:
  x = jnp.asarray(x, jnp.float32)
  best0 = jnp.full_like(x, NAN)
  age0 = jnp.zeros_like(x)

  def body(acc, xk, k):
    best, age = acc
    # Oldest lag first; `>=`/`<=` lets a later (more recent) equal value win the tie.
    take = jnp.isnan(best) | better(xk, best)
    return jnp.where(take, xk, best), jnp.where(take, jnp.float32(k), age)

  _, age = _lag_fold(x, n, (best0, age0), body)
  return _nan_head(age, n - 1)


def ewm(x: jax.Array, alpha: float, seed_index: int, seed_value: jax.Array) -> jax.Array:
  """Exponential recursion y[t] = y[t-1] + alpha * (x[t] - y[t-1]) seeded with y[seed_index] = seed_value.

  Rows before `seed_index` are NaN. `seed_index` is a static Python int.
  """
  x = jnp.asarray(x, jnp.float32)
  t = x.shape[0]
  if seed_index >= t:
    return jnp.full_like(x, NAN)
  alpha = jnp.float32(alpha)

  def step(prev, xt):
    y = prev + alpha * (xt - prev)
    return y, y

  _, tail = lax.scan(step, jnp.asarray(seed_value, jnp.float32), x[seed_index + 1:])
  head = jnp.full((seed_index,), NAN, x.dtype)
  return jnp.concatenate([head, jnp.asarray(seed_value, x.dtype)[None], tail])


def ema(x: jax.Array, n: int, start: int = 0) -> jax.Array:
  """TA-Lib EMA: alpha = 2/(n+1), seeded with the SMA of x[start:start+n] at index start+n-1.

  `start` is the first valid index of x (e.g. the EMA of an indicator with its own warm-up).
  """
  seed = jnp.mean(jnp.asarray(x, jnp.float32)[start:start + n])
  return ewm(x, 2.0 / (n + 1.0), start + n - 1, seed)


def wilder(x: jax.Array, n: int, start: int = 0) -> jax.Array:
  """Wilder smoothing (alpha = 1/n) seeded with the simple mean of x[start:start+n] at index start+n-1.

  With `start=1` on the true range this is TA-Lib's ATR (first value at index n).
  """
  seed = jnp.mean(jnp.asarray(x, jnp.float32)[start:start + n])
  return ewm(x, 1.0 / n, start + n - 1, seed)


def safe_div(a: jax.Array, b: jax.Array, fill: float = 0.0) -> jax.Array:
  """a / b with `fill` where b == 0 (NaN inputs stay NaN)."""
  zero = b == 0
  return jnp.where(zero, jnp.where(jnp.isnan(a), NAN, fill), a / jnp.where(zero, 1.0, b))
