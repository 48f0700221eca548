"""Momentum features: bounded oscillators (RSI, stochastics, Williams %R, CCI, MFI, TSI, ultimate oscillator),
rates of change, and MACD in ATR units.

Oscillators reported by TA-Lib on a 0..100 scale are divided by 100 (ROC becomes a fraction), so every
feature is O(1); MACD is a difference of price EMAs and is divided by ATR(14) to be scale-free.
"""
from __future__ import annotations

import jax.numpy as jnp

from natron.features import indicators as ind
from natron.features import primitives as P
from natron.features.returns import finish

RSI_PERIODS = (7, 14, 28)
TSI_LONG, TSI_SHORT = 25, 13
UO_PERIODS = (7, 14, 28)

NAMES = (tuple(f'rsi_{n}' for n in RSI_PERIODS)
         + ('stoch_k', 'stoch_d', 'stochrsi_14', 'willr_14', 'cci_20', 'mfi_14', 'roc_10', 'roc_20',
            'macd_atr', 'macd_signal_atr', 'macd_hist_atr', 'tsi_25_13', 'ultosc_7_14_28', 'mom_10_atr'))
WARMUP = 1 + TSI_LONG + TSI_SHORT   # the longest chain (MACD: 33, TSI: 38, ultimate oscillator: 28)


def tsi(c, long: int = TSI_LONG, short: int = TSI_SHORT):
  """True strength index in [-1, 1]: double-EMA-smoothed momentum over double-smoothed |momentum|, [T]."""
  m = c - P.lag(c, 1)
  smooth = lambda x: P.ema(P.ema(x, long, start=1), short, start=long)
  return P.safe_div(smooth(m), smooth(jnp.abs(m)))


def ultimate_oscillator(h, l, c, periods=UO_PERIODS):
  """Williams' ultimate oscillator in [0, 1] (TA-Lib ULTOSC / 100), [T]."""
  prev_c = P.lag(c, 1)
  low = jnp.minimum(l, prev_c)
  buying = c - low
  true_range = jnp.maximum(h, prev_c) - low
  avg = [P.safe_div(P.rolling_sum(buying, n), P.rolling_sum(true_range, n), 0.5) for n in periods]
  return (4.0 * avg[0] + 2.0 * avg[1] + avg[2]) / 7.0


def stoch_rsi(r, n: int = 14):
  """Stochastic over n bars of an RSI series r [T], in [0, 1] (0.5 when RSI did not move), [T]."""
  lo, hi = P.rolling_min(r, n), P.rolling_max(r, n)
  return P.safe_div(r - lo, hi - lo, 0.5)


def compute(o, h, l, c, v, *, atr=None):
  """Returns (names, columns), each column float32 [T]; `atr` is ATR(14) of the bars if already known."""
  del o
  atr = ind.atr(h, l, c, 14) if atr is None else atr
  rsi = {n: ind.rsi(c, n) for n in RSI_PERIODS}
  cols = {f'rsi_{n}': rsi[n] / 100.0 for n in RSI_PERIODS}
  slowk, slowd = ind.stoch(h, l, c)
  cols['stoch_k'] = slowk / 100.0
  cols['stoch_d'] = slowd / 100.0
  cols['stochrsi_14'] = stoch_rsi(rsi[14], 14)
  cols['willr_14'] = ind.willr(h, l, c, 14) / 100.0
  cols['cci_20'] = ind.cci(h, l, c, 20) / 100.0
  cols['mfi_14'] = ind.mfi(h, l, c, v, 14) / 100.0
  cols['roc_10'] = ind.roc(c, 10) / 100.0
  cols['roc_20'] = ind.roc(c, 20) / 100.0
  macd, signal, hist = ind.macd(c)
  cols['macd_atr'] = P.safe_div(macd, atr)
  cols['macd_signal_atr'] = P.safe_div(signal, atr)
  cols['macd_hist_atr'] = P.safe_div(hist, atr)
  cols['tsi_25_13'] = tsi(c)
  cols['ultosc_7_14_28'] = ultimate_oscillator(h, l, c)
  cols['mom_10_atr'] = P.safe_div(c - P.lag(c, 10), atr)
  return finish(NAMES, cols)
