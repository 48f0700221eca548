"""Trend-strength features: ADX / +DI / -DI (Wilder, 14), Aroon (25), linear-regression slope and R^2 of the
close, Kaufman's efficiency ratio. All bounded or in ATR units.
"""
from __future__ import annotations

import jax.numpy as jnp

from natron.features import indicators as ind
from natron.features import primitives as P
from natron.features.returns import finish

DI_PERIOD = 14
AROON_PERIOD = 25
REG_WINDOW = 20
ER_WINDOW = 20

NAMES = ('adx_14', 'plus_di_14', 'minus_di_14', 'di_spread_14', 'aroon_up_25', 'aroon_down_25', 'aroon_osc_25',
         'linreg_slope_20_atr', 'linreg_r2_20', 'efficiency_ratio_20')
WARMUP = 2 * DI_PERIOD


def linreg(c, n: int):
  """Least-squares line through the last n closes: (slope per bar in price units, R^2), ([T], [T]).

  Accumulated on x_k = c[t-k] - c[t], the path relative to the current close, so no float32 sum of price
  levels is formed.
  """
  s_mean = -(n - 1) / 2.0                      # bar offsets s = -k, k = 0..n-1
  s_ss = n * (n * n - 1) / 12.0                # sum (s - s_mean)^2

  def body(acc, lagged, k):
    x = lagged[0] - c
    ds = -k.astype(jnp.float32) - s_mean
    return acc[0] + x, acc[1] + x * x, acc[2] + ds * x

  zeros = jnp.zeros_like(c)
  sx, sxx, sdx = P.lag_fold((c,), n, (zeros, zeros, zeros), body)
  slope = sdx / s_ss
  ss_x = jnp.maximum(sxx - sx * sx / n, 0.0)   # x is centred on the window, no cancellation
  r2 = P.safe_div(sdx * sdx, s_ss * ss_x)
  return slope, jnp.clip(r2, 0.0, 1.0)


def efficiency_ratio(c, n: int):
  """Kaufman efficiency ratio |c[t] - c[t-n]| / sum |c[i] - c[i-1]| over n bars, in [0, 1], [T]."""
  path = P.rolling_sum(jnp.abs(c - P.lag(c, 1)), n)
  return P.safe_div(jnp.abs(c - P.lag(c, n)), path)


def compute(o, h, l, c, v, *, atr=None):
  """Returns (names, columns), each column float32 [T]; `atr` is ATR(14) of the bars if already known."""
  del o, v
  atr = ind.atr(h, l, c, 14) if atr is None else atr
  plus, minus, adx = ind.dmi(h, l, c, DI_PERIOD)   # one pass for +DI, -DI and ADX
  cols = {'adx_14': adx / 100.0, 'plus_di_14': plus / 100.0,
          'minus_di_14': minus / 100.0, 'di_spread_14': P.safe_div(plus - minus, plus + minus)}
  down, up = ind.aroon(h, l, AROON_PERIOD)
  cols['aroon_up_25'] = up / 100.0
  cols['aroon_down_25'] = down / 100.0
  cols['aroon_osc_25'] = (up - down) / 100.0
  slope, r2 = linreg(c, REG_WINDOW)
  cols['linreg_slope_20_atr'] = P.safe_div(slope, atr)
  cols['linreg_r2_20'] = r2
  cols['efficiency_ratio_20'] = efficiency_ratio(c, ER_WINDOW)
  return finish(NAMES, cols)
