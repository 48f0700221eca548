"""Support / resistance features: distance of the close to rolling highs and lows (ATR units), position in the
100-bar range, and distances to floor-trader pivot levels of the previous day.

The pivot "day" is the rolling window of the 96 bars before t (one day of 15-minute bars), not a calendar
session: P = (H + L + C) / 3 with H, L the high and low of bars t-96..t-1 and C = c[t-1]; R1 = 2P - L,
S1 = 2P - H. A rolling window gives every row the same look-back regardless of venue hours.
"""
from __future__ import annotations

from natron.features import indicators as ind
from natron.features import primitives as P
from natron.features.returns import finish

LEVEL_WINDOWS = (20, 50, 200)
RANGE_WINDOW = 100
PIVOT_WINDOW = 96

NAMES = (tuple(f'dist_high_{n}_atr' for n in LEVEL_WINDOWS) + tuple(f'dist_low_{n}_atr' for n in LEVEL_WINDOWS)
         + ('range_pos_100', 'pivot_dist_atr', 'pivot_r1_dist_atr', 'pivot_s1_dist_atr'))
WARMUP = max(max(LEVEL_WINDOWS), PIVOT_WINDOW + 1)


def compute(o, h, l, c, v, *, atr=None):
  """Returns (names, columns), each column float32 [T]; `atr` is ATR(14) of the bars if already known."""
  del o, v
  atr = ind.atr(h, l, c, 14) if atr is None else atr
  in_atr = lambda x: P.safe_div(x, atr)
  cols = {f'dist_high_{n}_atr': in_atr(P.rolling_max(h, n) - c) for n in LEVEL_WINDOWS}
  cols.update({f'dist_low_{n}_atr': in_atr(c - P.rolling_min(l, n)) for n in LEVEL_WINDOWS})
  hi, lo = P.rolling_max(h, RANGE_WINDOW), P.rolling_min(l, RANGE_WINDOW)
  cols['range_pos_100'] = P.safe_div(c - lo, hi - lo, 0.5)
  # Levels relative to the close (differences of nearby prices are exact in float32): with dh = H - c,
  # dl = L - c, dc = C - c, P - c = (dh + dl + dc) / 3, R1 - c = (2 dh - dl + 2 dc) / 3, S1 - c likewise.
  dh = P.lag(P.rolling_max(h, PIVOT_WINDOW), 1) - c
  dl = P.lag(P.rolling_min(l, PIVOT_WINDOW), 1) - c
  dc = P.lag(c, 1) - c
  cols['pivot_dist_atr'] = in_atr(-(dh + dl + dc) / 3.0)
  cols['pivot_r1_dist_atr'] = in_atr((2.0 * dh - dl + 2.0 * dc) / 3.0)
  cols['pivot_s1_dist_atr'] = in_atr(-(2.0 * dl - dh + 2.0 * dc) / 3.0)
  return finish(NAMES, cols)
