"""Windows, scaler and purged chronological splits over one or many symbols; seeded fixed-shape batches.

A sample is the window of `window` feature rows ending at row e ("window end"), with the labels of row e.
Nothing is materialised per window: `Dataset.features` is the scaled [T, F] matrix of all symbols stacked,
and a batch gathers its [B, W, F] windows from it by index.

Rules (each is tested in tests/test_dataset.py):
- A window never crosses a symbol boundary, never includes a row < WARMUP or a non-finite feature, and (with
  `max_gap_bars > 0`) never spans a time gap longer than `max_gap_bars` bars; labels never span such a gap.
- Splits are chronological on ONE calendar common to all symbols: two split times c1 <= c2 come from
  `dataset.split_dates`, or from the `dataset.split` fractions of the union timeline (every bar time of any
  symbol, sorted; one symbol: its own bars, so b1 = round(f_train * n) exactly as a per-symbol split). Per
  symbol, b1/b2 = its first rows at or after c1/c2: train ends < b1 <= val ends < b2 <= test ends. A purge of
  P bars of the symbol (P >= max(horizon, regime_horizon) + window) separates them: val ends >= b1 + P and
  test ends >= b2 + P, so the last bar any training label reads (t1 <= e + max horizon) lies before the first
  row of any validation window of the same symbol. Across symbols (whose bars need not line up) the same
  holds by timestamp: a training window whose label ends at or after the earliest validation (or test) window
  start of ANY symbol is dropped, and likewise validation windows before test windows. Symbols on one shared
  timeline lose nothing to this check.
- A symbol may have no rows in a split (its data starts after or ends before a split time): it is named in
  the summary (`empty_splits`). A symbol without training windows has no training span to fit its label
  thresholds on, so it is left out of every split (`excluded`); its rows stay in `features` and its bars can
  still be backtested.
- Statistics are fitted on the training span only: label thresholds (`make_labels(train_end=b1)`), class
  weights (train window ends), and the robust scaler (rows covered by training windows).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterator

from absl import logging
import jax.numpy as jnp
import numpy as np
import pandas as pd

from natron import features as features_lib
from natron import labels as labels_lib
from natron.errors import UserError

SPLITS = ('train', 'val', 'test')
SCALER_METHOD = 'robust: (x - median) / IQR, clipped'


# --------------------------------------------------------------------------------------------------
# Scaler.
# --------------------------------------------------------------------------------------------------
def fit_scaler(rows: np.ndarray, clip: float, feature_names=None) -> dict:
  """Per-feature robust scaler from training rows [N, F] (finite values only). JSON-able dict.

  center = median; scale = interquartile range, falling back to the 1%-99% range for features whose IQR is
  0 (rare binary flags such as candle patterns, whose quartiles coincide) and to 1 for constant features.
  """
  rows = np.asarray(rows)   # float32 [N, F] is kept as is: a float64 copy of 1M training rows costs ~1 GB
  if rows.ndim != 2 or len(rows) == 0:
    raise UserError(f'cannot fit the scaler: no training rows (got shape {rows.shape})')
  if not np.isfinite(rows).all():
    raise ValueError('scaler rows must be finite (the dataset passes only valid window rows)')
  if not clip > 0:
    raise UserError(f'dataset.scaler_clip must be > 0, got {clip}')
  q01, q25, q50, q75, q99 = np.percentile(rows, [1, 25, 50, 75, 99], axis=0)
  tiny = 1e-12
  scale = np.where(q75 - q25 > tiny, q75 - q25, np.where(q99 - q01 > tiny, q99 - q01, 1.0))
  return {'method': SCALER_METHOD, 'center': [float(v) for v in q50], 'scale': [float(v) for v in scale],
          'clip': float(clip), 'rows': int(len(rows)),
          'feature_names': list(feature_names) if feature_names is not None else None}


def apply_scaler(features, scaler: dict):
  """clip((features - center) / scale, -clip, clip) as float32 [..., F].

  numpy in -> numpy out; a jax array (or a tracer inside jit) -> jax array, so the Predictor applies the
  identical transform inside its jitted function. NaN stays NaN.
  """
  clip = float(scaler['clip'])
  if isinstance(features, np.ndarray):
    x = (features.astype(np.float32, copy=False) - np.asarray(scaler['center'], np.float32)) / np.asarray(
        scaler['scale'], np.float32)
    return np.clip(x, -clip, clip, out=x)   # in place: one [T, F] temporary, not two
  x = (jnp.asarray(features, jnp.float32) - jnp.asarray(scaler['center'], jnp.float32)) / jnp.asarray(
      scaler['scale'], jnp.float32)
  return jnp.clip(x, -clip, clip)


# --------------------------------------------------------------------------------------------------
# Splits.
# --------------------------------------------------------------------------------------------------
def min_purge(config) -> int:
  """max(horizon, regime_horizon) + window: the smallest gap that keeps labels out of later windows."""
  lab = config.labels
  horizon = max(int(labels_lib.setting(lab, 'horizon')), int(labels_lib.setting(lab, 'regime_horizon')))
  return horizon + int(config.dataset.window)


def purge_of(config) -> int:
  purge = int(config.dataset.get('purge', -1))
  need = min_purge(config)
  if purge < 0:
    return need
  if purge < need:
    raise UserError(f'dataset.purge={purge} is below max(horizon, regime_horizon) + window = {need}: training '
                    'labels would reach into validation windows (use -1 for the minimum)')
  return purge


def walk_forward_splits(ends, *, n_folds: int, test_size: int, gap: int = 0, train_size: int | None = None,
                        expanding: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Walk-forward folds over window ends (row indices of one symbol, or an int n for range(n)).

  The last n_folds * test_size ends form n_folds consecutive test blocks (oldest first). Fold i trains on
  the ends e with test_start - e >= gap (test_start = the block's first end): with gap >= horizon + window no
  training label reaches a test window. `expanding=True` keeps every earlier end; otherwise the latest
  `train_size`. Yields (train_ends, test_ends) int64 arrays.
  """
  ends = np.arange(ends, dtype=np.int64) if np.ndim(ends) == 0 else np.asarray(ends, np.int64)
  if np.any(np.diff(ends) <= 0):
    raise UserError('walk_forward_splits needs strictly increasing window ends')
  if n_folds < 1 or test_size < 1:
    raise UserError(f'n_folds and test_size must be >= 1, got {n_folds}, {test_size}')
  if not expanding and not (train_size and train_size > 0):
    raise UserError('a rolling walk-forward (expanding=False) needs train_size > 0')
  first_test = len(ends) - n_folds * test_size
  if first_test <= 0:
    raise UserError(f'{n_folds} folds of {test_size} test windows need more than {len(ends)} windows')
  for fold in range(n_folds):
    test = ends[first_test + fold * test_size: first_test + (fold + 1) * test_size]
    train = ends[ends <= test[0] - gap]
    if not expanding:
      train = train[-train_size:]
    if len(train) == 0:
      raise UserError(f'walk-forward fold {fold} has no training windows before its gap of {gap} bars')
    yield train, test


def _parse_split_dates(config) -> tuple | None:
  """dataset.split_dates as two UTC nanosecond stamps, or None when the split is by fractions."""
  dates = tuple(config.dataset.get('split_dates', ()) or ())
  if not dates:
    return None
  if len(dates) != 2:
    raise UserError(f'dataset.split_dates must be (val_start, test_start), got {dates}')
  stamps = []
  for d in dates:
    try:
      ts = pd.Timestamp(d)
    except (ValueError, TypeError) as e:
      raise UserError(f'dataset.split_dates entry {d!r} is not a date') from e
    stamps.append(ts.tz_localize('UTC') if ts.tzinfo is None else ts.tz_convert('UTC'))
  if stamps[0] > stamps[1]:
    raise UserError(f'dataset.split_dates must be increasing, got {dates}')
  return tuple(int(ts.value) for ts in stamps)


def _split_fractions(config) -> np.ndarray:
  split = np.asarray(config.dataset.split, np.float64)
  if split.shape != (3,) or np.any(split < 0) or split[0] <= 0 or split.sum() > 1 + 1e-9:
    raise UserError(f'dataset.split must be 3 non-negative fractions (train > 0) summing to <= 1, '
                    f'got {tuple(config.dataset.split)}')
  return split


_NEVER = np.iinfo(np.int64).max   # a split time after every bar


def split_times(time: pd.DatetimeIndex | None, config) -> tuple[int, int] | None:
  """(c1, c2) UTC nanoseconds: the common validation and test split times of all symbols (None without time).

  From `dataset.split_dates`, else the `dataset.split` fractions of the union timeline U (sorted distinct bar
  times of every symbol): c1 = U[round(f_train * |U|)], c2 = U[round((f_train + f_val) * |U|)] (after the last
  bar when the index is |U|).
  """
  dates = _parse_split_dates(config)
  if dates is not None:
    if time is None:
      raise UserError('dataset.split_dates needs a time column')
    return dates
  split = _split_fractions(config)
  if time is None:
    return None
  union = np.unique(time.asi8)
  n = len(union)
  at = lambda i: int(union[i]) if i < n else _NEVER
  return at(int(round(split[0] * n))), at(int(round((split[0] + split[1]) * n)))


def _split_bounds(sym_time: pd.DatetimeIndex | None, n: int, times: tuple[int, int] | None,
                  config) -> tuple[int, int]:
  """(b1, b2) local rows of one symbol: train rows < b1 <= val rows < b2 <= test rows (before purging)."""
  if times is None:   # no time column: the symbol's own fractions (one symbol: the only choice)
    split = _split_fractions(config)
    return int(round(split[0] * n)), int(round((split[0] + split[1]) * n))
  return tuple(int(np.searchsorted(sym_time.asi8, c, side='left')) for c in times)


def _gap_breaks(time: np.ndarray | None, max_gap_bars: int, timeframe: str) -> np.ndarray | None:
  """bool [T]: True at a bar that follows a gap of more than max_gap_bars bars (None: no limit)."""
  if max_gap_bars <= 0:
    return None
  if time is None:
    raise UserError('dataset.max_gap_bars needs a time column')
  step = pd.Timedelta(timeframe)
  dt = np.diff(pd.DatetimeIndex(time).asi8)
  return np.concatenate([[False], dt > max_gap_bars * step.value])


def _window_sum(flags: np.ndarray, first: np.ndarray, last: np.ndarray) -> np.ndarray:
  """Number of True flags in rows first..last (inclusive) for each pair; integer cumsum (exact)."""
  csum = np.concatenate([[0], np.cumsum(flags.astype(np.int64))])
  return csum[last + 1] - csum[first]


def valid_window_ends(feats: np.ndarray, window: int, warmup: int, breaks: np.ndarray | None) -> np.ndarray:
  """bool [T]: row e ends a valid window (rows e-W+1..e all >= warmup, all finite, no gap inside)."""
  n = len(feats)
  ends = np.arange(n)
  first = np.maximum(ends - window + 1, 0)
  ok = ends - window + 1 >= warmup
  ok &= _window_sum(~np.isfinite(feats).all(axis=1), first, ends) == 0
  if breaks is not None:
    # A break at row i is a gap between rows i-1 and i: inside the window when first < i <= e.
    ok &= _window_sum(breaks, first + 1, ends) == 0
  return ok


# --------------------------------------------------------------------------------------------------
# The dataset.
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Dataset:
  """Scaled features of every row, window ends per split, labels and the statistics fitted on train.

  features: float32 [T, F] (scaled; NaN in warm-up rows, which no window touches); ends: split -> int64 [N]
  window-end rows of every valid window in the split (labelled or not); labels: Labels over the T rows (t1 in
  global rows); close, spread float64 [T], time datetime64[ns] [T] (UTC), symbol object [T] (str).
  """
  features: np.ndarray
  ends: dict
  labels: labels_lib.Labels
  scaler: dict
  feature_names: list
  class_weights: dict
  window: int
  close: np.ndarray
  time: np.ndarray | None
  spread: np.ndarray | None
  symbol: np.ndarray
  symbols: list
  bounds: list          # per symbol: dict of global rows start, stop, train_end, val_start, val_end, test_start
  purge: int
  batch_size: int = 128
  true_regime: np.ndarray | None = None
  info: dict = dataclasses.field(default_factory=dict)

  # --- Access ---------------------------------------------------------------------------------------
  @property
  def num_features(self) -> int:
    return self.features.shape[1]

  def labelled(self, ends: np.ndarray) -> np.ndarray:
    """bool [N]: window ends with at least one task label (the rest are masked in every task)."""
    return np.any([self.labels.task(t)[ends] >= 0 for t in labels_lib.TASKS], axis=0)

  def split_ends(self, split: str, labelled: bool = True) -> np.ndarray:
    if split not in self.ends:
      raise UserError(f'unknown split {split!r}; splits are {tuple(self.ends)}')
    ends = self.ends[split]
    return ends[self.labelled(ends)] if labelled else ends

  def windows(self, ends) -> np.ndarray:
    """float32 [N, W, F]: rows e-W+1..e of the scaled features for each end e (a gather, not a view)."""
    ends = np.asarray(ends, np.int64)
    return self.features[ends[:, None] + np.arange(1 - self.window, 1)[None, :]]

  def batches(self, split: str, batch_size: int | None = None, *, seed: int = 0, shuffle: bool = True,
              drop_remainder: bool = False, labelled: bool = True, num_shards: int = 1,
              shard_index: int | None = None) -> Iterator[dict]:
    """Fixed-shape batches over one split; a deterministic function of (split, seed, arguments).

    Order: `np.random.default_rng(seed).permutation` when `shuffle` (pass seed + epoch for a new order each
    epoch), else chronological. The last partial batch is padded to `batch_size` (mask 0, labels -1,
    weight 0) unless `drop_remainder`. `labelled=False` also yields windows without labels (pretraining).
    `num_shards` asserts that the batch splits evenly over devices; `shard_index` returns only that
    contiguous slice of each batch (one host's share in multi-host training).
    Yields dict: x float32 [B, W, F]; buy, sell, direction, regime int32 [B]; weight, mask float32 [B];
    end int64 [B] (B = batch_size / num_shards with shard_index).
    """
    batch_size = int(batch_size or self.batch_size)
    if batch_size < 1 or num_shards < 1 or batch_size % num_shards:
      raise UserError(f'batch_size {batch_size} must be a positive multiple of num_shards {num_shards}')
    if shard_index is not None and not 0 <= shard_index < num_shards:
      raise UserError(f'shard_index {shard_index} outside 0..{num_shards - 1}')
    ends = self.split_ends(split, labelled)
    order = np.random.default_rng(seed).permutation(len(ends)) if shuffle else np.arange(len(ends))
    per_shard = batch_size // num_shards
    shard = slice(None) if shard_index is None else slice(shard_index * per_shard, (shard_index + 1) * per_shard)
    for start in range(0, len(ends), batch_size):
      idx = ends[order[start:start + batch_size]]
      if len(idx) < batch_size and drop_remainder:
        return
      # Padding rows repeat a real window (finite inputs) and are switched off by mask, labels and weight.
      live = np.arange(batch_size) < len(idx)
      padded = np.concatenate([idx, np.full(batch_size - len(idx), idx[0], np.int64)])
      yield self._batch(padded[shard], live[shard])   # gather only this shard's windows

  def _batch(self, ends: np.ndarray, live: np.ndarray) -> dict:
    out = {'x': self.windows(ends)}
    for task in labels_lib.TASKS:
      out[task] = np.where(live, self.labels.task(task)[ends], -1).astype(np.int32)
    out['weight'] = np.where(live, self.labels.weight[ends], 0.0).astype(np.float32)
    out['mask'] = live.astype(np.float32)
    out['end'] = ends.astype(np.int64)
    return out

  def walk_forward(self, n_folds: int, *, test_size: int | None = None, gap: int | None = None,
                   expanding: bool = True, train_size: int | None = None,
                   labelled: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Walk-forward folds over every split's windows, on one calendar for all symbols.

    The test blocks are cut from the sorted distinct END TIMES of all symbols' windows (`walk_forward_splits`
    over that timeline; test_size counts its entries, default len // (n_folds + 1)), so every symbol's fold k
    tests the same dates. Per symbol, training ends lie `gap` of its own bars (default the dataset's purge)
    before its first test end; across symbols, training windows whose labels end at or after the earliest test
    window start of the fold are dropped (rolling: each symbol's latest `train_size`). One symbol: exactly
    `walk_forward_splits` over its ends. Without timestamps each symbol is cut by its own window count. The
    scaler stays the one fitted on the train split; for a strictly out-of-sample scaler per fold, build a
    dataset per fold instead.
    """
    gap = self.purge if gap is None else int(gap)
    all_ends = np.unique(np.concatenate([self.split_ends(s, labelled) for s in SPLITS if s in self.ends]))
    if self.time is None:
      yield from self._walk_forward_per_symbol(all_ends, n_folds, test_size, gap, expanding, train_size)
      return
    time_ns = self.time.astype('datetime64[ns]').astype(np.int64)
    timeline = np.unique(time_ns[all_ends])
    size = test_size or len(timeline) // (n_folds + 1)
    blocks = [test for _, test in walk_forward_splits(len(timeline), n_folds=n_folds, test_size=size, gap=0)]
    for fold, block in enumerate(blocks):
      lo = timeline[block[0]]
      hi = timeline[block[-1] + 1] if block[-1] + 1 < len(timeline) else _NEVER
      trains, tests = [], []
      for b in self.bounds:
        ends = all_ends[(all_ends >= b['start']) & (all_ends < b['stop'])]
        t = time_ns[ends]
        test = ends[(t >= lo) & (t < hi)]
        if len(test):
          train = ends[ends <= test[0] - gap]
        else:   # none of its windows in the block: its windows before it (the calendar purge below applies)
          train = ends[t < lo]
        if not expanding:
          train = train[-train_size:]
        trains.append(train)
        tests.append(test)
      train, test = np.concatenate(trains), np.concatenate(tests)
      if len(test) and len(train) and len(self.bounds) > 1:
        first_start = time_ns[test - self.window + 1].min()
        train = train[time_ns[label_end_rows(train, self.labels.t1)] < first_start]
      if len(train) == 0 or len(test) == 0:
        raise UserError(f'walk-forward fold {fold} has no {"training" if len(test) else "test"} windows on the '
                        'common calendar; use fewer folds or more data')
      yield train, test

  def _walk_forward_per_symbol(self, all_ends, n_folds, test_size, gap, expanding, train_size):
    per_symbol = []
    for b in self.bounds:
      ends = all_ends[(all_ends >= b['start']) & (all_ends < b['stop'])]
      size = test_size or len(ends) // (n_folds + 1)
      per_symbol.append(list(walk_forward_splits(ends, n_folds=n_folds, test_size=size, gap=gap,
                                                 train_size=train_size, expanding=expanding)))
    for fold in range(n_folds):
      yield (np.concatenate([folds[fold][0] for folds in per_symbol]),
             np.concatenate([folds[fold][1] for folds in per_symbol]))

  # --- Reporting ------------------------------------------------------------------------------------
  def purge_gaps(self) -> list[dict]:
    """Per symbol and split boundary: bars strictly between the last label bar (max t1) of the earlier
    split and the first row of the later split's windows (>= 0 means no overlap), and the end-to-end gap."""
    out = []
    for b in self.bounds:
      parts = {s: e[(e >= b['start']) & (e < b['stop'])] for s, e in self.ends.items()}
      for a, c in (('train', 'val'), ('val', 'test'), ('train', 'test')):
        if len(parts.get(a, ())) and len(parts.get(c, ())):
          t1 = self.labels.t1[parts[a]]
          last_label = int(max(t1.max(), parts[a].max()))
          first_row = int(parts[c].min()) - self.window + 1
          out.append({'symbol': b['symbol'], 'boundary': f'{a}->{c}', 'bars_between': first_row - last_label - 1,
                      'end_to_end': int(parts[c].min() - parts[a].max())})
    return out

  def regime_agreement(self) -> dict | None:
    """Per split: agreement of regime labels with the generator's dominant true regime (None if unknown)."""
    if self.true_regime is None:
      return None
    horizon = next(int(p['regime_horizon']) for p in self.info['label_params'].values() if 'regime_horizon' in p)
    dominant = np.concatenate([labels_lib.dominant_regime(self.true_regime[b['start']:b['stop']], horizon)
                               for b in self.bounds])
    out = {}
    for split in self.ends:
      ends = self.ends[split]
      use = ends[(self.labels.regime[ends] >= 0) & (dominant[ends] >= 0)]
      if len(use):
        out[split] = {'agreement': float(np.mean(self.labels.regime[use] == dominant[use])), 'windows': len(use)}
    return out

  def summary(self) -> dict:
    """JSON-able description: windows and class shares per split, purge gaps, scaler, thresholds."""
    splits = {}
    for split in self.ends:
      ends = self.ends[split]
      lab = self.split_ends(split, labelled=True)
      shares = {t: dict(zip(labels_lib.CLASS_NAMES[t],
                            labels_lib.class_shares(self.labels.task(t)[lab], labels_lib.NUM_CLASSES[t])))
                for t in labels_lib.TASKS}
      entry = {'windows': int(len(ends)), 'labelled_windows': int(len(lab)), 'class_shares': shares}
      if self.time is not None and len(ends):
        entry['time'] = [str(self.time[ends.min()]), str(self.time[ends.max()])]
      splits[split] = entry
    summary = {
        'symbols': list(self.symbols), 'rows': int(len(self.features)), 'features': self.num_features,
        'window': self.window, 'warmup': int(self.info.get('warmup', 0)), 'purge': self.purge,
        'splits': splits, 'purge_gaps': self.purge_gaps(),
        'scaler': {'method': self.scaler['method'], 'rows': self.scaler['rows'],
                   'features': len(self.scaler['center']), 'clip': self.scaler['clip']},
        'class_weights': self.class_weights,
        'thresholds': {s: {k: p[k] for k in ('direction_k', 'regime_mode', 'regime_thresholds', 'train_end')}
                       for s, p in self.info['label_params'].items()},
        'bounds': self.bounds,
        'split_times': self.info.get('split_times'),
        'excluded': self.info.get('excluded', {}),
        'empty_splits': self.info.get('empty_splits', {}),
        'calendar_purged': self.info.get('calendar_purged', {}),
    }
    agreement = self.regime_agreement()
    if agreement is not None:
      summary['regime_agreement'] = agreement
    return summary


# --------------------------------------------------------------------------------------------------
# Building.
# --------------------------------------------------------------------------------------------------
_PRICE_COLUMNS = ('open', 'high', 'low', 'close', 'volume')


def _symbol_blocks(frame: pd.DataFrame) -> list[tuple[str, int, int]]:
  """[(symbol, start, stop)] of contiguous, time-ordered row blocks, one per symbol."""
  missing = [c for c in _PRICE_COLUMNS if c not in frame.columns]
  if missing:
    raise UserError(f'the market frame lacks columns {missing}')
  if len(frame) == 0:
    raise UserError('the market frame is empty')
  if 'symbol' not in frame.columns:
    return [('SYMBOL', 0, len(frame))]
  sym = frame['symbol'].astype(str).to_numpy()
  change = np.flatnonzero(sym[1:] != sym[:-1]) + 1
  starts = np.concatenate([[0], change])
  stops = np.concatenate([change, [len(sym)]])
  names = [sym[s] for s in starts]
  if len(set(names)) != len(names):
    raise UserError('rows of one symbol are not contiguous: sort the frame by (symbol, time) '
                    '(natron.data.load_market does)')
  return list(zip(names, starts.tolist(), stops.tolist()))


def _time_column(frame: pd.DataFrame) -> np.ndarray | None:
  if 'time' not in frame.columns:
    return None
  time = pd.DatetimeIndex(frame['time'])
  time = time.tz_localize('UTC') if time.tz is None else time.tz_convert('UTC')
  return time


def _true_regime(frame: pd.DataFrame, true_regime) -> np.ndarray | None:
  if true_regime is None and 'true_regime' in frame.columns:
    true_regime = frame['true_regime'].to_numpy()
  if true_regime is None:
    true_regime = frame.attrs.get('true_regime')
  if true_regime is None:
    return None
  true_regime = np.asarray(true_regime, np.int32)
  if true_regime.shape != (len(frame),):
    raise UserError(f'true_regime has shape {true_regime.shape}, expected ({len(frame)},)')
  return true_regime


def build_dataset(frame: pd.DataFrame, config, *, true_regime=None) -> Dataset:
  """Features, labels, purged splits and the train-only scaler for every symbol of `frame`.

  Args:
    frame: OHLCV rows (natron.data.load_market), contiguous and time-ordered per `symbol` (if present).
    config: the full config (reads config.labels, config.dataset, config.data.timeframe).
    true_regime: optional int [T] generator regimes (synthetic data), else a `true_regime` column or
      frame.attrs['true_regime']; only used to report the regime labels' agreement.
  """
  window = int(config.dataset.window)
  if window < 1:
    raise UserError(f'dataset.window must be >= 1, got {window}')
  purge = purge_of(config)
  max_gap = int(config.dataset.get('max_gap_bars', 0))
  timeframe = str(config.data.get('timeframe', '15min'))
  time = _time_column(frame)
  warmup = int(features_lib.WARMUP)
  blocks = _symbol_blocks(frame)
  times = split_times(time, config)
  if times is None and len(blocks) > 1:
    logging.warning('dataset: no time column: each of %d symbols is split by its own fractions, not on a '
                    'common calendar', len(blocks))

  columns = {c: frame[c].to_numpy(np.float64) for c in _PRICE_COLUMNS}
  points = frame.attrs.get('points') or {}   # natron.data.load_market's quote grid per symbol (else inferred)
  feats, names, labels, ends, bounds, params = [], None, [], {s: [] for s in SPLITS}, [], {}
  excluded, offset = {}, 0
  for sym, start, stop in blocks:
    n = stop - start
    sub = {c: v[start:stop] for c, v in columns.items()}
    sym_time = None if time is None else time[start:stop]
    if sym_time is not None and np.any(np.diff(sym_time.asi8) <= 0):
      raise UserError(f'symbol {sym}: time must be strictly increasing')
    point = points.get(sym)
    f, f_names = (features_lib.compute_features(sub) if point is None else
                  features_lib.compute_features(sub, point=point))
    f = np.asarray(f, np.float32)
    if names is not None and list(f_names) != list(names):
      raise ValueError('feature names differ between symbols')
    names = list(f_names)
    breaks = _gap_breaks(sym_time, max_gap, timeframe)
    b1, b2 = _split_bounds(sym_time, n, times, config)
    ok = valid_window_ends(f, window, warmup, breaks)
    e = np.arange(n)
    local = {'train': e[ok & (e < b1)], 'val': e[ok & (e >= b1 + purge) & (e < b2)],
             'test': e[ok & (e >= b2 + purge)]}
    if len(local['train']) == 0:
      # No training span to fit this symbol's label thresholds on: it sits out every split (reported).
      excluded[sym] = (f'no training windows ({b1} bars before the validation split, warm-up {warmup}, '
                       f'window {window})')
      logging.warning('dataset: symbol %s is left out of every split: %s', sym, excluded[sym])
      local = {s: e[:0] for s in SPLITS}
      lab = _no_labels(n)
    else:
      lab = labels_lib.make_labels(sub, config.labels, train_end=b1, breaks=breaks)
    for s in SPLITS:
      ends[s].append(local[s] + offset)
    feats.append(f)
    labels.append((lab, offset))
    params[sym] = lab.params
    bounds.append({'symbol': sym, 'start': offset, 'stop': offset + n, 'train_end': offset + b1,
                   'val_start': offset + b1 + purge, 'val_end': offset + b2, 'test_start': offset + b2 + purge})
    offset += n
  if len(excluded) == len(blocks):
    raise UserError(f'no symbol has training windows ({excluded}); use more bars or a larger training split')

  all_labels = _concat_labels(labels)
  ends = {s: np.concatenate(v).astype(np.int64) for s, v in ends.items()}
  calendar_purged = {}
  if time is not None and len(blocks) > 1:
    ends, calendar_purged = _calendar_purge(ends, all_labels.t1, time.asi8, window)
  empty = {}
  for b in bounds:
    if b['symbol'] in excluded:
      continue
    missing = [s for s in SPLITS if not np.any((ends[s] >= b['start']) & (ends[s] < b['stop']))]
    if missing:
      empty[b['symbol']] = missing
      logging.warning('dataset: symbol %s has no %s windows (%d bars, purge %d)', b['symbol'],
                      '/'.join(missing), b['stop'] - b['start'], purge)
  features = np.concatenate(feats)
  scaler = fit_scaler(features[_covered_rows(ends['train'], window, len(features))],
                      float(config.dataset.scaler_clip), names)
  train_lab = ends['train'][np.any([all_labels.task(t)[ends['train']] >= 0 for t in labels_lib.TASKS], axis=0)]
  all_labels.class_weights = {t: labels_lib.class_weights(all_labels.task(t)[train_lab], labels_lib.NUM_CLASSES[t])
                              for t in labels_lib.TASKS}
  all_labels.params = params
  return Dataset(
      features=apply_scaler(features, scaler), ends=ends, labels=all_labels, scaler=scaler, feature_names=names,
      class_weights=all_labels.class_weights, window=window, close=frame['close'].to_numpy(np.float64),
      time=None if time is None else time.asi8.view('datetime64[ns]'),
      spread=frame['spread'].to_numpy(np.float64) if 'spread' in frame.columns else None,
      symbol=np.concatenate([np.full(b['stop'] - b['start'], b['symbol'], dtype=object) for b in bounds]),
      symbols=[b['symbol'] for b in bounds], bounds=bounds, purge=purge,
      batch_size=int(config.dataset.get('batch_size', 128)), true_regime=_true_regime(frame, true_regime),
      info={'warmup': warmup, 'label_params': params, 'max_gap_bars': max_gap,
            'feature_schema_hash': features_lib.feature_schema_hash(),
            'split_times': None if times is None else [_iso(c) for c in times],
            'excluded': excluded, 'empty_splits': empty, 'calendar_purged': calendar_purged})


def _iso(ns: int) -> str | None:
  return None if ns == _NEVER else pd.Timestamp(ns, tz='UTC').isoformat()


def _no_labels(n: int) -> labels_lib.Labels:
  """All-unlabelled rows of a symbol that sits out every split."""
  none = np.full(n, -1, np.int32)
  return labels_lib.Labels(buy=none, sell=none.copy(), direction=none.copy(), regime=none.copy(),
                           t1=np.full(n, -1, np.int64), weight=np.zeros(n, np.float32),
                           sigma=np.full(n, np.nan),
                           params={'direction_k': None, 'regime_mode': None, 'regime_thresholds': None,
                                   'train_end': 0, 'excluded': True})


def label_end_rows(ends: np.ndarray, t1: np.ndarray) -> np.ndarray:
  """Last row each window's labels read (the window end itself when it has no label)."""
  return np.maximum(t1[ends], ends)


def _calendar_purge(ends: dict, t1: np.ndarray, time_ns: np.ndarray, window: int) -> tuple[dict, dict]:
  """Drops windows whose labels end at or after the earliest later-split window start of ANY symbol.

  Per-symbol purges count each symbol's own bars; symbols whose bars do not line up (holes, other sessions)
  could still have a training label end after another symbol's first validation window. Returns (ends,
  {split: windows dropped}).
  """
  out, dropped = dict(ends), {}

  def first_start(split):
    e = out[split]
    return int(time_ns[e - window + 1].min()) if len(e) else _NEVER

  for split, later in (('val', ('test',)), ('train', ('val', 'test'))):   # val first: train sees the final val
    limit = min(first_start(c) for c in later)
    e = out[split]
    keep = time_ns[label_end_rows(e, t1)] < limit
    if not keep.all():
      dropped[split] = int((~keep).sum())
      out[split] = e[keep]
  return out, dropped


def _covered_rows(ends: np.ndarray, window: int, n: int) -> np.ndarray:
  """bool [n]: rows inside at least one window ending at `ends` (difference array + integer cumsum)."""
  delta = np.bincount(ends - window + 1, minlength=n + 1) - np.bincount(ends + 1, minlength=n + 1)
  return np.cumsum(delta)[:n] > 0


def _concat_labels(parts: list[tuple[labels_lib.Labels, int]]) -> labels_lib.Labels:
  """One Labels over stacked symbols; t1 shifted to global rows."""
  cat = lambda name: np.concatenate([getattr(l, name) for l, _ in parts])
  t1 = np.concatenate([np.where(l.t1 >= 0, l.t1 + off, -1) for l, off in parts]).astype(np.int64)
  return labels_lib.Labels(buy=cat('buy'), sell=cat('sell'), direction=cat('direction'), regime=cat('regime'),
                           t1=t1, weight=cat('weight'), sigma=cat('sigma'))


# --------------------------------------------------------------------------------------------------
# Phase.
# --------------------------------------------------------------------------------------------------
def summary_markdown(summary: dict) -> str:
  """A short Markdown report: windows and class shares per split, purge gaps, regime agreement."""
  lines = [f"Dataset: {summary['rows']} rows, symbols {', '.join(summary['symbols'])}, "
           f"{summary['features']} features, window {summary['window']}, purge {summary['purge']} bars", '',
           '| split | windows | labelled | buy=1 | sell=1 | direction UP/DOWN/NEUTRAL | regime ' +
           '/'.join(labels_lib.REGIMES) + ' |', '|---|---|---|---|---|---|---|']
  for split, s in summary['splits'].items():
    sh = s['class_shares']
    fmt = lambda d: '/'.join(f'{v:.2f}' for v in d.values())
    lines.append(f"| {split} | {s['windows']} | {s['labelled_windows']} | {sh['buy']['BUY']:.3f} | "
                 f"{sh['sell']['SELL']:.3f} | {fmt(sh['direction'])} | {fmt(sh['regime'])} |")
  if summary.get('split_times'):
    lines += ['', 'Splits on one calendar for all symbols: validation from {}, test from {} (UTC).'.format(
        *[t or 'after the data' for t in summary['split_times']])]
  for sym, why in (summary.get('excluded') or {}).items():
    lines.append(f'- {sym} is left out of every split: {why}.')
  for sym, missing in (summary.get('empty_splits') or {}).items():
    lines.append(f"- {sym} has no {' / '.join(missing)} windows (its data does not reach that part of the "
                 'calendar).')
  if summary.get('calendar_purged'):
    lines.append('- Windows dropped so that no label ends after a later split starts for any symbol: ' +
                 ', '.join(f'{k} {v}' for k, v in summary['calendar_purged'].items()) + '.')
  lines += ['', '| symbol | boundary | bars between last label and next window |', '|---|---|---|']
  lines += [f"| {g['symbol']} | {g['boundary']} | {g['bars_between']} |" for g in summary['purge_gaps']]
  if 'regime_agreement' in summary:
    lines += ['', 'Regime label agreement with the true (generator) regime: ' + ', '.join(
        f"{k} {v['agreement']:.3f}" for k, v in summary['regime_agreement'].items())]
  return '\n'.join(lines) + '\n'


def synthetic_true_regime(frame: pd.DataFrame, data_config) -> np.ndarray | None:
  """The generator's regimes for a synthetic `load_market` frame (None for file data).

  Regenerates each symbol with load_market's seeds ('SYNTH': synthetic_seed; 'SYNTH<i>': (seed, i)) and
  returns them only if the regenerated closes equal the frame's exactly, so a mismatch is never reported.
  """
  from natron import data as data_lib  # pylint: disable=g-import-not-at-top
  if 'true_regime' in frame.attrs:
    return np.asarray(frame.attrs['true_regime'], np.int32)
  if str(data_config.get('path', '') or '').strip():
    return None
  seed = int(data_config.get('synthetic_seed', 0))
  regimes = []
  for sym, start, stop in _symbol_blocks(frame):
    if sym == 'SYNTH':
      sym_seed = seed
    elif sym.startswith('SYNTH') and sym[5:].isdigit():
      sym_seed = (seed, int(sym[5:]))
    else:
      return None
    point = (frame.attrs.get('points') or {}).get(sym, data_lib.synthetic.DEFAULT_POINT)
    gen, true = data_lib.synthetic_market(
        stop - start, seed=sym_seed, timeframe=str(data_config.get('timeframe', '15min')), point=point,
        preset=str(data_config.get('synthetic_preset', 'learnable') or 'learnable'))
    if not np.array_equal(gen['close'].to_numpy(), frame['close'].to_numpy()[start:stop]):
      return None
    regimes.append(true)
  return np.concatenate(regimes).astype(np.int32)


def run_phase(config, workdir: str) -> dict:
  """Builds the dataset of config.data and writes workdir/dataset/summary.json and summary.md.

  Multi-host (jax.distributed): every process builds the same summary; process 0 alone writes.
  """
  from natron import data as data_lib  # pylint: disable=g-import-not-at-top
  from natron.train import state as train_state  # pylint: disable=g-import-not-at-top
  frame = data_lib.load_market(config.data)
  dataset = build_dataset(frame, config, true_regime=synthetic_true_regime(frame, config.data))
  summary = dataset.summary()
  out = os.path.join(workdir, 'dataset')
  markdown = summary_markdown(summary)
  if train_state.is_main_process():
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, 'summary.json'), 'w') as f:
      json.dump(summary, f, indent=2, default=str)
    with open(os.path.join(out, 'summary.md'), 'w') as f:
      f.write(markdown)
  logging.info('dataset summary (%s):\n%s', out, markdown)
  result = {f'{s}_windows': v['windows'] for s, v in summary['splits'].items()}
  for split, v in (summary.get('regime_agreement') or {}).items():
    result[f'{split}_regime_agreement'] = v['agreement']
  return result
