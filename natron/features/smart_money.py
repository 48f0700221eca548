"""Smart-money-concept features: confirmed swing highs/lows, break of structure (BOS), change of character
(CHoCH), the market-structure trend, fair value gaps and liquidity sweeps.

Causality is the point of this module:
- A swing high at bar s is a high strictly above the K highs on each side of it. It can only be known once
  the K bars to its right exist, so it is recorded at its CONFIRMATION bar t = s + K (`swing_high` = 1 at t),
  and its price becomes the "last swing high" from t on. Swing lows mirror this.
- A break fires on the bar whose CLOSE first crosses the last confirmed, not yet broken, swing: above the swing
  high (bullish) or below the swing low (bearish). Each swing is broken at most once.
- With the structure trend carried bar by bar (a `lax.scan`): a break in the direction of the trend (or the
  first break, when no trend is set yet) is a BOS; a break against it is a CHoCH, and flips the trend.
  +1 marks bullish events, -1 bearish. If one close breaks both swings at once (possible only when the last
  swing low lies above the last swing high) both are consumed and no event is reported.
- A liquidity sweep is a bar that trades through the live swing but closes back inside: -1 above a swing
  high (bearish), +1 below a swing low (bullish).
- A fair value gap is the three-bar imbalance low[t] > high[t-2] (bullish, > 0) or high[t] < low[t-2]
  (bearish, < 0), sized in ATR units.
The scan state (last swings, trend) depends on the start of the input only until the first two breaks after
it; the warm-up covers many.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from natron.features import indicators as ind
from natron.features import primitives as P
from natron.features.returns import finish

SWING_K = 3            # bars on each side of a swing (a 7-bar fractal)
SINCE_CAP = 200        # bars_since_break saturates here (and starts here: no break seen yet)

NAMES = ('swing_high', 'swing_low', 'dist_swing_high_atr', 'dist_swing_low_atr', 'bos', 'choch',
         'structure_trend', 'bars_since_break', 'fvg_atr', 'liquidity_sweep')
WARMUP = SINCE_CAP


def confirmed_swings(h, l, k: int = SWING_K):
  """Swing highs/lows of bar t-k, known at bar t: (high_flag, high_price, low_flag, low_price), each [T].

  high_flag[t] is True when h[t-k] > max(h[t-2k .. t-k-1]) and h[t-k] > max(h[t-k+1 .. t]).
  """
  center_h, center_l = P.lag(h, k), P.lag(l, k)
  right_h, right_l = P.rolling_max(h, k), P.rolling_min(l, k)
  left_h, left_l = P.lag(right_h, k + 1), P.lag(right_l, k + 1)
  is_high = (center_h > left_h) & (center_h > right_h)
  is_low = (center_l < left_l) & (center_l < right_l)
  return is_high, center_h, is_low, center_l


def market_structure(c, swing_high, high_price, swing_low, low_price):
  """Scans the bars for breaks of confirmed swings.

  Returns dict of [T] arrays: bos, choch (+1/-1/0), trend (+1/-1/0 after the bar), since (bars since the
  last break, capped), last_high / last_low (last confirmed swing prices, NaN before the first),
  high_live / low_live (the swing is not broken yet, as of the start of the bar).
  """
  nan = jnp.float32(jnp.nan)
  init = (nan, jnp.bool_(False), nan, jnp.bool_(False), jnp.float32(0.0), jnp.float32(SINCE_CAP))
  # float32 constants, not Python floats: the ONNX exporter (natron.export) binds jnp.where / jnp.minimum with
  # float64 scalars, which would change the scan carry's dtype.
  one, zero, cap = jnp.float32(1.0), jnp.float32(0.0), jnp.float32(SINCE_CAP)

  def step(state, x):
    sh, sh_live, sl, sl_live, trend, since = state
    close, new_h, price_h, new_l, price_l = x
    sh = jnp.where(new_h, price_h, sh)
    sh_live = new_h | sh_live
    sl = jnp.where(new_l, price_l, sl)
    sl_live = new_l | sl_live
    live = (sh, sh_live, sl, sl_live)
    up_break = sh_live & (close > sh)
    down_break = sl_live & (close < sl)
    bull = up_break & ~down_break
    bear = down_break & ~up_break
    bos = jnp.where(bull & (trend >= 0), one, zero) - jnp.where(bear & (trend <= 0), one, zero)
    choch = jnp.where(bull & (trend < 0), one, zero) - jnp.where(bear & (trend > 0), one, zero)
    trend = jnp.where(bull, one, jnp.where(bear, -one, trend))
    since = jnp.where(bull | bear, zero, jnp.minimum(since + one, cap))
    state = (sh, sh_live & ~up_break, sl, sl_live & ~down_break, trend, since)
    return state, (bos, choch, trend, since) + live

  xs = (c, swing_high, high_price, swing_low, low_price)
  _, out = lax.scan(step, init, xs)
  keys = ('bos', 'choch', 'trend', 'since', 'last_high', 'high_live', 'last_low', 'low_live')
  return dict(zip(keys, out))


def compute(o, h, l, c, v, *, atr=None):
  """Returns (names, columns), each column float32 [T]; `atr` is ATR(14) of the bars if already known."""
  del o, v
  atr = ind.atr(h, l, c, 14) if atr is None else atr
  is_high, price_h, is_low, price_l = confirmed_swings(h, l)
  ms = market_structure(c, is_high, price_h, is_low, price_l)
  valid = jnp.arange(c.shape[0]) >= 2 * SWING_K
  flag = lambda b: jnp.where(valid, b.astype(jnp.float32), jnp.nan)
  cols = {'swing_high': flag(is_high), 'swing_low': flag(is_low),
          'dist_swing_high_atr': P.safe_div(ms['last_high'] - c, atr),
          'dist_swing_low_atr': P.safe_div(c - ms['last_low'], atr),
          'bos': ms['bos'], 'choch': ms['choch'], 'structure_trend': ms['trend'],
          'bars_since_break': ms['since'] / SINCE_CAP}
  prev2_h, prev2_l = P.lag(h, 2), P.lag(l, 2)
  bull_gap = jnp.maximum(l - prev2_h, 0.0)
  bear_gap = jnp.maximum(prev2_l - h, 0.0)
  cols['fvg_atr'] = P.safe_div(bull_gap - bear_gap, atr)
  swept_high = ms['high_live'] & (h > ms['last_high']) & (c <= ms['last_high'])
  swept_low = ms['low_live'] & (l < ms['last_low']) & (c >= ms['last_low'])
  cols['liquidity_sweep'] = swept_low.astype(jnp.float32) - swept_high.astype(jnp.float32)
  return finish(NAMES, cols)
