"""Volatility features: ATR-based ratios, Bollinger/Keltner/Donchian positions and widths, realised volatility
of log returns and range-based estimators (Parkinson, Garman-Klass, Rogers-Satchell), volatility regimes.

Realised volatilities are per-bar standard deviations of log returns (not annualised), so they compare
across instruments. Keltner here is the EMA(20) +/- 2 ATR(10) variant (Chester Keltner's original used an SMA
of the typical price and the average bar range); Bollinger bands are TA-Lib's (population std, 2 sigma).
"""
from __future__ import annotations

import jax.numpy as jnp

from natron.features import indicators as ind
from natron.features import primitives as P
from natron.features.moving_averages import ema_deviation, sma_deviations
from natron.features.returns import finish, log_ratio, log_return, returns_var

RVOL_WINDOWS = (10, 20, 50, 100)
RANGE_WINDOW = 20

NAMES = (('natr_14', 'atr_ratio_7_28', 'log_atr_rel_100', 'tr_atr', 'bb_width_20', 'bb_pctb_20')
         + tuple(f'rvol_{n}' for n in RVOL_WINDOWS)
         + ('vol_ratio_10_50', 'vol_ratio_20_100', 'parkinson_20', 'garman_klass_20', 'rogers_satchell_20',
            'keltner_pos_20', 'donchian_width_20_atr', 'donchian_pos_20'))
WARMUP = 14 + 100   # SMA(100) of ATR(14)


def true_range(h, l, c):
  """TA-Lib TRANGE: max(h, c[t-1]) - min(l, c[t-1]) (NaN at t = 0), [T]."""
  prev_c = P.lag(c, 1)
  return jnp.maximum(h, prev_c) - jnp.minimum(l, prev_c)


def parkinson(h, l, n: int):
  """Parkinson range volatility per bar: sqrt(mean(ln(h/l)^2) / (4 ln 2)), [T]."""
  hl = log_ratio(h, l)
  return jnp.sqrt(P.rolling_mean(hl * hl, n) / (4.0 * jnp.log(2.0)))


def garman_klass(o, h, l, c, n: int):
  """Garman-Klass volatility per bar: sqrt(mean(0.5 ln(h/l)^2 - (2 ln 2 - 1) ln(c/o)^2)), [T]."""
  hl, co = log_ratio(h, l), log_ratio(c, o)
  term = 0.5 * hl * hl - (2.0 * jnp.log(2.0) - 1.0) * co * co
  return jnp.sqrt(jnp.maximum(P.rolling_mean(term, n), 0.0))


def rogers_satchell(o, h, l, c, n: int):
  """Rogers-Satchell (drift-independent) volatility per bar, [T]."""
  term = log_ratio(h, c) * log_ratio(h, o) + log_ratio(l, c) * log_ratio(l, o)
  return jnp.sqrt(jnp.maximum(P.rolling_mean(term, n), 0.0))


def compute(o, h, l, c, v, *, atr=None):
  """Returns (names, columns), each column float32 [T]; `atr` is ATR(14) of the bars if already known."""
  del v
  atr = ind.atr(h, l, c, 14) if atr is None else atr
  cols = {'natr_14': atr / c,            # TA-Lib NATR / 100, without a second ATR pass
          'atr_ratio_7_28': P.safe_div(ind.atr(h, l, c, 7), ind.atr(h, l, c, 28), 1.0)}
  # Level of ATR against its own 100-bar mean: > 0 when volatility is expanding.
  # (Floored: a long flat stretch can decay ATR to exactly 0 in float32.)
  cols['log_atr_rel_100'] = jnp.log(jnp.maximum(P.safe_div(atr, P.rolling_mean(atr, 100), 1.0), 1e-3))
  cols['tr_atr'] = P.safe_div(true_range(h, l, c), atr)
  # Bollinger(20, 2): width 4 std / SMA and %b = (c - SMA + 2 std) / (4 std), with c - SMA from exact price
  # differences (see moving_averages.sma_deviations) and the two-pass population std.
  std = P.rolling_std(c, 20)
  dev20 = sma_deviations(c, (20,))[20]
  cols['bb_width_20'] = P.safe_div(4.0 * std, c - dev20)
  cols['bb_pctb_20'] = P.safe_div(dev20 + 2.0 * std, 4.0 * std, 0.5)
  r1 = log_return(c, 1)
  rvol = {n: jnp.sqrt(returns_var(r1, n)) for n in RVOL_WINDOWS}
  cols.update({f'rvol_{n}': rvol[n] for n in RVOL_WINDOWS})
  cols['vol_ratio_10_50'] = P.safe_div(rvol[10], rvol[50], 1.0)
  cols['vol_ratio_20_100'] = P.safe_div(rvol[20], rvol[100], 1.0)
  cols['parkinson_20'] = parkinson(h, l, RANGE_WINDOW)
  cols['garman_klass_20'] = garman_klass(o, h, l, c, RANGE_WINDOW)
  cols['rogers_satchell_20'] = rogers_satchell(o, h, l, c, RANGE_WINDOW)
  # Position of the close inside the Keltner channel EMA(20) +/- 2 ATR(10): -1 / +1 at the bands.
  cols['keltner_pos_20'] = P.safe_div(ema_deviation(c, 20), 2.0 * ind.atr(h, l, c, 10))
  hi, lo = P.rolling_max(h, RANGE_WINDOW), P.rolling_min(l, RANGE_WINDOW)
  cols['donchian_width_20_atr'] = P.safe_div(hi - lo, atr)
  cols['donchian_pos_20'] = P.safe_div(c - lo, hi - lo, 0.5)
  return finish(NAMES, cols)
