"""Dataset: valid windows, purged splits, train-only scaler, gaps, symbols, batches, walk-forward, phase."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from configs import dataset as dataset_config
from natron import dataset as D
from natron import features
from natron import labels as L
from natron.data import load_market
from natron.errors import UserError

N_BARS = 5000   # per symbol; every frame in this file has this length, so features compile once


def _config(**dataset):
  config = dataset_config.get_config()
  config.data.synthetic_bars = N_BARS
  config.data.synthetic_symbols = 2
  for key, value in dataset.items():
    config.dataset[key] = value
  return config


@pytest.fixture(scope='module')
def config():
  return _config()


POINT = 1e-5


def _on_grid(frame, point=POINT):
  """Prices on a 5-digit quote grid, integer volumes, whole-point spreads (a no-op on data already so)."""
  out = frame.copy()
  for c in ('open', 'high', 'low', 'close'):   # rounding is monotone: high >= open, close >= low still hold
    out[c] = np.round(out[c].to_numpy() / point) * point
  out['volume'] = np.maximum(np.round(out['volume'].to_numpy()), 1.0)
  if 'spread' in out:
    out['spread'] = np.maximum(np.round(out['spread'].to_numpy() / point), 1.0) * point
  out.attrs = dict(frame.attrs)
  return out


@pytest.fixture(scope='module')
def market(config):
  """(frame on the grid, the generator's true regimes), independent of how natron.data quantises."""
  raw = load_market(config.data)
  return _on_grid(raw), D.synthetic_true_regime(raw, config.data)


@pytest.fixture(scope='module')
def frame(market):
  return market[0]


@pytest.fixture(scope='module')
def ds(market, config):
  return D.build_dataset(market[0], config, true_regime=market[1])


def _symbol_parts(ds):
  for b in ds.bounds:
    yield b, {s: e[(e >= b['start']) & (e < b['stop'])] for s, e in ds.ends.items()}


def test_windows_are_valid_and_stay_inside_one_symbol(ds):
  assert ds.symbols == ['SYNTH0', 'SYNTH1'] and ds.features.dtype == np.float32
  w = ds.window
  for split, ends in ds.ends.items():
    assert len(ends) > 300, split
    first = ends - w + 1
    np.testing.assert_array_equal(ds.symbol[first], ds.symbol[ends])
    starts = np.array([b['start'] for b in ds.bounds])
    local_first = first - starts[np.searchsorted(starts, ends, side='right') - 1]
    assert np.all(local_first >= features.WARMUP)
    assert np.all(np.isfinite(ds.features[D._covered_rows(ends, w, len(ds.features))]))
  # Splits are disjoint and chronological inside each symbol.
  for _, parts in _symbol_parts(ds):
    assert parts['train'].max() < parts['val'].min() and parts['val'].max() < parts['test'].min()


def test_purge_gaps_every_split_boundary(ds, config):
  assert ds.purge == max(config.labels.horizon, config.labels.regime_horizon) + config.dataset.window == 144
  for _, parts in _symbol_parts(ds):
    for a, c in (('train', 'val'), ('val', 'test')):
      last_label_bar = ds.labels.t1[parts[a]].max()
      first_window_row = parts[c].min() - ds.window + 1
      assert last_label_bar < first_window_row, (a, c)
  gaps = ds.summary()['purge_gaps']
  assert len(gaps) == 6 and all(g['bars_between'] >= 0 for g in gaps)


def test_walk_forward_folds_are_purged(ds):
  # The generic generator on plain row indices, expanding and rolling.
  folds = list(D.walk_forward_splits(1000, n_folds=4, test_size=100, gap=50))
  assert len(folds) == 4
  for i, (train, test) in enumerate(folds):
    assert test[0] - train.max() >= 50 and len(test) == 100 and test[0] == 600 + 100 * i
  rolling = list(D.walk_forward_splits(1000, n_folds=3, test_size=100, gap=50, train_size=200, expanding=False))
  assert all(len(tr) == 200 for tr, _ in rolling)
  with pytest.raises(UserError):
    list(D.walk_forward_splits(100, n_folds=5, test_size=30))
  # On the dataset: per symbol, no training label reaches into a test window of its fold.
  n_folds = 0
  for train, test in ds.walk_forward(3):
    n_folds += 1
    for b in ds.bounds:
      tr = train[(train >= b['start']) & (train < b['stop'])]
      te = test[(test >= b['start']) & (test < b['stop'])]
      assert len(tr) and len(te)
      assert ds.labels.t1[tr].max() < te.min() - ds.window + 1
  assert n_folds == 3


def _perturb_after(frame, rows_from, seed=0):
  """Multiplies whole bars (open, high, low, close) from global row rows_from[symbol] on by a random walk."""
  moved = frame.copy()
  rng = np.random.default_rng(seed)
  for sym, start in rows_from.items():
    rows = moved.index[(moved['symbol'] == sym).to_numpy() & (np.arange(len(moved)) >= start)]
    factor = np.exp(np.cumsum(rng.normal(0.0, 0.004, len(rows))))
    for c in ('open', 'high', 'low', 'close'):
      moved.loc[rows, c] *= factor
    moved.loc[rows, 'volume'] *= rng.uniform(0.5, 2.0, len(rows))
  return _on_grid(moved)


def test_no_leakage_from_validation_and_test_data(ds, frame, config):
  # Every bar after the last bar a training label reads is altered: val and test windows and labels change,
  # nothing fitted on the training span may move.
  hmax = max(config.labels.horizon, config.labels.regime_horizon)
  moved = _perturb_after(frame, {b['symbol']: b['train_end'] + hmax for b in ds.bounds}, seed=1)
  other = D.build_dataset(moved, config)
  assert other.scaler == ds.scaler
  assert other.class_weights == ds.class_weights
  assert other.info['label_params'] == ds.info['label_params']
  for split in ds.ends:
    np.testing.assert_array_equal(other.ends[split], ds.ends[split])
  train = ds.ends['train']
  rows = D._covered_rows(train, ds.window, len(ds.features))   # every row of every training window
  np.testing.assert_array_equal(other.features[rows], ds.features[rows])
  for task in L.TASKS + ('weight', 't1'):
    np.testing.assert_array_equal(getattr(other.labels, task)[train], getattr(ds.labels, task)[train])
  test = ds.ends['test']
  assert not np.array_equal(other.features[test], ds.features[test])
  assert np.mean(other.labels.direction[test] != ds.labels.direction[test]) > 0.2


def test_future_bars_change_labels_but_not_features(ds, frame, config):
  # Alter the bars after a validation window end t: t's labels change, its window (features, scaler) does not.
  val0 = ds.ends['val'][ds.ends['val'] < N_BARS]   # SYNTH0's validation window ends
  t = int(val0[len(val0) // 2])
  moved = _perturb_after(frame, {'SYNTH0': t + 1}, seed=2)
  other = D.build_dataset(moved, config)
  assert other.scaler == ds.scaler
  np.testing.assert_array_equal(other.windows([t]), ds.windows([t]))
  rows = slice(t - 47, t + 1)   # every row whose regime window reaches past t
  assert np.mean(other.labels.regime[rows] != ds.labels.regime[rows]) > 0.2
  assert not np.array_equal(other.labels.direction[t - 11:t + 1], ds.labels.direction[t - 11:t + 1])
  np.testing.assert_array_equal(other.labels.direction[:t - 47], ds.labels.direction[:t - 47])


def test_scaler_fitted_on_training_windows_only(ds, frame, config):
  raw, _ = features.compute_features({c: frame[c].to_numpy()[:N_BARS] for c in D._PRICE_COLUMNS})
  raw = np.asarray(raw, np.float64)
  b = ds.bounds[0]
  train = ds.ends['train'][ds.ends['train'] < b['stop']]
  rows_sym0 = np.arange(train.min() - ds.window + 1, train.max() + 1)
  assert ds.scaler['rows'] > len(rows_sym0)          # symbol 1's training rows are in it too
  raw1, _ = features.compute_features({c: frame[c].to_numpy()[N_BARS:] for c in D._PRICE_COLUMNS})
  train1 = ds.ends['train'][ds.ends['train'] >= N_BARS] - N_BARS
  rows_sym1 = np.arange(train1.min() - ds.window + 1, train1.max() + 1)
  both = np.concatenate([raw[rows_sym0], np.asarray(raw1, np.float64)[rows_sym1]])
  assert ds.scaler['rows'] == len(both)
  np.testing.assert_allclose(ds.scaler['center'], np.median(both, axis=0), rtol=1e-6, atol=1e-9)
  assert np.all(np.abs(ds.features[ds.ends['train']]) <= config.dataset.scaler_clip)
  assert len(ds.scaler['center']) == len(ds.feature_names) == ds.num_features
  json.dumps(ds.scaler)


def test_apply_scaler_numpy_and_jitted_jax_agree(ds):
  x = np.random.default_rng(0).normal(0, 3, (7, ds.num_features)).astype(np.float32)
  x[0, 0] = np.nan
  expected = D.apply_scaler(x, ds.scaler)
  got = jax.jit(lambda a: D.apply_scaler(a, ds.scaler))(jnp.asarray(x))
  assert isinstance(expected, np.ndarray) and expected.dtype == np.float32 and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, atol=1e-6)
  assert np.isnan(expected[0, 0]) and np.nanmax(np.abs(expected)) <= ds.scaler['clip']


def test_windows_never_cross_a_time_gap(frame):
  # Weekends are 193-bar gaps (allowed with a limit of 250 bars); a 4-day hole after row 3000 of SYNTH0 is not.
  config = _config(max_gap_bars=250)
  gapped = frame.copy()
  cut = 3000
  gapped.loc[cut:N_BARS - 1, 'time'] += pd.Timedelta('4D')
  ds = D.build_dataset(gapped, config)
  ends = np.concatenate(list(ds.ends.values()))
  assert not np.any((ends - ds.window + 1 <= cut - 1) & (ends >= cut))
  assert np.any(ends == cut + ds.window - 1) and np.any(ends == cut - 1)
  # Labels never span the gap either.
  rows = np.arange(cut - 48, cut)
  assert np.all(ds.labels.regime[rows] == -1)
  assert np.all(ds.labels.buy[cut - 12:cut] == -1) and ds.labels.buy[cut - 13] >= 0


def test_batches_fixed_shape_with_mask(ds):
  ends = ds.split_ends('val')
  batches = list(ds.batches('val', 64, seed=3, shuffle=False))
  assert len(batches) == -(-len(ends) // 64)
  for b in batches:
    assert b['x'].shape == (64, ds.window, ds.num_features) and b['x'].dtype == np.float32
    assert all(b[k].shape == (64,) and b[k].dtype == np.int32 for k in L.TASKS)
    assert b['mask'].dtype == np.float32 and b['weight'].dtype == np.float32 and b['end'].dtype == np.int64
  last = batches[-1]
  live = int(last['mask'].sum())
  assert live == len(ends) - 64 * (len(batches) - 1) and 0 < live < 64
  assert np.all(last['buy'][live:] == -1) and np.all(last['weight'][live:] == 0)
  np.testing.assert_array_equal(np.concatenate([b['end'][b['mask'] > 0] for b in batches]), ends)
  np.testing.assert_array_equal(last['x'][:live], ds.windows(last['end'][:live]))
  np.testing.assert_array_equal(last['direction'][:live], ds.labels.direction[last['end'][:live]])
  dropped = list(ds.batches('val', 64, seed=3, drop_remainder=True))
  assert len(dropped) == len(batches) - 1 and all(b['mask'].min() == 1 for b in dropped)


def test_batches_deterministic_and_shardable(ds):
  take = lambda seed: [b['end'] for b in ds.batches('train', 128, seed=seed)]
  a, b, c = take(5), take(5), take(6)
  assert all(np.array_equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)
  assert not np.array_equal(a[0], c[0])
  seen = np.concatenate(a)[:len(ds.split_ends('train'))]
  np.testing.assert_array_equal(np.sort(seen), ds.split_ends('train'))
  with pytest.raises(UserError, match='num_shards'):
    next(ds.batches('train', 100, num_shards=8))
  full = next(ds.batches('train', 128, seed=5, num_shards=4))
  parts = [next(ds.batches('train', 128, seed=5, num_shards=4, shard_index=i)) for i in range(4)]
  assert parts[0]['x'].shape[0] == 32
  np.testing.assert_array_equal(np.concatenate([p['end'] for p in parts]), full['end'])


def test_unlabelled_windows_for_pretraining(ds):
  labelled, everything = ds.split_ends('test'), ds.split_ends('test', labelled=False)
  assert len(everything) > len(labelled)
  tail = np.setdiff1d(everything, labelled)
  assert np.all(ds.labels.buy[tail] == -1) and np.all(ds.labels.regime[tail] == -1)
  seen = np.concatenate([b['end'][b['mask'] > 0] for b in ds.batches('test', 256, labelled=False)])
  np.testing.assert_array_equal(np.sort(seen), everything)


def test_summary_class_weights_and_regime_agreement(ds):
  s = ds.summary()
  json.dumps(s)
  for split in D.SPLITS:
    shares = s['splits'][split]['class_shares']
    assert all(abs(sum(v.values()) - 1) < 1e-9 for v in shares.values())
  train_dir = s['splits']['train']['class_shares']['direction']
  assert abs(train_dir['NEUTRAL'] - 1 / 3) < 0.03
  weights = ds.class_weights['direction']
  assert len(weights) == 3 and abs(np.mean(weights) - 1) < 1e-9
  y = ds.labels.direction[ds.ends['train']]
  np.testing.assert_allclose(weights, L.class_weights(y, 3))
  agreement = s['regime_agreement']
  print('\nsummary regime agreement:', {k: round(v['agreement'], 4) for k, v in agreement.items()})
  assert agreement['val']['agreement'] >= 0.7 and agreement['test']['agreement'] >= 0.7
  assert set(s['thresholds']) == {'SYNTH0', 'SYNTH1'}


def test_split_by_dates(frame):
  times = pd.DatetimeIndex(frame['time'][:N_BARS])
  d1, d2 = times[3200].strftime('%Y-%m-%d %H:%M'), times[4100].strftime('%Y-%m-%d %H:%M')
  ds = D.build_dataset(frame, _config(split_dates=(d1, d2)))
  b = ds.bounds[0]
  assert (b['train_end'], b['val_end']) == (3200, 4100)
  assert ds.ends['val'][0] == 3200 + ds.purge and ds.ends['train'][ds.ends['train'] < N_BARS].max() == 3199
  with pytest.raises(UserError, match='split_dates'):
    D.build_dataset(frame, _config(split_dates=(d2, d1)))


def test_config_errors(frame):
  with pytest.raises(UserError, match='purge'):
    D.build_dataset(frame, _config(purge=10))
  with pytest.raises(UserError, match='split'):
    D.build_dataset(frame, _config(split=(0.8, 0.3, 0.1)))
  assert {k: dataset_config.labels_section()[k] for k in dataset_config.REGIME_LABEL_KEYS} == \
      {k: L.DEFAULTS[k] for k in dataset_config.REGIME_LABEL_KEYS}


def test_run_phase_writes_summary(tmp_path, config, market, monkeypatch):
  from natron import data as data_lib
  on_grid = market[0].copy()
  on_grid.attrs = {**market[0].attrs, 'true_regime': market[1]}
  monkeypatch.setattr(data_lib, 'load_market', lambda data_config: on_grid)
  result = D.run_phase(config, str(tmp_path))
  with open(os.path.join(tmp_path, 'dataset', 'summary.json')) as f:
    summary = json.load(f)
  assert summary['symbols'] == ['SYNTH0', 'SYNTH1']
  assert result['train_windows'] == summary['splits']['train']['windows'] > 0
  assert result['test_regime_agreement'] >= 0.7
  md = open(os.path.join(tmp_path, 'dataset', 'summary.md')).read()
  assert '| train |' in md and 'purge' in md


# --------------------------------------------------------------------------------------------------
# Several symbols on one calendar (issue 9, item 6): frames built here, on a 5-digit grid.
# --------------------------------------------------------------------------------------------------
SLOT = pd.Timedelta('15min')
T0 = pd.Timestamp('2024-01-01', tz='UTC')


def _grid_bars(symbol, slots, seed):
  """N_BARS bars of `symbol` at 15-minute `slots` after T0: prices on a 1e-5 grid at ~1.1, integer volumes,
  spreads of whole points (in price units)."""
  assert len(slots) == N_BARS   # one frame length in this file: the feature graph compiles once
  rng = np.random.default_rng(seed)
  ticks = np.round(110_000 * np.exp(np.cumsum(rng.normal(0, 3e-4, N_BARS))))      # closes in points
  open_ = np.r_[ticks[0], ticks[:-1]]
  high = np.maximum(open_, ticks) + rng.integers(0, 15, N_BARS)
  low = np.minimum(open_, ticks) - rng.integers(0, 15, N_BARS)
  return pd.DataFrame({'time': T0 + SLOT * np.asarray(slots), 'open': open_ * POINT, 'high': high * POINT,
                       'low': low * POINT, 'close': ticks * POINT,
                       'volume': rng.integers(1, 500, N_BARS).astype(np.float64),
                       'spread': rng.integers(1, 4, N_BARS) * POINT, 'symbol': symbol})


def _market_of(*parts):
  return pd.concat(parts, ignore_index=True)


@pytest.fixture(scope='module')
def uneven():
  """A: 15-minute bars from T0; B starts 500 slots later and misses 400 of its 5400 slots (another calendar)."""
  rng = np.random.default_rng(7)
  b_slots = 500 + np.sort(rng.choice(5400, N_BARS, replace=False))
  frame = _market_of(_grid_bars('A', np.arange(N_BARS), 1), _grid_bars('B', b_slots, 2))
  config = _config(split=(0.6, 0.2, 0.2))
  return frame, config, D.build_dataset(frame, config)


def _times(ds, rows):
  return pd.DatetimeIndex(ds.time[rows]).tz_localize('UTC')


def test_splits_share_one_calendar_and_no_label_crosses_into_a_later_split_of_any_symbol(uneven):
  frame, config, ds = uneven
  union = np.unique(pd.DatetimeIndex(frame['time']).asi8)
  c1, c2 = union[int(round(0.6 * len(union)))], union[int(round(0.8 * len(union)))]
  assert ds.info['split_times'] == [pd.Timestamp(c1, tz='UTC').isoformat(), pd.Timestamp(c2, tz='UTC').isoformat()]
  ns = ds.time.astype('datetime64[ns]').astype(np.int64)
  parts = {b['symbol']: {s: e[(e >= b['start']) & (e < b['stop'])] for s, e in ds.ends.items()} for b in ds.bounds}
  for sym, p in parts.items():
    assert all(len(p[s]) for s in D.SPLITS), sym
    # Every symbol is cut at the same dates: its training rows before c1, validation in [c1, c2), test after c2.
    assert ns[p['train']].max() < c1 <= ns[p['val'] - ds.window + 1].min()
    assert ns[p['val']].max() < c2 <= ns[p['test'] - ds.window + 1].min()
  for b in ds.bounds:   # and purged in its own bars
    p = parts[b['symbol']]
    b1 = b['start'] + np.searchsorted(ns[b['start']:b['stop']], c1)
    b2 = b['start'] + np.searchsorted(ns[b['start']:b['stop']], c2)
    assert p['val'].min() - b1 >= ds.purge and p['test'].min() - b2 >= ds.purge
  # By timestamp, across symbols: the last bar a training (validation) label of ANY symbol reads lies before
  # the first row of the first validation (test) window of ANY symbol.
  label_end = lambda e: ns[np.maximum(ds.labels.t1[e], e)].max()
  window_start = lambda e: ns[e - ds.window + 1].min()
  for a in parts:
    for b in parts:
      assert label_end(parts[a]['train']) < window_start(parts[b]['val']), (a, b)
      assert label_end(parts[a]['val']) < window_start(parts[b]['test']), (a, b)
      assert label_end(parts[a]['train']) < window_start(parts[b]['test']), (a, b)
  # B's sparser calendar makes its last training labels reach past A's first validation window: the calendar
  # purge dropped them (a per-symbol purge alone would not).
  assert ds.info['calendar_purged'].get('train', 0) > 0
  s = ds.summary()
  assert s['split_times'] == ds.info['split_times'] and 'one calendar' in D.summary_markdown(s)


def test_single_symbol_split_is_unchanged_by_the_common_calendar(uneven):
  frame, config, _ = uneven
  one = D.build_dataset(frame[frame['symbol'] == 'A'].reset_index(drop=True), config)
  (b,) = one.bounds
  assert (b['train_end'], b['val_end']) == (3000, 4000)          # round(0.6 * 5000), round(0.8 * 5000)
  assert one.ends['train'].max() == 2999 and one.ends['val'].min() == 3000 + one.purge
  assert one.ends['test'].min() == 4000 + one.purge and not one.info['calendar_purged']
  # Walk-forward: exactly the generic generator over its window ends.
  ends = np.unique(np.concatenate([one.split_ends(s) for s in D.SPLITS]))
  expected = list(D.walk_forward_splits(ends, n_folds=3, test_size=len(ends) // 4, gap=one.purge))
  for (tr, te), (etr, ete) in zip(one.walk_forward(3), expected):
    np.testing.assert_array_equal(tr, etr)
    np.testing.assert_array_equal(te, ete)


def test_walk_forward_folds_test_the_same_dates_for_every_symbol(uneven):
  _, _, ds = uneven
  ns = ds.time.astype('datetime64[ns]').astype(np.int64)
  every = np.unique(np.concatenate([ds.split_ends(s) for s in D.SPLITS]))
  previous_end = None
  for train, test in ds.walk_forward(3):
    lo, hi = ns[test].min(), ns[test].max()
    for b in ds.bounds:   # each symbol is tested on all of its windows inside the fold's common block
      mine = every[(every >= b['start']) & (every < b['stop'])]
      np.testing.assert_array_equal(test[(test >= b['start']) & (test < b['stop'])],
                                    mine[(ns[mine] >= lo) & (ns[mine] <= hi)])
      assert np.any((test >= b['start']) & (test < b['stop']))
    assert ns[np.maximum(ds.labels.t1[train], train)].max() < ns[test - ds.window + 1].min()
    if previous_end is not None:
      assert lo > previous_end
    previous_end = hi


def test_symbols_without_rows_in_a_split_are_reported_not_fatal():
  # A ends before the validation split, C before the test split, E starts after the validation split.
  frame = _market_of(_grid_bars('A', np.arange(N_BARS), 1), _grid_bars('C', 2000 + np.arange(N_BARS), 2),
                     _grid_bars('E', 7000 + np.arange(N_BARS), 3))
  ds = D.build_dataset(frame, _config(split=(0.5, 0.25, 0.25)))
  info = ds.info
  assert set(info['excluded']) == {'E'} and 'no training windows' in info['excluded']['E']
  assert info['empty_splits'] == {'A': ['val', 'test'], 'C': ['test']}
  e_bound = ds.bounds[2]
  for s in D.SPLITS:
    assert not np.any((ds.ends[s] >= e_bound['start']) & (ds.ends[s] < e_bound['stop']))
  assert len(ds.ends['val']) and len(ds.ends['train'])
  summary = ds.summary()
  json.dumps(summary, default=str)
  md = D.summary_markdown(summary)
  assert 'E is left out of every split' in md and 'A has no val / test windows' in md
  with pytest.raises(UserError, match='no symbol has training windows'):
    D.build_dataset(frame[frame['symbol'] == 'E'].reset_index(drop=True), _config(split=(0.1, 0.45, 0.45)))
