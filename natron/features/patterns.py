"""Candlestick features: bar anatomy as fractions of the bar's range or in ATR units, and classic patterns.

Patterns are shape-only (no trend context is required, the model sees the trend in other features):
- doji: |body| <= 10% of the range;
- hammer: small body (<= 35% of range), lower wick >= 60% of range, upper wick <= 10% (shooting star mirrored);
- engulfing: +1 when a bullish body engulfs the previous bearish body (open <= prev close, close >= prev open,
  larger body), -1 mirrored;
- inside / outside bar: range strictly inside / strictly beyond the previous bar's range;
- three soldiers / crows: +1 for three consecutive bullish bars with rising closes and bodies >= 50% of their
  range, -1 mirrored.
A bar with zero range (high == low) has zero body and wicks and is no pattern.

Prices arrive in points (exact float32 integers, see `natron.features`), so bodies, wicks and ranges are exact
integers and every threshold is tested in integers: `10 |body| <= range` rather than `|body| <= 0.1 range`
(0.1 is not a float32 number, so a body of exactly 10% could fall on either side). A doji is exactly a bar
whose body is at most a tenth of its range, e.g. every bar with open == close and a range.
"""
from __future__ import annotations

import jax.numpy as jnp

from natron.features import indicators as ind
from natron.features import primitives as P
from natron.features.returns import finish

NAMES = ('body_range', 'upper_wick_range', 'lower_wick_range', 'clv', 'body_atr', 'gap_atr', 'doji', 'hammer',
         'shooting_star', 'engulfing', 'inside_bar', 'outside_bar', 'three_soldiers_crows')
WARMUP = 14


def _flag(cond, valid):
  """1.0 / 0.0 flag, NaN where the inputs it needs are missing."""
  return jnp.where(valid, cond.astype(jnp.float32), jnp.nan)


def compute(o, h, l, c, v, *, atr=None):
  """Returns (names, columns), each column float32 [T]; `atr` is ATR(14) of the bars if already known."""
  del v
  atr = ind.atr(h, l, c, 14) if atr is None else atr
  rng = h - l
  body = c - o
  abs_body = jnp.abs(body)
  upper = h - jnp.maximum(o, c)
  lower = jnp.minimum(o, c) - l
  frac = lambda x: P.safe_div(x, rng)
  cols = {'body_range': frac(body), 'upper_wick_range': frac(upper), 'lower_wick_range': frac(lower),
          'clv': frac((c - l) - (h - c))}
  cols['body_atr'] = P.safe_div(body, atr)
  prev_c, prev_o, prev_h, prev_l = (P.lag(x, 1) for x in (c, o, h, l))
  cols['gap_atr'] = P.safe_div(o - prev_c, atr)
  has_range = rng > 0
  always = jnp.ones_like(c, bool)
  has_prev = ~jnp.isnan(prev_c)
  # Integer forms of the fractions (products of integers below 2**24 / 20 are exact in float32).
  cols['doji'] = _flag(has_range & (10.0 * abs_body <= rng), always)
  small_body = has_range & (20.0 * abs_body <= 7.0 * rng)                    # <= 35%
  long_lower, long_upper = 5.0 * lower >= 3.0 * rng, 5.0 * upper >= 3.0 * rng  # >= 60%
  short_lower, short_upper = 10.0 * lower <= rng, 10.0 * upper <= rng        # <= 10%
  cols['hammer'] = _flag(small_body & long_lower & short_upper, always)
  cols['shooting_star'] = _flag(small_body & long_upper & short_lower, always)
  prev_body = prev_c - prev_o
  bigger = abs_body > jnp.abs(prev_body)
  bull = (prev_body < 0) & (body > 0) & (o <= prev_c) & (c >= prev_o) & bigger
  bear = (prev_body > 0) & (body < 0) & (o >= prev_c) & (c <= prev_o) & bigger
  cols['engulfing'] = jnp.where(has_prev, bull.astype(jnp.float32) - bear.astype(jnp.float32), jnp.nan)
  cols['inside_bar'] = _flag((h < prev_h) & (l > prev_l), has_prev)
  cols['outside_bar'] = _flag((h > prev_h) & (l < prev_l), has_prev)
  strong = has_range & (2.0 * abs_body >= rng)
  up = strong & (body > 0) & (c > prev_c)
  down = strong & (body < 0) & (c < prev_c)
  soldiers = up & (P.lag(up.astype(jnp.float32), 1) > 0) & (P.lag(up.astype(jnp.float32), 2) > 0)
  crows = down & (P.lag(down.astype(jnp.float32), 1) > 0) & (P.lag(down.astype(jnp.float32), 2) > 0)
  valid3 = jnp.arange(c.shape[0]) >= 3
  cols['three_soldiers_crows'] = jnp.where(
      valid3, soldiers.astype(jnp.float32) - crows.astype(jnp.float32), jnp.nan)
  return finish(NAMES, cols)
