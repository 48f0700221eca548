"""natron.data: loaders (CSV, MetaTrader 5, Parquet, frames), validation rules, repair, market assembly and
the synthetic market's guarantees (determinism, OHLC realism, calendar, learnable structure)."""
import json

import hypothesis
import ml_collections
import numpy as np
import pandas as pd
import pytest
from hypothesis import strategies as st

from natron.data import (REGIMES, DataError, load_market, load_ohlcv, ohlcv_summary, repair_order,
                         synthetic_market, validate_ohlcv)
from natron.data import synthetic
from natron.errors import UserError

MT5_HEADER = '<DATE>\t<TIME>\t<OPEN>\t<HIGH>\t<LOW>\t<CLOSE>\t<TICKVOL>\t<VOL>\t<SPREAD>\n'


@pytest.fixture(scope='module')
def small():
  frame, regime = synthetic_market(400, seed=3)
  return frame, regime


@pytest.fixture(scope='module')
def market():
  """A long series for the statistical checks (one generation shared by them)."""
  return synthetic_market(40_000, seed=0)


def _csv(tmp_path, frame, name='data.csv'):
  path = tmp_path / name
  frame.to_csv(path, index=False, date_format='%Y-%m-%d %H:%M:%S')
  return path


def _mt5(tmp_path, frame, real_volume=None, name='EURUSD_M15.csv', encoding='utf-8', with_time=True,
         newline='\n'):
  """Writes `frame` the way MetaTrader 5's "Export bars" does (tab-separated, dotted dates, points)."""
  vol = np.zeros(len(frame), np.int64) if real_volume is None else real_volume
  lines = [MT5_HEADER if with_time else MT5_HEADER.replace('<TIME>\t', '')]
  for i, row in enumerate(frame.itertuples(index=False)):
    stamp = f"{row.time:%Y.%m.%d}\t{row.time:%H:%M:%S}" if with_time else f"{row.time:%Y.%m.%d}"
    lines.append(f"{stamp}\t{row.open:.5f}\t{row.high:.5f}\t{row.low:.5f}\t{row.close:.5f}\t"
                 f"{int(row.volume)}\t{vol[i]}\t{i % 7 + 3}\n")
  path = tmp_path / name
  path.write_text(''.join(lines), encoding=encoding, newline=newline)
  return path


def _rounded(frame):
  """The frame as a 5-decimal export holds it (rounding keeps high/low consistent: it is monotone)."""
  out = frame.copy()
  for c in ('open', 'high', 'low', 'close'):
    out[c] = out[c].round(5)
  return out


# --------------------------------------------------------------------------------------------- formats

def test_csv_round_trip_keeps_values_types_and_spread(tmp_path, small):
  frame, _ = small
  loaded = load_ohlcv(_csv(tmp_path, frame))
  assert list(loaded.columns) == ['time', 'open', 'high', 'low', 'close', 'volume', 'spread']
  assert str(loaded['time'].dtype) == 'datetime64[ns, UTC]'
  assert all(loaded[c].dtype == np.float64 for c in ('open', 'high', 'low', 'close', 'volume', 'spread'))
  assert (loaded['time'] == frame['time']).all()
  np.testing.assert_allclose(loaded[['open', 'high', 'low', 'close', 'spread']], frame[
      ['open', 'high', 'low', 'close', 'spread']], rtol=1e-15)
  assert loaded.attrs['volume_source'] == 'volume'


def test_seed_csv_without_spread_and_with_aliases(tmp_path):
  text = ('timestamp,Open,High,Low,Close,Volume,comment\n'
          '2023-01-01 00:00:00,1.0500,1.0520,1.0490,1.0510,10000,a\n'
          '2023-01-01 00:15:00,1.0510,1.0530,1.0505,1.0525,12000,b\n')
  path = tmp_path / 'seed.csv'
  path.write_text(text)
  loaded = load_ohlcv(path)
  assert list(loaded.columns) == ['time', 'open', 'high', 'low', 'close', 'volume']
  assert loaded['time'].iloc[1] == pd.Timestamp('2023-01-01 00:15', tz='UTC')
  assert loaded['volume'].tolist() == [10000.0, 12000.0]
  assert loaded.attrs['ignored_columns'] == ['comment']


def test_mt5_export_uses_tick_volume_when_real_volume_is_zero(tmp_path, small):
  frame = _rounded(small[0].head(50))
  loaded = load_ohlcv(_mt5(tmp_path, frame))
  assert loaded.attrs['volume_source'] == 'tick_volume'
  np.testing.assert_array_equal(loaded['volume'], frame['volume'])
  np.testing.assert_array_equal(loaded['close'], frame['close'])
  assert (loaded['time'] == frame['time']).all()
  # Points are kept raw; without a point size there is no price-unit spread to guess.
  assert 'spread' not in loaded
  np.testing.assert_array_equal(loaded['spread_points'], np.arange(50) % 7 + 3)


def test_mt5_export_prefers_real_volume_and_converts_spread_with_point(tmp_path, small):
  frame = _rounded(small[0].head(30))
  real = np.arange(30) + 100
  loaded = load_ohlcv(_mt5(tmp_path, frame, real_volume=real), point=1e-5)
  assert loaded.attrs['volume_source'] == 'real_volume'
  np.testing.assert_array_equal(loaded['volume'], real)
  np.testing.assert_allclose(loaded['spread'], (np.arange(30) % 7 + 3) * 1e-5)


def test_mt5_utf16_crlf_daily_export_and_broker_time_zone(tmp_path, small):
  frame = _rounded(small[0].iloc[::96].head(5))   # one bar per day at 00:00
  path = _mt5(tmp_path, frame, encoding='utf-16', with_time=False, newline='\r\n')
  loaded = load_ohlcv(path, tz='Etc/GMT-2')       # broker server time UTC+2
  expected = frame['time'].dt.tz_localize(None).dt.tz_localize('Etc/GMT-2').dt.tz_convert('UTC')
  assert (loaded['time'] == expected.reset_index(drop=True)).all()
  assert loaded['time'].iloc[0] == pd.Timestamp('2020-01-05 22:00', tz='UTC')


def test_mt5_python_api_frame_epoch_seconds(small):
  frame = small[0].head(20)
  rates = pd.DataFrame({'time': frame['time'].astype('int64') // 10**9, 'open': frame['open'],
                        'high': frame['high'], 'low': frame['low'], 'close': frame['close'],
                        'tick_volume': frame['volume'].astype(np.int64), 'spread': 12,
                        'real_volume': 0})
  loaded = load_ohlcv(rates, point=1e-5)
  assert (loaded['time'] == frame['time']).all()
  assert loaded.attrs['volume_source'] == 'tick_volume'
  np.testing.assert_allclose(loaded['spread'], 12e-5)


def test_mt5_export_with_a_bad_value_names_its_line_and_parses_the_rest(tmp_path, small):
  path = _mt5(tmp_path, _rounded(small[0].head(20)))
  lines = path.read_text().splitlines(keepends=True)
  fields = lines[9].split('\t')
  fields[5] = '1,10385'                   # a decimal comma in <CLOSE> of data row 8
  lines[9] = '\t'.join(fields)
  fields = lines[13].split('\t')
  fields[6] = 'abc'                       # text in <TICKVOL> of data row 12
  lines[13] = '\t'.join(fields)
  path.write_text(''.join(lines))
  with pytest.raises(DataError) as info:
    load_ohlcv(path)
  # Only the broken cells are reported (once: not again as NaN volume), and the dotted dates still parse
  # on the slow diagnostic path.
  assert [(rule, rows.tolist()) for rule, rows in info.value.violations] == [
      ('close must be numeric', [8]), ('tick_volume must be numeric', [12])]
  assert "row 8 (line 10) [close='1,10385']" in str(info.value)


def test_time_indexed_frame_and_header_only_file(tmp_path, small):
  frame = small[0].head(10)
  loaded = load_ohlcv(frame.set_index('time'))
  pd.testing.assert_frame_equal(loaded, frame)
  header_only = tmp_path / 'header.csv'
  header_only.write_text('time,open,high,low,close,volume\n')
  with pytest.raises(DataError, match='no rows'):
    load_ohlcv(header_only)


def test_parquet_round_trip(tmp_path, small):
  frame, _ = small
  path = tmp_path / 'bars.parquet'
  frame.to_parquet(path)
  loaded = load_ohlcv(path, symbol='EURUSD')
  pd.testing.assert_frame_equal(loaded.drop(columns='symbol'), frame)
  assert (loaded['symbol'] == 'EURUSD').all()


def test_frame_input_is_not_modified_and_offsets_become_utc(small):
  frame = small[0].head(10)
  before = frame.copy()
  text = frame.assign(time=frame['time'].dt.tz_convert('Europe/Berlin').astype(str))
  loaded = load_ohlcv(text)
  pd.testing.assert_frame_equal(frame, before)
  assert (loaded['time'] == frame['time']).all()


def test_point_without_mt5_spread_and_bad_inputs_are_user_errors(tmp_path, small):
  with pytest.raises(DataError, match='no MetaTrader spread'):
    load_ohlcv(small[0].head(5), point=1e-5)
  with pytest.raises(DataError, match='no such file'):
    load_ohlcv(tmp_path / 'missing.csv')
  empty = tmp_path / 'empty.csv'
  empty.write_text('')
  with pytest.raises(DataError, match='empty'):
    load_ohlcv(empty)
  with pytest.raises(DataError, match='expected a path or a pandas DataFrame'):
    load_ohlcv(42)
  assert issubclass(DataError, UserError) and issubclass(DataError, ValueError)


# ------------------------------------------------------------------------------------------ validation

def _broken(frame, row, **values):
  out = frame.copy()
  for column, value in values.items():
    if isinstance(value, str) and column != 'time':
      out[column] = out[column].astype(object)
    out.loc[row, column] = value
  return out


RULES = [
    ('open must be numeric', dict(open='abc')),
    ('close must be finite', dict(close=np.nan)),
    ('volume must be finite', dict(volume=np.inf)),
    ('prices must be > 0', dict(low=-1.0)),
    ('prices must be > 0', dict(open=0.0, low=0.0)),
    ('high >= max(open, close)', dict(high=0.5)),
    ('low <= min(open, close)', dict(low=5.0)),
    ('volume >= 0', dict(volume=-3.0)),
    ('spread >= 0', dict(spread=-1e-5)),
    ('time must be a valid timestamp', dict(time='not a time')),
]


@pytest.mark.parametrize('rule, values', RULES, ids=[f'{r}-{list(v)[0]}' for r, v in RULES])
def test_each_value_rule_names_the_row(small, rule, values):
  frame = small[0].head(40).copy()
  if 'time' in values:
    frame['time'] = frame['time'].astype(str)
  with pytest.raises(DataError) as info:
    load_ohlcv(_broken(frame, 17, **values))
  message = str(info.value)
  assert rule in message and 'row 17 ' in message and '1 row(s)' in message
  assert any(r.startswith(rule) and list(rows) == [17] for r, rows in info.value.violations)


@pytest.mark.parametrize('rule, source_row', [('timestamps must not repeat', 11),
                                               ('timestamps must increase', 3)])
def test_time_order_rules_name_the_row(small, rule, source_row):
  frame = small[0].head(40).copy()
  frame.loc[12, 'time'] = frame.loc[source_row, 'time']
  with pytest.raises(DataError, match='row 12 ') as info:
    load_ohlcv(frame)
  assert rule in str(info.value) and 'repair=True' in str(info.value)


def test_missing_columns_are_named(small):
  with pytest.raises(DataError, match=r"missing column\(s\) \['high', 'volume'\]"):
    load_ohlcv(small[0].drop(columns=['high', 'volume']))


def test_file_errors_give_line_numbers_and_list_first_rows_with_count(tmp_path, small):
  frame = small[0].head(60).copy()
  frame.loc[[5, 9, 20, 21, 30, 31, 40], 'high'] = 0.5
  frame['volume'] = frame['volume'].astype(object)
  frame.loc[44, 'volume'] = 'n/a?'
  with pytest.raises(DataError) as info:
    load_ohlcv(_csv(tmp_path, frame))
  message = str(info.value)
  assert "rule 'high >= max(open, close)' broken in 7 row(s): row 5 (line 7)" in message
  assert 'row 30 (line 32)' in message and 'row 31' not in message and 'and 2 more' in message
  assert "rule 'volume must be numeric' broken in 1 row(s): row 44 (line 46)" in message
  assert dict(info.value.violations)['high >= max(open, close)'].tolist() == [5, 9, 20, 21, 30, 31, 40]


def test_gaps_are_legal_and_counted(small):
  frame = small[0]
  gapped = frame.drop(index=[100, 101, 102]).reset_index(drop=True)
  summary = ohlcv_summary(load_ohlcv(gapped))
  # 400 bars span 4 full days + 16 bars: no weekend, so the one gap is the hole we punched.
  assert summary['rows'] == 397 and summary['gaps'] == 1
  assert summary['median_interval_s'] == 900.0 and summary['largest_gap_s'] == 4 * 900.0
  assert summary['largest_gap_after'] == frame['time'].iloc[99].isoformat()
  assert json.loads(json.dumps(summary)) == summary


def test_symbol_column_validates_order_per_symbol(small):
  a = small[0].head(30).assign(symbol='A')
  b = small[0].head(30).assign(symbol='B')
  loaded = load_ohlcv(pd.concat([a, b], ignore_index=True))   # same times in two symbols are fine
  assert loaded['symbol'].tolist() == ['A'] * 30 + ['B'] * 30
  bad = pd.concat([a, b.iloc[::-1]], ignore_index=True)
  with pytest.raises(DataError, match='timestamps must increase.* 29 row'):
    load_ohlcv(bad)
  # Interleaved symbols are valid (each in time order) and come back grouped, each in its own order.
  interleaved = pd.concat([a, b]).sort_values('time', kind='stable').reset_index(drop=True)
  grouped = load_ohlcv(interleaved)
  pd.testing.assert_frame_equal(grouped, loaded)
  assert grouped.attrs['source'] == 'frame'


def test_validate_ohlcv_checks_a_canonical_frame(small):
  frame = small[0].head(20)
  validate_ohlcv(frame)
  with pytest.raises(DataError, match=r"(?s)live feed: .*'volume >= 0' broken in 1 row\(s\): row 2 "):
    validate_ohlcv(frame.assign(volume=np.r_[1.0, 1.0, -1.0, np.ones(17)]), source='live feed')


# ---------------------------------------------------------------------------------------------- repair

def test_repair_sorts_drops_duplicates_and_reports_exact_counts(tmp_path, small):
  frame = small[0].head(50)
  shuffled = pd.concat([frame.iloc[:10], frame.iloc[[40]], frame.iloc[10:40], frame.iloc[41:],
                        frame.iloc[[7]], frame.iloc[[20]].assign(close=frame['close'].iloc[20] * 1.0)],
                       ignore_index=True)
  conflicting = frame.iloc[[25]].assign(volume=1.0)
  messy = pd.concat([shuffled, conflicting], ignore_index=True)
  with pytest.raises(DataError):
    load_ohlcv(messy)
  repaired = load_ohlcv(_csv(tmp_path, messy), repair=True)
  pd.testing.assert_frame_equal(repaired, frame, check_exact=False, rtol=1e-15)
  moved = np.count_nonzero(np.argsort(messy['time'].to_numpy(), kind='stable') != np.arange(53))
  assert repaired.attrs['repair_report'] == {
      'rows_in': 53, 'rows_out': 50, 'decreasing_steps': 2, 'rows_moved': moved, 'duplicates_dropped': 3,
      'conflicting_duplicates': 1}


def test_repair_counts_on_a_tiny_series():
  times = pd.to_datetime(['2024-01-01 00:00', '2024-01-01 00:30', '2024-01-01 00:15', '2024-01-01 00:30',
                          '2024-01-01 00:30', '2024-01-01 00:45'], utc=True)
  frame = pd.DataFrame({'time': times, 'open': 1.0, 'high': 1.0, 'low': 1.0, 'close': 1.0,
                        'volume': [1.0, 2.0, 3.0, 2.0, 5.0, 6.0]})
  repaired, report = repair_order(frame)
  # Sorted: rows 0, 2, 1, 3, 4, 5 -> rows 1 and 2 moved; rows 3 (identical to 1) and 4 (volume differs) go.
  assert repaired['volume'].tolist() == [1.0, 3.0, 2.0, 6.0]
  assert report == {'rows_in': 6, 'rows_out': 4, 'decreasing_steps': 1, 'rows_moved': 2,
                    'duplicates_dropped': 2, 'conflicting_duplicates': 1}


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(st.lists(st.integers(0, 30), min_size=1, max_size=60))
def test_repair_property_any_order_and_repeats(minutes):
  """For any sequence of bar times (repeats, any order): the result is strictly increasing, keeps every
  distinct time once, keeps the first row given for each time, and the counts add up."""
  times = pd.Timestamp('2024-01-01', tz='UTC') + pd.to_timedelta(np.array(minutes) * 15, 'min')
  frame = pd.DataFrame({'time': times, 'open': 1.0, 'high': 2.0, 'low': 0.5, 'close': 1.0,
                        'volume': np.arange(len(minutes), dtype=float)})   # volume = input position
  repaired = load_ohlcv(frame, repair=True)
  report = repaired.attrs['repair_report']
  assert repaired['time'].is_monotonic_increasing and repaired['time'].is_unique
  assert list(repaired['time']) == sorted(set(times))
  first_seen = {m: i for i, m in reversed(list(enumerate(minutes)))}
  assert repaired['volume'].tolist() == [float(first_seen[m]) for m in sorted(first_seen)]
  assert report['rows_in'] - report['rows_out'] == report['duplicates_dropped'] == len(minutes) - len(first_seen)
  assert report['decreasing_steps'] == int(np.count_nonzero(np.diff(minutes) < 0))
  assert report['conflicting_duplicates'] == report['duplicates_dropped']   # volumes differ by construction


def test_repair_does_not_fix_values(small):
  frame = small[0].head(20).copy()
  frame.loc[4, 'low'] = 99.0
  with pytest.raises(DataError, match='low <= min'):
    load_ohlcv(frame, repair=True)


# ---------------------------------------------------------------------------------------------- market

def _data_config(**overrides):
  cfg = ml_collections.ConfigDict(dict(path='', synthetic_bars=500, synthetic_seed=4, synthetic_symbols=1,
                                       timeframe='15min', repair=False))
  cfg.update(overrides)
  return cfg


def test_load_market_synthetic_single_and_multiple_symbols():
  one = load_market(_data_config())
  expected, _ = synthetic_market(500, seed=4)
  pd.testing.assert_frame_equal(one.drop(columns='symbol'), expected)
  assert set(one['symbol']) == {'SYNTH'}
  many = load_market(_data_config(synthetic_symbols=3))
  assert many.groupby('symbol').size().to_dict() == {'SYNTH0': 500, 'SYNTH1': 500, 'SYNTH2': 500}
  assert not np.allclose(many['close'].iloc[:500], many['close'].iloc[500:1000])
  twelve = load_market(_data_config(synthetic_bars=50, synthetic_symbols=12))
  assert list(twelve['symbol'].unique()) == [f'SYNTH{i:02d}' for i in range(12)]
  with pytest.raises(UserError, match='synthetic_symbols must be >= 1'):
    load_market(_data_config(synthetic_symbols=0))
  with pytest.raises(UserError, match='divide one day'):
    load_market(_data_config(timeframe='7min'))


def test_load_market_files_one_symbol_each_sorted(tmp_path, small):
  frame = small[0]
  b = _csv(tmp_path, frame.iloc[:200], 'GBPUSD.csv')
  a = _mt5(tmp_path, _rounded(frame.iloc[100:300]), name='EURUSD.txt')
  market = load_market(_data_config(path=f'{b}, {a}'))
  assert list(market['symbol'].unique()) == ['EURUSD', 'GBPUSD']
  assert market.equals(market.sort_values(['symbol', 'time'], kind='stable').reset_index(drop=True))
  summary = ohlcv_summary(market)
  assert summary['rows'] == 400 and set(summary['symbols']) == {'EURUSD', 'GBPUSD'}
  with pytest.raises(DataError, match='share the symbol'):
    load_market(_data_config(path=f'{b},{tmp_path / "x" / "GBPUSD.csv"}'))


def test_load_market_file_repair_follows_config(tmp_path, small):
  frame = small[0].head(30)
  path = _csv(tmp_path, pd.concat([frame, frame.iloc[[3]]], ignore_index=True), 'X.csv')
  with pytest.raises(DataError, match='timestamps must increase'):
    load_market(_data_config(path=str(path)))
  repaired = load_market(_data_config(path=str(path), repair=True))
  assert len(repaired) == 30 and repaired.attrs['sources'] == {'X': str(path)}
  assert repaired.attrs['repair_reports']['X']['duplicates_dropped'] == 1


# ------------------------------------------------------------------------------------------- synthetic

def test_synthetic_is_deterministic_per_seed():
  a, ra = synthetic_market(3000, seed=5)
  b, rb = synthetic_market(3000, seed=5)
  c, rc = synthetic_market(3000, seed=6)
  pd.testing.assert_frame_equal(a, b)
  np.testing.assert_array_equal(ra, rb)
  assert not np.allclose(a['close'], c['close']) and not np.array_equal(ra, rc)
  assert ra.dtype == np.int32 and ra.shape == (3000,)
  with pytest.raises(UserError, match='explicit seed'):
    synthetic_market(10, seed=None)
  # Prefix-stable: a longer series with the same seed extends the shorter one bar for bar.
  longer, r_longer = synthetic_market(4500, seed=5)
  pd.testing.assert_frame_equal(longer.iloc[:3000], a)
  np.testing.assert_array_equal(r_longer[:3000], ra)
  one, _ = synthetic_market(1, seed=5)
  pd.testing.assert_frame_equal(one, a.iloc[:1])
  assert a['open'].iloc[0] == synthetic.START_PRICE


def test_synthetic_bars_are_valid_ohlc(market):
  frame, _ = market
  o, h, l, c = (frame[k].to_numpy() for k in ('open', 'high', 'low', 'close'))
  assert (h >= np.maximum(o, c)).all() and (l <= np.minimum(o, c)).all() and (l > 0).all()
  np.testing.assert_array_equal(o[1:], c[:-1])        # open = previous close
  assert (h > l).mean() > 0.999                        # intrabar paths give real ranges
  assert (frame['spread'] > 0).all() and (frame['volume'] >= 1).all()
  assert load_ohlcv(frame) is not None                 # passes every ingestion rule


def test_synthetic_calendar_skips_weekends(market):
  time = market[0]['time']
  assert str(time.dtype) == 'datetime64[ns, UTC]'
  assert time.iloc[0] == pd.Timestamp('2020-01-06 00:00', tz='UTC') and time.iloc[0].dayofweek == 0
  assert time.dt.dayofweek.max() == 4
  steps = time.diff().dropna().value_counts()
  # Only two spacings: one bar, and Friday 23:45 -> Monday 00:00.
  assert set(steps.index) == {pd.Timedelta('15min'), pd.Timedelta('2D 00:15:00')}
  assert steps[pd.Timedelta('2D 00:15:00')] == ohlcv_summary(market[0])['gaps'] == len(time) // 480
  hourly, _ = synthetic_market(60, seed=1, timeframe='1h')
  assert (hourly['time'].diff().iloc[1:24] == pd.Timedelta('1h')).all()
  with pytest.raises(ValueError, match='divide one day'):
    synthetic_market(10, timeframe='7min')


def test_synthetic_regimes_persist_and_all_occur(market):
  _, regime = market
  change = np.flatnonzero(np.diff(regime)) + 1
  durations = np.diff(np.concatenate([[0], change, [len(regime)]]))[1:-1]   # complete segments only
  assert durations.min() >= synthetic.MIN_DURATION
  assert 230 < durations.mean() < 380
  shares = np.bincount(regime, minlength=6) / len(regime)
  assert shares.min() > 0.08, shares


def test_synthetic_drift_and_volatility_depend_on_regime(market):
  frame, regime = market
  r = np.diff(np.log(frame['close'].to_numpy()))
  reg = regime[1:]
  mean = np.array([r[reg == k].mean() for k in range(6)])
  std = np.array([r[reg == k].std() for k in range(6)])
  assert mean[0] > mean[1] > 0 > mean[3] > mean[2]
  # No drift in RANGE / VOLATILE: within 4 standard errors (x1.1 for the AR(1) noise's long-run variance).
  count = np.bincount(reg, minlength=6)
  assert (np.abs(mean[4:]) < 4 * 1.1 * std[4:] / np.sqrt(count[4:])).all(), mean
  assert std[5] > 2 * std[:4].max() and std[4] < std[:4].min()
  spread = frame['spread'].to_numpy() / frame['open'].to_numpy()
  assert np.median(spread[regime == 5]) > 2 * np.median(spread[regime == 0])
  assert 0.5e-4 < np.median(frame['spread'][:200]) < 2e-4        # ~1e-4 at a price near 1.1


def test_synthetic_volume_follows_volatility(market):
  frame, regime = market
  abs_ret = np.abs(np.log(frame['close'] / frame['open'])).to_numpy()
  volume = frame['volume'].to_numpy()
  assert np.corrcoef(abs_ret, volume)[0, 1] > 0.3
  assert np.median(volume[regime == 5]) > 1.8 * np.median(volume[regime == 4])


def _dominant(regime, start, horizon):
  """Most frequent true regime in regime[start:start+horizon] for every start (vectorised counts)."""
  onehot = np.eye(6, dtype=np.int64)[regime]
  counts = np.concatenate([np.zeros((1, 6), np.int64), np.cumsum(onehot, axis=0)])
  return np.argmax(counts[start + horizon] - counts[start], axis=1)


def test_oracle_rule_recovers_true_regimes_from_forward_windows(market):
  """Separability of the generator (not of any labeler): a fixed two-step rule reading only the forward
  48-bar window, against a trailing median of 48-bar vols, matches the window's dominant true regime."""
  frame, regime = market
  horizon, lookback = 48, 1920
  r = np.diff(np.log(frame['close'].to_numpy()))          # r[i]: return of bar i + 1
  windows = np.lib.stride_tricks.sliding_window_view(r, horizon)
  vol, move = windows.std(axis=1), windows.sum(axis=1)     # forward window of bar t is windows[t]
  trailing = pd.Series(vol).shift(horizon).rolling(lookback).median().to_numpy()  # windows ending <= t
  t = np.arange(lookback + horizon, len(windows))
  ratio = vol[t] / trailing[t]
  z = move[t] / (vol[t] * np.sqrt(horizon))
  rule = np.select([ratio > 1.6, z > 5, z > 1.6, z < -5, z < -1.6], [5, 0, 1, 2, 3], default=4)
  truth = _dominant(regime, t + 1, horizon)
  agreement = (rule == truth).mean()
  assert agreement >= 0.80, agreement
  per_class = [(rule[truth == k] == k).mean() for k in range(6)]
  assert min(per_class) > 0.65, dict(zip(REGIMES, np.round(per_class, 3)))


def test_synthetic_direction_depends_on_recent_past(market):
  frame, regime = market
  r = np.diff(np.log(frame['close'].to_numpy()))
  assert np.corrcoef(r[1:], r[:-1])[0, 1] > 0.02
  # Inside one regime the noise itself is AR(1): positive lag-1 autocorrelation after removing the drift.
  same = regime[1:-1] == regime[2:]
  resid = r - np.array([r[regime[1:] == k].mean() for k in range(6)])[regime[1:]]
  trend = same & (regime[2:] < 4)
  assert np.corrcoef(resid[1:][trend], resid[:-1][trend])[0, 1] > 0.03
  # Trend persistence: the sign of the last 48 bars' move predicts the sign of the next 12 bars' move.
  log_close = np.log(frame['close'].to_numpy())
  t = np.arange(48, len(log_close) - 12, 12)
  past, future = log_close[t] - log_close[t - 48], log_close[t + 12] - log_close[t]
  assert (np.sign(past) == np.sign(future)).mean() > 0.6


def test_synthetic_one_million_bars_shape(tmp_path):
  # Size and vectorisation check at scale without timing assertions: 1M bars generate and validate.
  frame, regime = synthetic_market(1_000_000, seed=2)
  assert len(frame) == 1_000_000 and regime.shape == (1_000_000,)
  assert frame['time'].is_monotonic_increasing and frame['close'].between(0.05, 25).all()
