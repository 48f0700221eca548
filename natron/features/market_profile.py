"""Rolling volume-profile (market profile) features over the last W bars ending at t.

For each bar t the window t-W+1..t is split into B equal price bins spanning [lowest low, highest high] of
the window (so the grid is scale-free and moves with the market). Each bar's volume is spread uniformly over
its own [low, high] range (a zero-range bar puts it all at its price), giving a volume histogram p[t, :]
with sum 1 (uniform when the window traded no volume). From it:
- POC: centre of the most traded bin (the first on ties);
- value area: starting at the POC bin, repeatedly add the heavier neighbouring bin (above on ties) until it
  holds >= 70% of the volume; VAL / VAH are its lower / upper edges;
- volume entropy -sum p log p / log B in [0, 1] (1 = volume spread evenly over the range);
- the share of the window's volume traded below the current close (linear inside the close's bin).
Levels are reported relative to the close in ATR(14) units.

Vectorised over time without a Python loop over bars: the rows are processed in chunks of `CHUNK` bars by
`lax.map`; inside a chunk a loop over the W lags accumulates the volume below every bin edge into a
[B-1, CHUNK] block that stays in cache: O(T * W * B) flops, no [T, W] or [T, B] traffic per lag.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax

from natron.features import indicators as ind
from natron.features import primitives as P
from natron.features.returns import finish

WINDOW = 96            # one day of 15-minute bars
BINS = 16
VALUE_AREA = 0.70
POC_SHIFT_LAG = 24
CHUNK = 1024

NAMES = ('poc_dist_atr', 'vah_dist_atr', 'val_dist_atr', 'va_width_atr', 'va_position', 'in_value_area',
         'volume_entropy', 'poc_share', 'volume_below_close', 'poc_shift_atr', 'profile_range_atr')
WARMUP = WINDOW + POC_SHIFT_LAG


def volume_histogram(h, l, v, window: int = WINDOW, bins: int = BINS, chunk: int = CHUNK):
  """Rolling volume profile: (p [T, bins] volume shares, lo [T], width [T]) over bars t-window+1..t.

  Bin b covers [lo + b * width, lo + (b + 1) * width). Rows t < window - 1 are NaN.
  """
  h, l, v = (jnp.asarray(x, jnp.float32) for x in (h, l, v))
  t_len = h.shape[0]
  hi = P.rolling_max(h, window)
  lo = P.rolling_min(l, window)
  # A flat window (hi == lo) gets a tiny price-proportional width so every division stays finite.
  width = jnp.maximum((hi - lo) / bins, 1e-7 * jnp.abs(hi))
  chunk = min(chunk, t_len)          # a serving window is one chunk, with no padded rows
  n_chunks = -(-t_len // chunk)
  t_pad = n_chunks * chunk
  # Bars are rescaled into each row's bin grid inside the loop. Lead with window-1 zero-volume copies of the
  # first bar; trail to whole chunks.
  pad = lambda x, front, back: jnp.concatenate(
      [jnp.full((window - 1,), front, x.dtype), x, jnp.full((t_pad - t_len,), back, x.dtype)])
  hp, lp, vp = pad(h, h[0], h[-1]), pad(l, l[0], l[-1]), pad(v, 0.0, 0.0)
  row_pad = lambda x, fill: jnp.concatenate([jnp.nan_to_num(x, nan=fill), jnp.full((t_pad - t_len,), fill)])
  lo_p, width_p = row_pad(lo, 0.0), row_pad(width, 1.0)
  edges = jnp.arange(1, bins, dtype=jnp.float32)[:, None]                    # interior edges, in bins

  def one_chunk(i):
    start = i * chunk
    seg = lambda x: lax.dynamic_slice(x, (start,), (chunk + window - 1,))
    hc, lc, vc = seg(hp), seg(lp), seg(vp)
    row_lo = lax.dynamic_slice(lo_p, (start,), (chunk,))
    row_w = lax.dynamic_slice(width_p, (start,), (chunk,))

    def add_lag(j, below):
      # Lag k = window-1-j: the bars t-k for the chunk's rows t, as [chunk] slices.
      hk, lk, vk = (lax.dynamic_slice(x, (j,), (chunk,)) for x in (hc, lc, vc))
      a = (lk - row_lo) / row_w                                              # bar low, in bins
      inv = 1.0 / jnp.maximum((hk - lk) / row_w, 1e-3)                      # 1 / bar range, in bins
      # Volume below edge e: v * clip((e - a) / range, 0, 1), for every interior edge at once.
      return below + vk[None, :] * jnp.clip(edges * inv[None, :] - (a * inv)[None, :], 0.0, 1.0)

    below = lax.fori_loop(0, window, add_lag, jnp.zeros((bins - 1, chunk), jnp.float32))
    total = lax.fori_loop(0, window, lambda j, s: s + lax.dynamic_slice(vc, (j,), (chunk,)),
                          jnp.zeros((chunk,), jnp.float32))
    cdf = jnp.concatenate([jnp.zeros_like(total)[None], below, total[None]], axis=0)   # [bins+1, chunk]
    hist = jnp.maximum(jnp.diff(cdf, axis=0), 0.0)
    norm = jnp.sum(hist, axis=0, keepdims=True)
    p = jnp.where(norm > 0, hist / jnp.where(norm > 0, norm, 1.0), 1.0 / bins)
    return p.T                                                               # [chunk, bins]

  p = lax.map(one_chunk, jnp.arange(n_chunks)).reshape(t_pad, bins)[:t_len]
  p = jnp.where((jnp.arange(t_len) < window - 1)[:, None], jnp.nan, p)
  return p, lo, width


def value_area(p, share: float = VALUE_AREA):
  """POC bin and value-area bin bounds (inclusive) of histograms p [T, B]: (poc, lo_bin, hi_bin), int32 [T]."""
  bins = p.shape[1]
  poc = jnp.argmax(jnp.nan_to_num(p, nan=0.0), axis=1).astype(jnp.int32)
  take = lambda idx: jnp.take_along_axis(p, jnp.clip(idx, 0, bins - 1)[:, None], axis=1)[:, 0]

  def step(_, state):
    lo_b, hi_b, acc = state
    up = jnp.where(hi_b < bins - 1, take(hi_b + 1), -1.0)
    down = jnp.where(lo_b > 0, take(lo_b - 1), -1.0)
    grow = acc < share
    go_up = grow & (up >= down)
    go_down = grow & ~go_up
    acc = acc + jnp.where(go_up, up, jnp.where(go_down, down, 0.0))
    return lo_b - go_down.astype(jnp.int32), hi_b + go_up.astype(jnp.int32), acc

  lo_b, hi_b, _ = lax.fori_loop(0, bins - 1, step, (poc, poc, take(poc)))
  return poc, lo_b, hi_b


def entropy(p):
  """Normalised Shannon entropy of each row of p [T, B], in [0, 1], [T]."""
  plogp = jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
  return -jnp.sum(plogp, axis=1) / math.log(p.shape[1])


def share_below(p, position):
  """Share of the histogram below a price at `position` bins from the grid's low (clipped to [0, B]), [T]."""
  bins = p.shape[1]
  u = jnp.clip(position, 0.0, float(bins))
  k = jnp.minimum(jnp.floor(u), bins - 1).astype(jnp.int32)
  cdf = jnp.cumsum(p, axis=1) - p                                  # volume strictly below each bin
  at = lambda x: jnp.take_along_axis(x, k[:, None], axis=1)[:, 0]
  return at(cdf) + (u - k) * at(p)


def compute(o, h, l, c, v, *, atr=None):
  """Returns (names, columns), each column float32 [T]; `atr` is ATR(14) of the bars if already known."""
  del o
  atr = ind.atr(h, l, c, 14) if atr is None else atr
  p, lo, width = volume_histogram(h, l, v)
  poc, va_lo, va_hi = value_area(p)
  rel_lo = lo - c                                 # grid low relative to the close (exact difference)
  level = lambda b: rel_lo + b.astype(jnp.float32) * width        # a bin edge, relative to the close
  poc_rel = level(poc) + 0.5 * width
  vah_rel, val_rel = level(va_hi + 1), level(va_lo)
  in_atr = lambda x: P.safe_div(x, atr)
  cols = {'poc_dist_atr': in_atr(-poc_rel), 'vah_dist_atr': in_atr(vah_rel), 'val_dist_atr': in_atr(-val_rel),
          'va_width_atr': in_atr(vah_rel - val_rel),
          'va_position': P.safe_div(-val_rel, vah_rel - val_rel, 0.5)}
  cols['in_value_area'] = jnp.where(jnp.isnan(rel_lo), jnp.nan,
                                    ((val_rel <= 0) & (vah_rel >= 0)).astype(jnp.float32))
  cols['volume_entropy'] = entropy(p)
  cols['poc_share'] = jnp.max(p, axis=1)
  cols['volume_below_close'] = share_below(p, -rel_lo / width)
  # POC[t] - POC[t-k] = (poc_rel[t] - poc_rel[t-k]) + (c[t] - c[t-k]), without forming price levels.
  shift = (poc_rel - P.lag(poc_rel, POC_SHIFT_LAG)) + (c - P.lag(c, POC_SHIFT_LAG))
  cols['poc_shift_atr'] = in_atr(shift)
  cols['profile_range_atr'] = in_atr(width * BINS)
  return finish(NAMES, cols)
