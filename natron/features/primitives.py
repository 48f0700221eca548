"""Causal rolling and recursive operations on 1-D float32 series (pure jnp, jittable).

Every function maps a series `x[T]` to an output `[T]` whose row t depends only on `x[:t+1]`.
Rows without a full look-back are NaN (never zero-filled), so the warm-up is visible downstream.

Precision rules (DESIGN.md, rule 4):
- windowed sums reduce the window itself (`lax.reduce_window`, blocked for long windows); there is no global
  float32 cumsum whose rounding error grows with the series length (a cumsum SMA drifts to ~1% over 1M bars);
- variances and higher moments are two-pass: the window mean first, then the centred powers
  (`E[x^2] - E[x]^2` on price levels loses every significant digit in float32);
- EMA / Wilder recursions are a `lax.scan`: error stays bounded because the recursion is contractive.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

NAN = jnp.nan
UNROLL_LAGS = 64     # lag folds up to this many lags are unrolled (see lag_fold)


def _nan_head(y: jax.Array, n: int) -> jax.Array:
  """Sets the first n rows to NaN."""
  idx = jnp.arange(y.shape[0])
  return jnp.where(idx < n, NAN, y)


def _window(x: jax.Array, n: int, init, op) -> jax.Array:
  """XLA's causal window reduction of the last n values (rows t < n-1 reduce a partial window)."""
  return lax.reduce_window(x, jnp.asarray(init, x.dtype), op, (n,), (1,), [(n - 1, 0)])


def _blocked(x: jax.Array, n: int, init, op) -> jax.Array:
  """Window reduction over n bars as `op` of the b-bar reductions at lags 0, b, 2b, ... (b ~ sqrt n).

  Exact for max/min and the same sum up to float32 reassociation (still a sum over the window itself, never
  a global cumsum); O(T (b + n/b)) instead of XLA CPU's O(T n) reduce_window. Windowed, so independent of
  where the input starts. x is [..., T]; each series is reduced on its own. Rows t < n-1 are NaN.
  """
  if n < 1:
    raise ValueError(f'window length must be >= 1, got {n}')
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
    base = jnp.concatenate([jnp.full((pad,), NAN, x.dtype), _window(x, b, init, op)])
    out = base[pad:]
    for q in range(1, m):
      out = op(out, base[pad - q * b:pad - q * b + t_len])
    if r:
      out = op(out, lag(_window(x, r, init, op), m * b))
  return _nan_head(out, n - 1)


def rolling_sum(x: jax.Array, n: int) -> jax.Array:
  """Sum of x[..., t-n+1..t] (NaN for t < n-1), [..., T]."""
  return _blocked(x, n, 0.0, lax.add)


def rolling_mean(x: jax.Array, n: int) -> jax.Array:
  """Simple moving average (TA-Lib SMA), [..., T]."""
  return rolling_sum(x, n) / n


def rolling_max(x: jax.Array, n: int) -> jax.Array:
  """max of x[..., t-n+1..t] (NaN for t < n-1), exact, [..., T]."""
  return _blocked(x, n, -jnp.inf, lax.max)


def rolling_min(x: jax.Array, n: int) -> jax.Array:
  """min of x[..., t-n+1..t] (NaN for t < n-1), exact, [..., T]."""
  return _blocked(x, n, jnp.inf, lax.min)


def lag(x: jax.Array, k: int) -> jax.Array:
  """x[t-k] (NaN for t < k). k >= 0."""
  x = jnp.asarray(x, jnp.float32)
  if k == 0:
    return x
  if k >= x.shape[0]:
    return jnp.full_like(x, NAN)
  return jnp.concatenate([jnp.full((k,), NAN, x.dtype), x[:-k]])


def lag_fold(xs, n: int, init, body):
  """Folds `body(acc, lagged, k)` over lags k = n-1 .. 0 (oldest first) of the [T] series in `xs`.

  `lagged` is a tuple with lagged[i][t] = xs[i][t-k] (NaN before the series starts) and `k` is a traced
  int32. Up to UNROLL_LAGS lags the fold is unrolled into one fused kernel over T; longer folds are one
  fori_loop pass per lag. The [n, T] matrix of lags is never materialised.
  """
  xs = jnp.stack([jnp.asarray(x, jnp.float32) for x in xs])
  t_len = xs.shape[1]
  padded = jnp.concatenate([jnp.full((xs.shape[0], n - 1), NAN, xs.dtype), xs], axis=1)

  def step(i, acc):
    lagged = lax.dynamic_slice(padded, (0, i), (xs.shape[0], t_len))
    return body(acc, tuple(lagged), n - 1 - i)

  # Unrolled up to UNROLL_LAGS lags: XLA then fuses the whole fold into one multi-output kernel; a while loop
  # with a tuple carry copies its accumulators every iteration (measured ~10x slower for three of them).
  return fori(n, step, init, unroll=n <= UNROLL_LAGS)


def log1p(x: jax.Array) -> jax.Array:
  """log(1 + x) to float32 accuracy without relying on any log's accuracy near 1, [same shape].

  |x| < 0.1 (every ordinary return): 2 atanh(s), s = x / (2 + x), as its odd series to s**9 (truncation
  below 1e-13 relative: s**2 < 0.0028); otherwise log(1 + x), where 1 + x is far enough from 1 for any log.
  jnp.log1p is exact in XLA, but ONNX has no Log1p: jax2onnx lowers it to Log(1 + x), which drops the low
  digits of a one-bar return, and ONNX Runtime's Log is accurate near 1 only in absolute terms (~1e-7, i.e.
  1e-3 of a 1e-4 return). Built from + - * / only, this gives the same numbers in XLA and in ONNX Runtime.
  """
  x = jnp.asarray(x, jnp.float32)
  s = x / (2.0 + x)
  s2 = s * s
  series = 2.0 * s * (1.0 + s2 * (1.0 / 3.0 + s2 * (1.0 / 5.0 + s2 * (1.0 / 7.0 + s2 * (1.0 / 9.0)))))
  return jnp.where(jnp.abs(x) < 0.1, series, jnp.log(1.0 + x))


def fori(n: int, body, init, *, unroll: bool):
  """`lax.fori_loop(0, n, body, init)` as the `lax.scan` it lowers to; fully unrolled in Python when `unroll`.

  The same program as fori_loop with static bounds, written with the primitives themselves so the ONNX export
  (natron.export) sees a plain scan: jax2onnx replaces `lax.fori_loop` with its own binding, which takes no
  `unroll` and cannot lower a body that closes over traced arrays (the lagged series here).
  """
  if not unroll:
    return lax.scan(lambda acc, i: (body(i, acc), None), init, jnp.arange(n, dtype=jnp.int32))[0]
  acc = init
  for i in range(n):
    acc = body(jnp.int32(i), acc)   # a constant int32, as fori_loop's traced index
  return acc


def _lag_fold(x: jax.Array, n: int, init, body):
  """lag_fold of one series: `body(acc, x_lagged, k)`."""
  return lag_fold((x,), n, init, lambda acc, lagged, k: body(acc, lagged[0], k))


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
