"""Volume features: volume relative to its own rolling mean, windowed on-balance volume, money flow, rolling
VWAP distance, force index, and the volume / |return| correlation.

Raw volume is never a feature (its scale differs by instrument, broker and tick-vs-real volume): only ratios,
z-scores and volume-weighted averages of scale-free quantities are.

Deliberate departures from common definitions, for train/serve parity and float32 precision:
- OBV is cumulative from the first bar, so its level depends on where the data starts. `obv_osc_n` is the
  change of OBV over the last n bars divided by the volume traded in them: sum(sign(dc) * v) / sum(v), in
  [-1, 1] (`natron.features.indicators.obv` stays TA-Lib's cumulative OBV).
- VWAP is a rolling VWAP of the typical price (h + l + c) / 3 over the last n bars ending at t (n = 96 is one
  day of 15-minute bars), not a session-anchored one: sessions differ by venue and a rolling window gives
  every row the same look-back. The distance is accumulated as sum(v * (tp - c[t])) / sum(v) from exact price
  differences, so that no float32 sum of price levels is formed (its rounding, ~1e-6 of the price, would be
  ~1e-3 ATR).
- Volume 0 (e.g. an FX feed without volume) gives ratio 1 and oscillators 0, never NaN/inf.
"""
from __future__ import annotations

import jax.numpy as jnp

from natron.features import indicators as ind
from natron.features import primitives as P
from natron.features.moving_averages import centred_window_sums
from natron.features.returns import finish, log_return

VWAP_WINDOWS = (20, 96)
VWAP_BLOCK = 4       # divides every VWAP window (see moving_averages.centred_window_sums)
CORR_WINDOW = 20

NAMES = ('vol_ratio_20', 'vol_ratio_50', 'vol_z_20', 'vol_trend_10_50', 'obv_osc_20', 'obv_osc_50', 'cmf_20',
         'vwap_dist_20_atr', 'vwap_dist_96_atr', 'force_index_13', 'absret_vol_corr_20')
WARMUP = max(VWAP_WINDOWS)


def obv_oscillator(c, v, n: int):
  """Windowed on-balance volume: sum(sign(c[t]-c[t-1]) * v) / sum(v) over n bars, in [-1, 1], [T]."""
  signed = jnp.sign(c - P.lag(c, 1)) * v
  return P.safe_div(P.rolling_sum(signed, n), P.rolling_sum(v, n))


def chaikin_money_flow(h, l, c, v, n: int):
  """Chaikin money flow: sum(clv * v) / sum(v) with clv = ((c-l) - (h-c)) / (h-l), in [-1, 1], [T]."""
  clv = P.safe_div((c - l) - (h - c), h - l)
  return P.safe_div(P.rolling_sum(clv * v, n), P.rolling_sum(v, n))


def vwap_distances(h, l, c, v, windows=VWAP_WINDOWS):
  """{n: c[t] - rolling VWAP_n[t]} in price units: -sum(v (tp - c[t])) / sum(v) over the last n bars, [T] each.

  tp[s] - c[t] = ((h[s] - c[s]) + (l[s] - c[s])) / 3 + (c[s] - c[t]): exact price differences (on the grid),
  so no typical-price LEVEL (h + l + c) / 3 is rounded (half an ulp of the price, ~1e-4 ATR).
  """
  wick = v * ((h - c) + (l - c)) / 3.0
  sums = centred_window_sums(c, c, windows, VWAP_BLOCK, w=v)
  return {n: -P.safe_div(P.rolling_sum(wick, n) + sums[n], P.rolling_sum(v, n)) for n in windows}


def rolling_corr(x, y, n: int):
  """Two-pass rolling Pearson correlation of x and y over n bars (0 when either is constant), [T]."""
  mx, my = P.rolling_mean(x, n), P.rolling_mean(y, n)

  def body(acc, lagged, _):
    dx, dy = lagged[0] - mx, lagged[1] - my
    return acc[0] + dx * dy, acc[1] + dx * dx, acc[2] + dy * dy

  zeros = jnp.zeros_like(x)
  sxy, sxx, syy = P.lag_fold((x, y), n, (zeros, zeros, zeros), body)
  return P.safe_div(sxy, jnp.sqrt(sxx * syy))


def compute(o, h, l, c, v, *, atr=None):
  """Returns (names, columns), each column float32 [T]; `atr` is ATR(14) of the bars if already known."""
  del o
  atr = ind.atr(h, l, c, 14) if atr is None else atr
  sma = {n: ind.sma(v, n) for n in (10, 20, 50)}
  cols = {'vol_ratio_20': P.safe_div(v, sma[20], 1.0), 'vol_ratio_50': P.safe_div(v, sma[50], 1.0)}
  mean, m2 = P.rolling_central_moments(v, 20, 2)
  cols['vol_z_20'] = P.safe_div(v - mean, jnp.sqrt(m2))
  cols['vol_trend_10_50'] = P.safe_div(sma[10], sma[50], 1.0)
  cols['obv_osc_20'] = obv_oscillator(c, v, 20)
  cols['obv_osc_50'] = obv_oscillator(c, v, 50)
  cols['cmf_20'] = chaikin_money_flow(h, l, c, v, 20)
  for n, dist in vwap_distances(h, l, c, v).items():
    cols[f'vwap_dist_{n}_atr'] = P.safe_div(dist, atr)
  # Force index: EMA(13) of price change x volume, in units of ATR x average volume.
  force = P.ema((c - P.lag(c, 1)) * v, 13, start=1)
  cols['force_index_13'] = P.safe_div(force, atr * sma[50])
  cols['absret_vol_corr_20'] = rolling_corr(jnp.abs(log_return(c, 1)), v, CORR_WINDOW)
  return finish(NAMES, cols)
