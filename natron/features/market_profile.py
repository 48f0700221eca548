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

Vectorised over time without a Python loop over bars: the volume below every interior bin edge, [B-1, T], is
one fused elementwise kernel that sums the W lagged bars' contributions in registers (the lags are static
offset reads of the bar series): O(T * W * B) flops, no [T, W] matrix and no per-lag pass over memory.
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
CHUNK = 1024           # rows per block of the profile loop: the [BINS-1, CHUNK] block stays in L2

NAMES = ('poc_dist_atr', 'vah_dist_atr', 'val_dist_atr', 'va_width_atr', 'va_position', 'in_value_area',
         'volume_entropy', 'poc_share', 'volume_below_close', 'poc_shift_atr', 'profile_range_atr')
WARMUP = WINDOW + POC_SHIFT_LAG


def _cdf_rows(lo, row_w, l, inv, v, window: int, bins: int):
  """Volume below every interior edge for a block of rows: [B-1, R].

  lo, row_w [R] are each row's grid low and bin width; l, inv, v [R+window-1]
  are the bars (low, 1 / range, volume) from window-1 bars before the first row to the last row. A loop over
  the W lags adds each lagged bar's volume below every edge into the [B-1, R] block (one vectorised kernel
  per lag, with no division in it).
  """
  rows = lo.shape[0]
  # Interior edges above the row's grid low, [B-1, R]: e * width is exact on a quote grid (prices in points:
  # width = (hi - lo) / bins is an integer over a power of two), computed once per block.
  edge_levels = jnp.arange(1, bins, dtype=jnp.float32)[:, None] * row_w[None, :]

  def add_lag(j, below):
    # Lag k = window-1-j: the bars t-k for the block's rows t, as [R] slices.
    lk, ik, vk = (lax.dynamic_slice(x, (j,), (rows,)) for x in (l, inv, v))
    # Volume of bar s below edge e: v * clip((lo + e * width - low) / range, 0, 1). The difference
    # e * width - (low - lo) is exact on the grid, so a bar starting exactly on an edge puts nothing below it
    # and a zero-range bar (steep ramp) goes wholly to the bin its price lies in, as the definition says;
    # per element a subtract, a multiply and the clip.
    return below + vk * jnp.clip((edge_levels - (lk - lo)) * ik, 0.0, 1.0)

  return P.fori(window, add_lag, jnp.zeros((bins - 1, rows), jnp.float32), unroll=False)


def volume_histogram(h, l, v, window: int = WINDOW, bins: int = BINS, chunk: int | None = None):
  """Rolling volume profile: (p [T, bins] volume shares, lo [T], width [T]) over bars t-window+1..t.

  Bin b covers [lo + b * width, lo + (b + 1) * width). Rows t < window - 1 are NaN. `chunk` (static) bounds
  the working set to [bins-1, chunk] rows at a time (`lax.map` over row blocks).
  """
  p, lo, width = _histogram(h, l, v, window, bins, chunk)
  return p.T, lo, width


def _histogram(h, l, v, window: int, bins: int, chunk: int | None):
  """volume_histogram with the bins first: (p [bins, T], lo [T], width [T]).

  `chunk` None uses CHUNK rows (split into equal blocks, so at most a few rows are padded).
  """
  h, l, v = (jnp.asarray(x, jnp.float32) for x in (h, l, v))
  t_len = h.shape[0]
  hi = P.rolling_max(h, window)
  lo = P.rolling_min(l, window)
  # A flat window (hi == lo) gets a tiny price-proportional width so every division stays finite.
  width = jnp.maximum((hi - lo) / bins, 1e-7 * jnp.abs(hi))
  # 1 / bar range, per bar (not per row and lag: no division in the inner loop). A zero-range bar gets the
  # range 1e-10 of its price (a real range is at least one point, >= 6e-8 of a price below 2**24 points): all
  # its volume at its price (a bin edge exactly at its price counts it in the bin above, the bins being
  # half-open), with every product finite at any price scale.
  inv = 1.0 / jnp.maximum(h - l, 1e-10 * h)
  n_chunks = -(-t_len // (CHUNK if chunk is None else chunk))
  chunk = -(-t_len // n_chunks)      # balanced blocks: at most n_chunks - 1 padded rows
  t_pad = n_chunks * chunk
  # Lead with window-1 zero-volume copies of the first bar; trail to whole chunks.
  pad = lambda x, front, back: jnp.concatenate(
      [jnp.full((window - 1,), front, x.dtype), x, jnp.full((t_pad - t_len,), back, x.dtype)])
  lp, ip, vp = pad(l, l[0], l[-1]), pad(inv, 0.0, 0.0), pad(v, 0.0, 0.0)
  row_pad = lambda x: jnp.concatenate([x, jnp.full((t_pad - t_len,), jnp.nan, x.dtype)])
  lo_p, width_p = row_pad(lo), row_pad(width)
  if n_chunks == 1:
    below = _cdf_rows(lo_p, width_p, lp, ip, vp, window, bins)
  else:
    def one_chunk(i):
      start = i * chunk
      bars = [lax.dynamic_slice(x, (start,), (chunk + window - 1,)) for x in (lp, ip, vp)]
      row_lo, row_w = (lax.dynamic_slice(x, (start,), (chunk,)) for x in (lo_p, width_p))
      return _cdf_rows(row_lo, row_w, *bars, window, bins)

    below = jnp.moveaxis(lax.map(one_chunk, jnp.arange(n_chunks)), 0, 1).reshape(bins - 1, t_pad)
  below = below[:, :t_len]
  total = P.rolling_sum(v, window)
  cdf = jnp.concatenate([jnp.zeros_like(total)[None], below, total[None]], axis=0)   # [bins+1, T]
  hist = jnp.maximum(jnp.diff(cdf, axis=0), 0.0)
  norm = _rows_sum(list(hist))[None]       # not a leading-axis reduction (slow on XLA CPU)
  p = jnp.where(norm > 0, hist / jnp.where(norm > 0, norm, 1.0), 1.0 / bins)
  p = jnp.where((jnp.arange(t_len) < window - 1)[None, :], jnp.nan, p)
  return p, lo, width


def value_area(p, share: float = VALUE_AREA):
  """POC bin and value-area bin bounds (inclusive) of histograms p [T, B]: (poc, lo_bin, hi_bin), int32 [T]."""
  return _value_area(jnp.asarray(p).T, share)


def _rows_sum(rows):
  """Elementwise sum of a sequence of [T] rows (one fused kernel; XLA CPU reduces a leading axis slowly)."""
  total = rows[0]
  for r in rows[1:]:
    total = total + r
  return total


def _pick(p, idx):
  """p[idx[t], t] of p [B, T] as a B-way select (vectorises, where a gather does not), [T]."""
  return _rows_sum([jnp.where(idx == b, p[b], 0.0) for b in range(p.shape[0])])


def _argmax(p):
  """First index of the maximum of each column of p [B, T] (NaN columns give 0), int32 [T]."""
  best, idx = p[0], jnp.zeros(p.shape[1], jnp.int32)
  for b in range(1, p.shape[0]):
    better = p[b] > best
    best, idx = jnp.where(better, p[b], best), jnp.where(better, b, idx)
  return idx


def _value_area(p, share: float = VALUE_AREA):
  """value_area of histograms with the bins first, p [B, T].

  The heavier-neighbour expansion keeps the two candidate neighbours' shares in its state, so each step
  looks up one bin (the new neighbour on the side it grew), not two.
  """
  bins = p.shape[0]
  poc = _argmax(p)
  neighbour = lambda idx, ok: jnp.where(ok, _pick(p, idx), -1.0)     # -1: no bin on that side

  def step(_, state):
    lo_b, hi_b, acc, up, down = state
    grow = acc < share
    go_up = grow & (up >= down)
    go_down = grow & ~go_up
    acc = acc + jnp.where(go_up, up, jnp.where(go_down, down, 0.0))
    lo_b, hi_b = lo_b - go_down.astype(jnp.int32), hi_b + go_up.astype(jnp.int32)
    # The bool select as logic (ONNX Runtime has no Where kernel for bool tensors; same values).
    in_range = (go_up & (hi_b < bins - 1)) | (~go_up & (lo_b > 0))
    nxt = neighbour(jnp.where(go_up, hi_b + 1, lo_b - 1), in_range)
    return lo_b, hi_b, acc, jnp.where(go_up, nxt, up), jnp.where(go_down, nxt, down)

  init = (poc, poc, _pick(p, poc), neighbour(poc + 1, poc < bins - 1), neighbour(poc - 1, poc > 0))
  lo_b, hi_b, *_ = P.fori(bins - 1, step, init, unroll=False)
  return poc, lo_b, hi_b


def entropy(p):
  """Normalised Shannon entropy of each histogram p [B, T] (bins first), in [0, 1], [T]."""
  plogp = jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
  return -_rows_sum(list(plogp)) / math.log(p.shape[0])


def share_below(p, position):
  """Share of histograms p [B, T] (bins first) below a price at `position` bins from the grid's low (clipped
  to [0, B]), [T]."""
  bins = p.shape[0]
  u = jnp.clip(position, 0.0, float(bins))
  k = jnp.minimum(jnp.floor(u), bins - 1).astype(jnp.int32)
  below = _rows_sum([jnp.where(k > b, p[b], 0.0) for b in range(bins)])   # bins strictly below bin k
  return below + (u - k) * _pick(p, k)


def compute(o, h, l, c, v, *, atr=None):
  """Returns (names, columns), each column float32 [T]; `atr` is ATR(14) of the bars if already known."""
  del o
  atr = ind.atr(h, l, c, 14) if atr is None else atr
  p, lo, width = _histogram(h, l, v, WINDOW, BINS, None)     # [B, T]
  poc, va_lo, va_hi = _value_area(p)
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
  cols['poc_share'] = _pick(p, poc)
  cols['volume_below_close'] = share_below(p, -rel_lo / width)
  # POC[t] - POC[t-k] = (poc_rel[t] - poc_rel[t-k]) + (c[t] - c[t-k]), without forming price levels.
  shift = (poc_rel - P.lag(poc_rel, POC_SHIFT_LAG)) + (c - P.lag(c, POC_SHIFT_LAG))
  cols['poc_shift_atr'] = in_atr(shift)
  cols['profile_range_atr'] = in_atr(width * BINS)
  return finish(NAMES, cols)
