"""Statistical features of the return distribution and of the price path: rolling skewness and kurtosis,
z-scores of the close, lag-1 autocorrelation, variance ratio, Hurst exponent and percentile rank.

Moments of returns are two-pass (`primitives.rolling_central_moments`); z-scores of the close are two-pass
on differences from the current close. The variance-ratio, autocorrelation and Hurst estimates use windowed
sums of returns (`returns.returns_var`), exact enough on near-zero-mean returns and cheap over 200 bars.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from natron.features import primitives as P
from natron.features.returns import finish, log_return, returns_var

MOMENT_WINDOW = 50
ZSCORE_WINDOWS = (20, 50)
HURST_WINDOW = 200
HURST_SCALES = (1, 2, 4, 8, 16)
VR_WINDOW, VR_SCALE = 100, 8
RANK_WINDOW = 50

NAMES = ('skew_50', 'kurt_50', 'zscore_20', 'zscore_50', 'autocorr_1_50', 'var_ratio_8_100', 'hurst_200',
         'pct_rank_50')
WARMUP = HURST_WINDOW + max(HURST_SCALES)


def skew_kurt(x, n: int):
  """Rolling skewness and excess kurtosis (population moments, two-pass), ([T], [T])."""
  _, m2, m3, m4 = P.rolling_central_moments(x, n, 4)
  return P.safe_div(m3, m2 * jnp.sqrt(m2)), P.safe_div(m4, m2 * m2, 3.0) - 3.0


def zscores(c, windows=ZSCORE_WINDOWS):
  """{n: (c - rolling mean) / rolling population std over n bars} for each n in `windows`, [T] each.

  Two-pass on D_k = c[t-k] - c[t], the window relative to the current close (exact float32 differences), so
  neither the mean nor the deviation inherits the rounding of a sum of price levels, which would differ with
  the length of the input (reduce_window's summation order) by ~1e-3 of an ATR.
  """
  n_max = max(windows)
  zeros = tuple(jnp.zeros_like(c) for _ in windows)

  def mean_body(acc, lagged, k):
    d = lagged[0] - c
    return tuple(a + jnp.where(k < n, d, 0.0) for a, n in zip(acc, windows))

  means = tuple(s / n for s, n in zip(P.lag_fold((c,), n_max, zeros, mean_body), windows))

  def var_body(acc, lagged, k):
    d = lagged[0] - c
    return tuple(a + jnp.where(k < n, (d - m) ** 2, 0.0) for a, n, m in zip(acc, windows, means))

  m2 = tuple(s / n for s, n in zip(P.lag_fold((c,), n_max, zeros, var_body), windows))
  # c - mean = -mean(D).
  return {n: P.safe_div(-m, jnp.sqrt(v)) for n, m, v in zip(windows, means, m2)}


def autocorr_1(r, n: int):
  """Lag-1 autocorrelation of returns over the last n pairs, [T]."""
  prev = P.lag(r, 1)
  m, mp, mx = P.rolling_mean(r, n), P.rolling_mean(prev, n), P.rolling_mean(r * prev, n)
  return P.safe_div(mx - m * mp, jnp.sqrt(returns_var(r, n) * returns_var(prev, n)))


def variance_ratio(c, n: int, k: int):
  """Lo-MacKinlay variance ratio Var(k-bar returns) / (k Var(1-bar returns)) over n bars; 1 = random walk."""
  return P.safe_div(returns_var(log_return(c, k), n), k * returns_var(log_return(c, 1), n), 1.0)


def hurst_exponent(c, n: int = HURST_WINDOW, scales=HURST_SCALES) -> jax.Array:
  """Hurst exponent from the scaling of return variance, Var(k-bar returns) ~ k^(2H), over n bars, [T].

  H is half the least-squares slope of log Var(r_k) on log k across `scales` (overlapping k-bar log returns,
  each variance over the last n bars). 0.5 = random walk, > 0.5 trending, < 0.5 mean-reverting; clipped to
  [0, 1]; 0.5 on a flat window.
  """
  logk = [math.log(k) for k in scales]
  mean_logk = sum(logk) / len(logk)
  weights = [(x - mean_logk) / sum((y - mean_logk) ** 2 for y in logk) for x in logk]   # OLS slope weights
  # The barrier materialises each variance once (fused into the log-sum, XLA duplicated the window sums);
  # the slope is a sum of [T] terms, not a reduction over the leading axis of a stack (slow on XLA CPU).
  var = lax.optimization_barrier([returns_var(log_return(c, k), n) for k in scales])
  slope = sum(w * jnp.log(jnp.maximum(x, 1e-30)) for w, x in zip(weights, var))
  return jnp.where(var[0] == 0, 0.5, jnp.clip(slope / 2.0, 0.0, 1.0))


def percentile_rank(x, n: int):
  """Fraction of the previous n-1 values strictly below x[t] (ties count half), in [0, 1], [T]."""
  def body(acc, lagged, k):
    xk = lagged[0]
    below = jnp.where(xk < x, 1.0, jnp.where(xk == x, 0.5, 0.0))
    return acc + jnp.where(k > 0, below, 0.0)

  total = P.lag_fold((x,), n, jnp.zeros_like(x), body)
  return jnp.where(jnp.arange(x.shape[0]) < n - 1, jnp.nan, total / (n - 1))


def compute(o, h, l, c, v, *, atr=None):
  """Returns (names, columns), each column float32 [T]."""
  del o, h, l, v, atr
  r1 = log_return(c, 1)
  skew, kurt = skew_kurt(r1, MOMENT_WINDOW)
  cols = {'skew_50': skew, 'kurt_50': kurt}
  cols.update({f'zscore_{n}': z for n, z in zscores(c).items()})
  cols['autocorr_1_50'] = autocorr_1(r1, MOMENT_WINDOW)
  cols['var_ratio_8_100'] = variance_ratio(c, VR_WINDOW, VR_SCALE)
  cols['hurst_200'] = hurst_exponent(c)
  cols['pct_rank_50'] = percentile_rank(c, RANK_WINDOW)
  return finish(NAMES, cols)
