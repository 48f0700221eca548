"""natron.data: loaders (CSV, MetaTrader 5, Parquet, frames), quote grids and spreads in points, broker clocks,
the one candle-rule function and time parser, repair, market assembly, and the synthetic market's guarantees
(determinism, quote grid, OHLC realism, calendar, learnable and realistic structure).

Test data are generated here and look like broker feeds: prices on real quote grids (5-digit FX at ~1.1,
3-digit JPY at ~150, 2-digit stocks) with ties and flat bars, integer tick volumes, spreads in whole points,
broker-time stamps and weekend gaps (24x5).
"""
import json
import logging

import hypothesis
import ml_collections
import numpy as np
import pandas as pd
import pytest
from hypothesis import strategies as st

from natron.data import (REGIMES, DataError, Violation, candle_violations, grid, load_market, load_ohlcv,
                         ohlcv_summary, parse_times, repair_order, synthetic_market, validate_ohlcv)
from natron.data import rules, synthetic, times
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


def _grid_bars(n, *, level, point, seed, start='2024-03-18 00:00', step='1h', calendar='24x5'):
  """Bars built in integer points, as a broker's feed holds them.

  Closes move by a few points per bar (often 0: equal closes), highs and lows stick out by 0..k points
  (repeated highs and lows), ~3% of the bars are flat (open = high = low = close, 1-3 ticks), tick volumes are
  integers, spreads whole points. Times are naive wall-clock (broker) times every `step` from `start`: 24x5
  keeps Monday 00:00 .. Friday's last bar (the weekend gap), 24x7 keeps every bar.
  Returns a frame with naive `time`, prices (float64 on the grid), volume, spread_points.
  """
  rng = np.random.default_rng(seed)
  stamps = pd.date_range(start, periods=n * 2 + 400, freq=step)
  if calendar == '24x5':
    stamps = stamps[stamps.dayofweek < 5]
  stamps = stamps[:n]
  flat = rng.random(n) < 0.03
  move = np.where(flat, 0, rng.integers(-6, 7, n) * rng.integers(0, 4, n))
  close = round(level / point) + np.cumsum(move)
  open_ = np.concatenate([[close[0]], close[:-1]])
  open_[flat] = close[flat]
  high = np.maximum(open_, close) + np.where(flat, 0, rng.geometric(0.3, n) - 1)
  low = np.minimum(open_, close) - np.where(flat, 0, rng.geometric(0.3, n) - 1)
  inverse = round(1 / point)
  to_price = lambda ticks: ticks / inverse   # the double nearest the decimal quote, as a parser reads it
  return pd.DataFrame({'time': stamps, 'open': to_price(open_), 'high': to_price(high), 'low': to_price(low),
                       'close': to_price(close),
                       'volume': np.where(flat, rng.integers(1, 4, n), rng.integers(20, 900, n)).astype(float),
                       'spread_points': rng.integers(2, 25, n).astype(float)})


def _write_mt5(path, bars, digits, real_volume=None):
  """An MT5 "Export bars" file of `bars` (naive broker times, <SPREAD> in points)."""
  real = np.zeros(len(bars), np.int64) if real_volume is None else real_volume
  lines = [MT5_HEADER]
  for i, row in enumerate(bars.itertuples(index=False)):
    lines.append(f"{row.time:%Y.%m.%d}\t{row.time:%H:%M:%S}\t{row.open:.{digits}f}\t{row.high:.{digits}f}\t"
                 f"{row.low:.{digits}f}\t{row.close:.{digits}f}\t{int(row.volume)}\t{real[i]}\t"
                 f"{int(row.spread_points)}\n")
  path.write_text(''.join(lines))
  return path


# --------------------------------------------------------------------------------------------- formats

def test_csv_round_trip_keeps_values_types_and_spread(tmp_path, small):
  frame, _ = small
  loaded = load_ohlcv(_csv(tmp_path, frame))
  assert list(loaded.columns) == ['time', 'open', 'high', 'low', 'close', 'volume', 'spread', 'spread_points']
  assert str(loaded['time'].dtype) == 'datetime64[ns, UTC]'
  assert all(loaded[c].dtype == np.float64 for c in ('open', 'high', 'low', 'close', 'volume', 'spread'))
  assert (loaded['time'] == frame['time']).all()
  # Grid prices are the doubles nearest their decimal text, so the CSV round trip is exact.
  np.testing.assert_array_equal(loaded[['open', 'high', 'low', 'close', 'spread', 'volume']], frame[
      ['open', 'high', 'low', 'close', 'spread', 'volume']])
  assert loaded.attrs['volume_source'] == 'volume'
  assert loaded.attrs['point'] == 1e-5 and loaded.attrs['point_source'] == 'inferred from quote decimals'
  assert loaded.attrs['spread_source'] == 'file, price units' and loaded.attrs['tz'] is None


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
  assert loaded.attrs['spread_source'] is None and loaded.attrs['point'] == 1e-4   # coarsest grid that fits


def test_mt5_export_uses_tick_volume_when_real_volume_is_zero(tmp_path, small, caplog):
  frame = _rounded(small[0].head(50))
  with caplog.at_level(logging.INFO):
    loaded = load_ohlcv(_mt5(tmp_path, frame))
  # The fallback is explicit: recorded and logged as a warning.
  assert loaded.attrs['volume_source'] == 'tick_volume (fallback: real volume is all zero)'
  assert any(r.levelno == logging.WARNING and 'real volume is all zero' in r.getMessage() for r in caplog.records)
  np.testing.assert_array_equal(loaded['volume'], frame['volume'])
  np.testing.assert_array_equal(loaded['close'], frame['close'])
  assert (loaded['time'] == frame['time']).all()
  # Points are kept raw and converted with the point inferred from the 5-decimal quotes (said in the log).
  np.testing.assert_array_equal(loaded['spread_points'], np.arange(50) % 7 + 3)
  np.testing.assert_allclose(loaded['spread'], (np.arange(50) % 7 + 3) * 1e-5, rtol=1e-15)
  assert loaded.attrs['point'] == 1e-5 and loaded.attrs['point_source'] == 'inferred from quote decimals'
  assert loaded.attrs['spread_source'] == 'file, points x point'
  summary = [r.getMessage() for r in caplog.records if 'point 1e-05' in r.getMessage()]
  assert summary and 'inferred from quote decimals' in summary[0] and 'times taken as UTC' in summary[0]


def test_mt5_export_prefers_real_volume_and_converts_spread_with_point(tmp_path, small):
  frame = _rounded(small[0].head(30))
  real = np.arange(30) + 100
  loaded = load_ohlcv(_mt5(tmp_path, frame, real_volume=real), point=1e-5)
  assert loaded.attrs['volume_source'] == 'real_volume' and loaded.attrs['point_source'] == 'config'
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
  assert loaded.attrs['volume_source'] == 'tick_volume (fallback: real volume is all zero)'
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
  plain = small[0].head(5).drop(columns=['spread', 'spread_points'])
  loaded = load_ohlcv(plain, point='1e-5')          # a point is the quote grid too, spread or not
  assert loaded.attrs['point'] == 1e-5 and loaded.attrs['spread_source'] is None
  with pytest.raises(DataError, match='positive price increment'):
    load_ohlcv(plain, point=-1)
  with pytest.raises(DataError, match='not a time zone'):
    load_ohlcv(plain, tz='Mars/Olympus')
  with pytest.raises(DataError, match='no such file'):
    load_ohlcv(tmp_path / 'missing.csv')
  empty = tmp_path / 'empty.csv'
  empty.write_text('')
  with pytest.raises(DataError, match='empty'):
    load_ohlcv(empty)
  with pytest.raises(DataError, match='expected a path or a pandas DataFrame'):
    load_ohlcv(42)
  assert issubclass(DataError, UserError) and issubclass(DataError, ValueError)


# ------------------------------------------------------------------------------- quote grids and costs

@pytest.mark.parametrize('level, point, digits', [(1.1, 1e-5, 5), (150.0, 1e-3, 3), (52.0, 0.01, 2),
                                                   (3000.0, 0.01, 2)])
def test_mt5_spread_points_become_price_units_with_the_inferred_point(tmp_path, level, point, digits):
  bars = _grid_bars(300, level=level, point=point, seed=digits)
  loaded = load_ohlcv(_write_mt5(tmp_path / 'X.csv', bars, digits))
  assert loaded.attrs['point'] == point and loaded.attrs['point_source'] == 'inferred from quote decimals'
  assert loaded.attrs['spread_source'] == 'file, points x point'
  # points x point in float64: within one rounding (2**-53 relative) of the exact decimal spread.
  np.testing.assert_allclose(loaded['spread'], bars['spread_points'] * point, rtol=2**-52)
  np.testing.assert_array_equal(loaded[['open', 'high', 'low', 'close']], bars[['open', 'high', 'low', 'close']])
  assert not grid.off_grid(loaded[['open', 'high', 'low', 'close']].to_numpy(), point).any()
  # The data really has ties and flat bars (what the grid must preserve).
  assert (loaded['high'] == loaded['low']).any() and (loaded['high'].diff() == 0).any()
  # A given point wins (and is said to be the config's).
  given = load_ohlcv(_write_mt5(tmp_path / 'Y.csv', bars, digits), point=str(point))
  assert given.attrs['point_source'] == 'config'
  np.testing.assert_array_equal(given['spread'], loaded['spread'])


def test_prices_off_the_given_grid_name_rows_and_the_fix(tmp_path):
  bars = _grid_bars(120, level=1.1, point=1e-5, seed=1)
  path = _write_mt5(tmp_path / 'EURUSD.csv', bars, 5)
  coarse_ok = ~grid.off_grid(bars[['open', 'high', 'low', 'close']].to_numpy(), 1e-4).any(axis=1)
  with pytest.raises(DataError) as info:
    load_ohlcv(path, point=1e-4)                     # a 4-digit point for 5-digit quotes
  message = str(info.value)
  rows = dict(info.value.violations)[rules.ON_GRID]
  np.testing.assert_array_equal(rows, np.flatnonzero(~coarse_ok))
  assert f'row {rows[0]} (line {rows[0] + 2})' in message and 'set data.point' in message


def test_prices_on_no_decimal_grid_say_to_set_data_point(small):
  frame = small[0].head(30).drop(columns=['spread', 'spread_points'])
  continuous = frame.assign(open=frame['open'] * (1 + 1e-9 * np.pi), high=frame['high'] * (1 + 2e-9 * np.pi))
  with pytest.raises(DataError, match='cannot infer the quote grid.*set data.point'):
    load_ohlcv(continuous)


def test_two_spread_columns_must_agree(small):
  frame = small[0].head(30).copy()
  frame.loc[6, 'spread'] = frame.loc[6, 'spread'] * 2
  with pytest.raises(DataError, match=r"spread must equal spread_points x point.*row 6 "):
    load_ohlcv(frame)


def test_all_zero_volume_is_an_error_or_a_reported_fallback(tmp_path, small, caplog):
  frame = small[0].head(40).drop(columns=['spread_points'])
  with pytest.raises(DataError, match='volume is 0 in every row.*tick volume'):
    load_ohlcv(frame.assign(volume=0.0))
  with caplog.at_level(logging.WARNING):
    loaded = load_ohlcv(frame.assign(tick_volume=frame['volume'], volume=0.0))
  assert loaded.attrs['volume_source'] == 'tick_volume (fallback: volume is all zero)'
  np.testing.assert_array_equal(loaded['volume'], frame['volume'])
  assert any('volume is all zero' in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
  bars = _grid_bars(50, level=1.1, point=1e-5, seed=2).assign(volume=0.0)
  with pytest.raises(DataError, match='volume is 0 in every row'):
    load_ohlcv(_write_mt5(tmp_path / 'FX.csv', bars, 5))    # tick and real volume both zero
  # Some zero-volume bars are fine (quiet bars); only an all-zero column is refused.
  partly = frame.assign(volume=np.where(np.arange(40) % 3 == 0, 0.0, frame['volume']))
  assert load_ohlcv(partly).attrs['volume_source'] == 'volume'


def test_load_market_points_per_symbol_spread_sources_and_order(tmp_path):
  eur = _write_mt5(tmp_path / 'EURUSD.csv', _grid_bars(200, level=1.1, point=1e-5, seed=3), 5)
  jpy = _write_mt5(tmp_path / 'USDJPY.csv', _grid_bars(150, level=150.0, point=1e-3, seed=4,
                                                       start='2024-03-20 00:00'), 3)
  stock = tmp_path / 'ACME.csv'
  bars = _grid_bars(100, level=52.0, point=0.01, seed=5)
  bars.drop(columns='spread_points').to_csv(stock, index=False, date_format='%Y-%m-%d %H:%M:%S')
  market = load_market(_data_config(path=f'{eur},{jpy},{stock}', point='EURUSD=1e-5', tz='EET'))
  assert list(market['symbol'].unique()) == ['ACME', 'EURUSD', 'USDJPY']
  assert market.equals(market.sort_values(['symbol', 'time'], kind='stable').reset_index(drop=True))
  assert market.attrs['points'] == {'ACME': 0.01, 'EURUSD': 1e-5, 'USDJPY': 1e-3}
  assert market.attrs['point_sources'] == {'ACME': 'inferred from quote decimals', 'EURUSD': 'config',
                                           'USDJPY': 'inferred from quote decimals'}
  assert market.attrs['spread_sources'] == {'ACME': None, 'EURUSD': 'file, points x point',
                                            'USDJPY': 'file, points x point'}
  assert market.attrs['tz'] == 'EET' and 'EET' in market.attrs['time_note']
  jpy_rows = market[market['symbol'] == 'USDJPY']
  np.testing.assert_allclose(jpy_rows['spread'], jpy_rows['spread_points'] * 1e-3, rtol=2**-52)
  with pytest.raises(UserError, match=r"symbol\(s\) \['GBPUSD'\]"):
    load_market(_data_config(path=f'{eur},{jpy}', point='GBPUSD=1e-5'))


# ------------------------------------------------------------------------------------------ broker clocks

def test_broker_time_export_across_the_spring_dst_change(tmp_path, caplog):
  """An EET server (UTC+2 winter, UTC+3 summer) exporting 24x5 H1 bars over 2024-03-31 (EU change)."""
  bars = _grid_bars(24 * 5 * 3, level=1.1, point=1e-5, seed=6)       # Mon 2024-03-18 .. Fri 2024-04-05
  path = _write_mt5(tmp_path / 'EURUSD_H1.csv', bars, 5)
  loaded = load_ohlcv(path, tz='EET')
  utc = pd.DatetimeIndex(loaded['time'])
  by_naive = dict(zip(bars['time'], utc))
  assert by_naive[pd.Timestamp('2024-03-29 10:00')] == pd.Timestamp('2024-03-29 08:00', tz='UTC')   # +2
  assert by_naive[pd.Timestamp('2024-04-01 10:00')] == pd.Timestamp('2024-04-01 07:00', tz='UTC')   # +3
  # The FX week opens Monday 00:00 server time: Sunday 22:00 UTC in winter, 21:00 UTC in summer.
  assert by_naive[pd.Timestamp('2024-03-25 00:00')] == pd.Timestamp('2024-03-24 22:00', tz='UTC')
  assert by_naive[pd.Timestamp('2024-04-01 00:00')] == pd.Timestamp('2024-03-31 21:00', tz='UTC')
  gaps = utc.to_series().diff().value_counts()
  assert set(gaps.index) == {pd.Timedelta('1h'), pd.Timedelta('49h'), pd.Timedelta('48h')}   # DST weekend
  assert loaded.attrs['tz'] == 'EET'
  fixed = load_ohlcv(path, tz='+02:00')             # a fixed offset: no DST, a constant shift
  assert (fixed['time'] == bars['time'].dt.tz_localize('UTC') - pd.Timedelta('2h')).all()
  iana_fixed = load_ohlcv(path, tz='Etc/GMT-2')      # IANA's inverted sign: UTC+2
  assert (iana_fixed['time'] == fixed['time']).all()
  with caplog.at_level(logging.INFO):
    naive = load_ohlcv(path)
  assert (naive['time'] == bars['time'].dt.tz_localize('UTC')).all() and naive.attrs['tz'] is None
  assert any('times taken as UTC (set data.tz for broker server time)' in r.getMessage()
             for r in caplog.records)


def test_the_repeated_autumn_hour_is_read_from_the_order():
  """24x7 hourly bars (crypto) in EET over 2024-10-27, when 03:00-03:59 happens twice."""
  naive = pd.date_range('2024-10-26 20:00', '2024-10-27 08:00', freq='1h')
  naive = naive.insert(int(np.flatnonzero(naive == pd.Timestamp('2024-10-27 03:00'))[0]) + 1,
                       pd.Timestamp('2024-10-27 03:00'))      # the clock went back: 03:00 again
  bars = _grid_bars(len(naive), level=60000.0, point=0.01, seed=7, calendar='24x7').assign(time=naive)
  loaded = load_ohlcv(bars, tz='EET')
  utc = pd.DatetimeIndex(loaded['time'])
  assert utc[0] == pd.Timestamp('2024-10-26 17:00', tz='UTC')
  assert (np.diff(utc.asi8) == 3600 * 10**9).all()           # one hour apart, no duplicate, no hole


def test_dst_times_the_zone_cannot_place_are_errors_naming_rows():
  spring = pd.DatetimeIndex(['2024-03-31 01:00', '2024-03-31 02:00', '2024-03-31 03:00', '2024-03-31 04:00'])
  bars = _grid_bars(4, level=1.1, point=1e-5, seed=8, calendar='24x7').assign(time=spring)
  with pytest.raises(DataError, match=r'(?s)skips at the daylight-saving change.*check data.tz.*row 2 '):
    load_ohlcv(bars, tz='EET')                   # 03:00 does not exist in EET that night
  autumn = pd.DatetimeIndex(['2024-10-27 02:00', '2024-10-27 03:30', '2024-10-27 04:00'])
  once = _grid_bars(3, level=1.1, point=1e-5, seed=9, calendar='24x7').assign(time=autumn)
  with pytest.raises(DataError, match=r"(?s)shows twice.*fixed offset such as '\+02:00'.*row 1 "):
    load_ohlcv(once, tz='EET')                   # 03:30 once: summer or winter time? The order cannot tell.
  assert load_ohlcv(once, tz='+03:00')['time'].is_monotonic_increasing   # the fix the message names


# ------------------------------------------------------------------- the one rule function and time parser

def _arrays(bars):
  return [bars[c].to_numpy() for c in ('open', 'high', 'low', 'close', 'volume')]


def test_candle_violations_names_each_rule_row_and_field():
  bars = _grid_bars(30, level=1.1, point=1e-5, seed=10)
  t = bars['time'].dt.tz_localize('UTC').astype('int64').to_numpy()
  spread = bars['spread_points'].to_numpy() * 1e-5
  assert candle_violations(t, *_arrays(bars), spread=spread, point=1e-5) == []
  cases = [('open', np.nan, 'not_finite', 'open must be finite (not NaN/inf/missing)', 'open'),
           ('volume', np.inf, 'not_finite', 'volume must be finite (not NaN/inf/missing)', 'volume'),
           ('low', 0.0, 'price_positive', 'prices must be > 0', None),
           ('high', 0.5, 'high_low', 'high >= max(open, close)', 'high'),
           ('low', 5.0, 'high_low', 'low <= min(open, close)', 'low'),
           ('volume', -1.0, 'volume_negative', 'volume >= 0', 'volume')]
  for column, value, rule, text, field in cases:
    broken = bars.copy()
    broken.loc[7, column] = value
    found = candle_violations(t, *_arrays(broken))
    assert [(v.rule, v.text, v.rows.tolist(), v.field) for v in found] == [(rule, text, [7], field)], column
  negative = spread.copy()
  negative[4] = -1e-5
  found = candle_violations(None, *_arrays(bars), spread=negative)
  assert [(type(v), v.rule, v.text, v.rows.tolist()) for v in found] == [
      (Violation, 'spread_negative', 'spread >= 0', [4])]
  off = bars.copy()
  off.loc[11, 'close'] += 4e-6                    # 0.4 point off the grid
  off.loc[11, 'high'] = max(off.loc[11, 'high'], off.loc[11, 'close'])
  assert [(v.rule, v.rows.tolist()) for v in candle_violations(None, *_arrays(off), point=1e-5)] == [
      ('off_grid', [11])]
  repeat, back = t.copy(), t.copy()
  repeat[5] = repeat[4]
  back[9] = back[2]
  assert [(v.text, v.rows.tolist()) for v in candle_violations(repeat, *_arrays(bars))] == [
      (rules.TIME_REPEAT, [5])]
  assert [(v.text, v.rows.tolist()) for v in candle_violations(back, *_arrays(bars))] == [
      (rules.TIME_DECREASE, [9])]
  # float32 prices (a client's) are judged on float32's own grid tolerance: on the grid they pass.
  as32 = [a.astype(np.float32) for a in _arrays(bars)]
  assert candle_violations(None, *as32, point=1e-5) == []


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(st.lists(st.tuples(st.integers(-2, 6), st.integers(-2, 6), st.integers(-2, 6),
                                     st.integers(-2, 6), st.integers(-1, 3), st.integers(0, 4),
                                     st.booleans()), min_size=1, max_size=25))
def test_candle_violations_equals_a_row_by_row_reading_of_the_rules(rows):
  """Against a plain per-row transcription of the rules, on integer-point prices (ties everywhere)."""
  o, h, l, c, v, minute, nan = (np.array(x) for x in zip(*rows))
  o = np.where(nan, np.nan, o * 0.25)
  h, l, c, v = h * 0.25, l * 0.25, c * 0.25, v.astype(float)
  t = minute.astype(np.int64) * 60 * 10**9
  expected = {}
  for i in range(len(rows)):   # a comparison rule is judged where its values are finite
    if not np.isfinite(o[i]):
      expected.setdefault('open must be finite (not NaN/inf/missing)', []).append(i)
    if any(x <= 0 for x in (o[i], h[i], l[i], c[i])):
      expected.setdefault(rules.PRICE_POSITIVE, []).append(i)
    if np.isfinite(o[i]) and h[i] < max(o[i], c[i]):
      expected.setdefault(rules.HIGH, []).append(i)
    if np.isfinite(o[i]) and l[i] > min(o[i], c[i]):
      expected.setdefault(rules.LOW, []).append(i)
    if v[i] < 0:
      expected.setdefault(rules.VOLUME, []).append(i)
  for i in range(1, len(rows)):
    if t[i] == t[i - 1]:
      expected.setdefault(rules.TIME_REPEAT, []).append(i)
    if t[i] < t[i - 1]:
      expected.setdefault(rules.TIME_DECREASE, []).append(i)
  found = {x.text: sorted(x.rows.tolist()) for x in candle_violations(t, o, h, l, c, v)}
  assert found == {k: sorted(r) for k, r in expected.items()}
  assert all(rules.RULES.get(x.text, 'not_finite') == x.rule for x in candle_violations(t, o, h, l, c, v))


def test_parse_times_accepts_the_documented_forms_and_nothing_else():
  instant = pd.Timestamp('2024-01-02 15:00', tz='UTC').value
  same = ['2024-01-02 15:00:00', '2024.01.02 15:00:00', '2024-01-02T15:00:00', '2024-01-02T15:00:00Z',
          '2024-01-02 17:00:00+02:00', '2024-01-02T10:00:00-0500', '2024.01.02 15:00', '1704207600',
          ' 2024-01-02 15:00:00.000 ']
  parsed = parse_times(np.array(same, dtype=object))
  assert not parsed.bad.any() and (parsed.ns == instant).all()
  assert (parse_times(np.array([1704207600, 1704207600.0])).ns == instant).all()
  bad = ['now', 'today', '2024/01/02 15:00', '02.01.2024 15:00', '20240102', '2024-13-02', '2024-02-30',
         '2024-01-02 15:00:00 EET', '']
  assert parse_times(np.array(bad, dtype=object)).bad.all()
  millis = parse_times(np.array([1_704_207_600_000]))
  assert millis.bad.all() and 'milliseconds' in millis.reason
  assert parse_times(np.array([None, True, 3.5e10], dtype=object)).bad.all()
  # Naive times are in tz (DST by date); times with an offset ignore it.
  eet = parse_times(np.array(['2024-01-02 17:00:00', '2024-07-02 18:00:00', '2024-01-02T15:00:00Z'],
                             dtype=object), tz='EET')
  assert eet.ns.tolist() == [instant, pd.Timestamp('2024-07-02 15:00', tz='UTC').value, instant]


def test_ingestion_reads_every_time_form_the_server_reads(small):
  frame = small[0].head(6)
  forms = {'dotted': frame['time'].dt.strftime('%Y.%m.%d %H:%M:%S'),
           'iso_z': frame['time'].dt.strftime('%Y-%m-%dT%H:%M:%SZ'),
           'offset': frame['time'].dt.tz_convert('Etc/GMT-2').dt.strftime('%Y-%m-%d %H:%M:%S+02:00'),
           'epoch': frame['time'].astype('int64') // 10**9}
  for name, column in forms.items():
    assert (load_ohlcv(frame.assign(time=column))['time'] == frame['time']).all(), name


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
  stamps = pd.Timestamp('2024-01-01', tz='UTC') + pd.to_timedelta(np.array(minutes) * 15, 'min')
  frame = pd.DataFrame({'time': stamps, 'open': 1.0, 'high': 2.0, 'low': 0.5, 'close': 1.0,
                        'volume': np.arange(1, len(minutes) + 1, dtype=float)})   # volume = input position + 1
  repaired = load_ohlcv(frame, repair=True)
  report = repaired.attrs['repair_report']
  assert repaired['time'].is_monotonic_increasing and repaired['time'].is_unique
  assert list(repaired['time']) == sorted(set(stamps))
  first_seen = {m: i for i, m in reversed(list(enumerate(minutes)))}
  assert repaired['volume'].tolist() == [float(first_seen[m] + 1) for m in sorted(first_seen)]
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


@pytest.mark.parametrize('preset', ['learnable', 'realistic'])
def test_synthetic_presets_are_deterministic_and_prefix_stable(preset):
  a, ra = synthetic_market(2000, seed=(5, 1), preset=preset)
  b, rb = synthetic_market(2000, seed=(5, 1), preset=preset)
  pd.testing.assert_frame_equal(a, b)
  np.testing.assert_array_equal(ra, rb)
  longer, _ = synthetic_market(2500, seed=(5, 1), preset=preset)
  pd.testing.assert_frame_equal(longer.iloc[:2000], a)
  other = synthetic_market(2000, seed=(5, 1), preset='realistic' if preset == 'learnable' else 'learnable')[0]
  assert not np.array_equal(other['close'], a['close'])


@pytest.mark.parametrize('preset, point', [('learnable', 1e-5), ('realistic', 1e-5), ('learnable', 1e-4)])
def test_synthetic_market_is_on_a_quote_grid_with_ticks_and_whole_point_spreads(preset, point):
  frame, _ = synthetic_market(20_000, seed=1, preset=preset, point=point)
  prices = frame[['open', 'high', 'low', 'close']].to_numpy()
  assert not grid.off_grid(prices, point).any()
  assert grid.infer_point(prices) == point
  o, h, l, c = prices.T
  assert (h >= np.maximum(o, c)).all() and (l <= np.minimum(o, c)).all()   # rounding kept the OHLC rules
  np.testing.assert_array_equal(o[1:], c[:-1])
  volume, points = frame['volume'].to_numpy(), frame['spread_points'].to_numpy()
  assert (volume == np.round(volume)).all() and volume.min() >= 1               # integer tick counts
  assert (points == np.round(points)).all() and points.min() >= 1               # whole points
  # spread = points x point: within one float64 rounding of the exact decimal.
  np.testing.assert_allclose(frame['spread'], points * point, rtol=2**-52)
  # Ties and flat bars, as in a real feed: doji bars, flat bars with a few ticks, repeated highs.
  flat = (h == l)
  assert (flat & (volume <= 4)).mean() > 0.002      # quiet bars: no move, a few ticks
  assert (o == c).mean() > 0.005 and (np.diff(h) == 0).mean() > 0.005
  assert candle_violations(frame['time'].astype('int64').to_numpy(), o, h, l, c, volume,
                           spread=frame['spread'].to_numpy(), point=point) == []


def test_synthetic_bad_preset_or_point_is_a_user_error():
  with pytest.raises(UserError, match='preset must be one of'):
    synthetic_market(10, preset='easy')
  with pytest.raises(UserError, match='point must be'):
    synthetic_market(10, point=0.5)


def test_realistic_preset_is_as_weak_as_a_real_market():
  """Drift, autocorrelation and direction skill at real-FX magnitudes, with statistical bounds."""
  frame, regime = synthetic_market(40_000, seed=0, preset='realistic')
  r = np.diff(np.log(frame['close'].to_numpy()))
  n = r.size
  # Per-bar volatility of EURUSD M15 (~3e-4).
  assert 2e-4 < r.std() < 4e-4
  # Lag-1 autocorrelation: -0.02 by construction; its standard error is ~1/sqrt(n) = 0.005 (x ~1.3 for the
  # volatility clustering), so |ac| < 0.045 holds with > 4 standard errors to spare, and it is not the
  # learnable preset's momentum.
  ac = np.corrcoef(r[1:], r[:-1])[0, 1]
  assert abs(ac) < 0.045, ac
  # Drift: the t-statistic of the mean return is N(~0, 1) for a driftless market; |t| < 4.
  assert abs(r.mean() / r.std() * np.sqrt(n)) < 4
  # Direction skill of an oracle that knows the true regime's drift sign: ~51% (Phi(0.02 sigma)); its
  # standard error on the ~27,000 trending bars is 0.003, so 0.53 is a > 6 SE bound ("a few points at most").
  drift_sign = np.array(synthetic.PRESETS['realistic'].drift)[regime[1:]]
  trending = drift_sign != 0
  hits = (np.sign(r[trending]) == np.sign(drift_sign[trending]))[r[trending] != 0]
  assert hits.mean() < 0.53, hits.mean()
  learnable, true = synthetic_market(40_000, seed=0)
  lr = np.diff(np.log(learnable['close'].to_numpy()))
  sign = np.sign(synthetic.DRIFT[true[1:]])
  assert (np.sign(lr[sign != 0]) == sign[sign != 0]).mean() > 0.6     # the demo market stays learnable


def test_load_market_passes_preset_and_point_to_the_synthetic_market():
  market = load_market(_data_config(synthetic_preset='realistic', point='1e-4'))
  expected, _ = synthetic_market(500, seed=4, preset='realistic', point=1e-4)
  pd.testing.assert_frame_equal(market.drop(columns='symbol'), expected)
  assert market.attrs['points'] == {'SYNTH': 1e-4} and market.attrs['point_sources'] == {'SYNTH': 'config'}
  assert market.attrs['spread_sources'] == {'SYNTH': 'synthetic'}
  assert market.attrs['synthetic_preset'] == 'realistic'
  two = load_market(_data_config(synthetic_symbols=2, point='SYNTH1=1e-3'))
  assert two.attrs['points'] == {'SYNTH0': 1e-5, 'SYNTH1': 1e-3}
  assert two.attrs['point_sources'] == {'SYNTH0': 'synthetic default', 'SYNTH1': 'config'}
  assert grid.infer_point(two.loc[two['symbol'] == 'SYNTH1', ['open', 'close']].to_numpy()) == 1e-3
  with pytest.raises(UserError, match='synthetic_preset must be one of'):
    load_market(_data_config(synthetic_preset='hard'))


def test_synthetic_bars_are_valid_ohlc(market):
  frame, _ = market
  o, h, l, c = (frame[k].to_numpy() for k in ('open', 'high', 'low', 'close'))
  assert (h >= np.maximum(o, c)).all() and (l <= np.minimum(o, c)).all() and (l > 0).all()
  np.testing.assert_array_equal(o[1:], c[:-1])        # open = previous close
  # Intrabar paths give real ranges, except the quiet (flat) bars, ~QUIET_SHARE of them.
  assert 0 < (h == l).mean() < 3 * synthetic.QUIET_SHARE
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
