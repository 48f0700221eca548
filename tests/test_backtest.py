"""Backtest engine: exact on a hand-worked example, equal to an independent loop, costs always charged,
the book closed at the last bar, trading days of a 24x5 market, and the one cost resolver of every phase."""
import json

import ml_collections
import numpy as np
import pandas as pd
import pytest

from natron import backtest
from natron.errors import UserError

POINT = 1e-5
# Float64 tolerances: each bar's step is a few float64 operations (relative error <= ~4 * 1.1e-16), and a
# compounded product of n steps accumulates at most ~n times that: 3000 bars -> ~1.3e-12, so rtol 1e-10
# leaves two orders of magnitude for summation order (numpy's pairwise/vectorised loops differ by CPU).
RTOL_3000_BARS = 1e-10


def loop_backtest(close, position, cost_bps, spread=None):
  """Independent bar-by-bar reference: decide at close t, hold to close t+1, pay on every change; at the last
  bar the book is closed (whatever was held into it is sold/bought back there, paying its cost)."""
  equity, cash_pos, out = 1.0, 0.0, []
  trades, current, trade_growth = [], 0.0, 1.0
  for t in range(len(close)):
    unit = cost_bps * 1e-4 + (0.0 if spread is None else 0.5 * spread[t] / close[t])
    new = position[t] if t + 1 < len(close) else 0.0
    fee = abs(new - cash_pos) * unit
    # Trade bookkeeping: close the old trade on a sign change, open a new one.
    if np.sign(new) != np.sign(cash_pos):
      if cash_pos != 0:
        trade_growth *= 1 - abs(cash_pos) * unit
        trades.append(trade_growth - 1)
      trade_growth = 1.0
      own_fee = abs(new) * unit
    else:
      own_fee = fee
    ret = close[t + 1] / close[t] - 1 if t + 1 < len(close) else 0.0
    if new != 0:
      trade_growth *= 1 + new * ret - own_fee
    equity *= 1 + new * ret - fee
    cash_pos = new
    out.append(equity)
  if cash_pos != 0:
    trades.append(trade_growth - 1)
  return np.array(out), np.array(trades)


def test_hand_worked_example():
  close = np.array([100.0, 110.0, 99.0, 99.0])
  position = np.array([1.0, -1.0, 0.0, 0.0])
  res = backtest.run(close, position, cost_bps=10.0, timeframe='1D')
  # Bar 0: buy 1 (cost 0.001), earn +10%: 1 * (1 + 0.10 - 0.001) = 1.099
  # Bar 1: reverse to -1 (traded 2, cost 0.002), earn -(-10%) = +10%: 1.099 * 1.098
  # Bar 2: flatten (traded 1, cost 0.001), earn 0: * 0.999; bar 3: nothing.
  expected = np.array([1.099, 1.099 * 1.098, 1.099 * 1.098 * 0.999, 1.099 * 1.098 * 0.999])
  np.testing.assert_allclose(res.equity, expected, rtol=1e-12)
  np.testing.assert_allclose(res.cost, [0.001, 0.002, 0.001, 0.0], rtol=1e-12)
  assert res.metrics['num_trades'] == 2
  assert res.metrics['turnover'] == pytest.approx(4.0)
  # Trade 1: entry cost 0.001 + return + exit cost 0.001 (half of the reversal).
  assert res.metrics['win_rate'] == 1.0
  assert res.metrics['total_return'] == pytest.approx(expected[-1] - 1)


def test_next_bar_execution_no_lookahead():
  """A position decided at the last bar is never executed; a position earns only the NEXT bar's move."""
  close = np.array([1.0, 2.0, 1.0])
  res = backtest.run(close, np.array([0.0, 0.0, 1.0]), cost_bps=10.0, timeframe='1D')
  assert res.equity[-1] == 1.0 and res.metrics['total_cost'] == 0.0 and res.metrics['num_trades'] == 0
  res = backtest.run(close, np.array([0.0, 1.0, 0.0]), cost_bps=0.0, timeframe='1D')
  assert res.equity[-1] == pytest.approx(0.5)   # bought at 2, held to 1


@pytest.mark.parametrize('with_spread', [False, True])
def test_matches_independent_loop(with_spread):
  rng = np.random.default_rng(0)
  n = 3000
  close = 1.1 * np.exp(np.cumsum(rng.normal(0, 1e-3, n)))
  position = backtest.random_policy(n, seed=1, mean_hold=5) * rng.choice([1.0, 0.5], n)
  spread = rng.uniform(0, 2e-4, n) if with_spread else None
  res = backtest.run(close, position, cost_bps=2.0, spread=spread)
  eq, trades = loop_backtest(close, position, 2.0, spread)
  np.testing.assert_allclose(res.equity, eq, rtol=RTOL_3000_BARS)
  assert res.metrics['num_trades'] == len(trades)
  # Trade returns: log1p/bincount/expm1 against a running product over a trade's few bars: relative error
  # ~1e-15 per bar; trades average ~1e-3, so atol 1e-12 + rtol 1e-8 bounds the mean generously.
  np.testing.assert_allclose(res.metrics['avg_trade'], np.mean(trades), rtol=1e-8, atol=1e-12)
  assert res.metrics['win_rate'] == pytest.approx(np.mean(np.array(trades) > 0))


def test_costs_are_charged_on_every_change():
  close = np.full(100, 1.0)
  position = np.tile([1.0, -1.0], 50)
  res = backtest.run(close, position, cost_bps=5.0)
  # Open 1, 98 reversals of 2, and the book closed at the last bar (1).
  assert res.metrics['total_cost'] == pytest.approx((1 + 2 * 98 + 1) * 5e-4, rel=1e-12)
  assert res.equity[-1] < 1.0
  flat = backtest.run(close, np.zeros(100), cost_bps=5.0)
  assert flat.equity[-1] == 1.0 and flat.metrics['num_trades'] == 0


def fx_week_bars(weeks, first_open='2024-02-25 22:00', freq='15min'):
  """A 24x5 FX series: Sunday 22:00 UTC to Friday 22:00 UTC each week (UTC timestamps)."""
  start = pd.Timestamp(first_open, tz='UTC')
  parts = [pd.date_range(start + pd.Timedelta(weeks=w), start + pd.Timedelta(weeks=w, days=5), freq=freq,
                         inclusive='left') for w in range(weeks)]
  return parts[0].append(parts[1:])


def broker_week_bars(weeks, first_monday='2024-02-26', tz='EET', freq='15min'):
  """The same market in broker server time: Monday 00:00 to Friday 24:00 of an UTC+2/+3 (EET/EEST) clock."""
  start = pd.Timestamp(first_monday)
  parts = [pd.date_range(start + pd.Timedelta(weeks=w), start + pd.Timedelta(weeks=w, days=5), freq=freq,
                         inclusive='left') for w in range(weeks)]
  return parts[0].append(parts[1:]).tz_localize(tz)


@pytest.mark.parametrize('weeks', [1, 8])
def test_a_24x5_market_has_five_trading_days_a_week_in_utc_and_in_broker_time(weeks):
  # 8 weeks from late February cross both daylight-saving changes (US 10 March, EU 31 March 2024), when
  # broker midnight and the New York roll-over are an hour apart.
  utc = fx_week_bars(weeks)
  broker = broker_week_bars(weeks)
  for time in (utc, broker, broker.tz_convert('UTC'), broker.tz_convert('UTC').tz_localize(None).to_numpy()):
    days = backtest.trading_days(time)
    assert len(np.unique(days)) == 5 * weeks
    weekday = (days.astype(np.int64) + 3) % 7
    assert set(weekday.tolist()) == {0, 1, 2, 3, 4}             # Monday..Friday only
    assert np.all(np.diff(days.astype(np.int64)) >= 0)          # days never go back in time
  # Calendar UTC dates would count the Sunday-evening bars as a sixth day every week.
  assert len(np.unique(utc.normalize())) == 6 * weeks
  # In winter (both clocks on standard time) every day is exactly 96 bars of 15 minutes.
  _, counts = np.unique(backtest.trading_days(fx_week_bars(2, '2024-01-07 22:00')), return_counts=True)
  assert counts.tolist() == [96] * 10


def test_daily_metrics_with_timestamps():
  rng = np.random.default_rng(3)
  time = fx_week_bars(8, '2024-01-07 22:00')          # winter (before 10 March): 96 bars per trading day
  close = np.exp(np.cumsum(rng.normal(2e-5, 1e-3, len(time))))
  res = backtest.run(close, np.ones(len(time)), cost_bps=0.0, time=time, periods_per_year=260)
  daily = backtest.daily_returns(res.equity, time=time)
  assert len(daily) == 40 and res.metrics['days'] == 40
  # Same float64 values in the same order: only summation-order differences (~1e-16 relative).
  assert res.metrics['sharpe'] == pytest.approx(daily.mean() / daily.std(ddof=1) * np.sqrt(260), rel=1e-12)
  assert np.prod(1 + daily) - 1 == pytest.approx(res.metrics['total_return'], rel=1e-12)
  # Without timestamps, blocks of 96 bars per day give the same days here.
  res2 = backtest.run(close, np.ones(len(time)), cost_bps=0.0, periods_per_year=260, timeframe='15min')
  assert res2.metrics['sharpe'] == pytest.approx(res.metrics['sharpe'], rel=1e-12)
  with pytest.raises(UserError, match='trading_day'):
    backtest.daily_returns(res.equity, time=time, trading_day='5pm New York')


def test_a_round_trip_pays_two_half_spreads_and_two_commissions():
  # Flat prices on the 1e-5 grid; a spread of 2 points; bought at bar 0 and held: the book is closed at the
  # last close, so the single trade pays commission + half spread twice.
  close = np.full(5, 1.10000)
  spread = np.full(5, 2 * POINT)
  unit = 1.5e-4 + 0.5 * 2 * POINT / 1.1
  res = backtest.run(close, np.ones(5), cost_bps=1.5, spread=spread)
  np.testing.assert_allclose(res.cost, [unit, 0, 0, 0, unit], rtol=1e-15)
  assert res.equity[-1] == pytest.approx((1 - unit) ** 2, rel=1e-15)
  assert res.metrics['num_trades'] == 1 and res.metrics['turnover'] == 2.0
  assert res.metrics['avg_trade'] == pytest.approx((1 - unit) ** 2 - 1, rel=1e-12)
  np.testing.assert_array_equal(res.position, [1, 1, 1, 1, 0])
  # A reversal then the close: open 1 (one unit), reverse (two units), close (one unit): four units.
  res = backtest.run(close, np.array([1.0, 1.0, -1.0, -1.0, -1.0]), cost_bps=1.5, spread=spread)
  assert res.metrics['total_cost'] == pytest.approx(4 * unit, rel=1e-12) and res.metrics['num_trades'] == 2
  assert res.metrics['commission_bps'] == 1.5 and res.metrics['mean_spread'] == pytest.approx(2 * POINT)


def test_drawdown_and_duration():
  close = np.array([1.0, 1.0, 0.5, 0.75, 1.0, 1.2])
  res = backtest.run(close, np.ones(6), cost_bps=0.0, timeframe='1D')
  assert res.metrics['max_drawdown'] == pytest.approx(0.5)
  # Equity after each step: 1.0, 0.5, 0.75, 1.0 (back at the peak), 1.2, 1.2 -> 2 bars under water.
  assert res.metrics['max_drawdown_bars'] == 2


def test_bad_input_is_a_clear_error():
  with pytest.raises(UserError, match='non-finite'):
    backtest.run(np.array([1.0, np.nan, 1.0]), np.zeros(3))
  with pytest.raises(UserError, match='entries but close'):
    backtest.run(np.ones(3), np.zeros(4))
  with pytest.raises(UserError, match='> 0'):
    backtest.run(np.array([1.0, 0.0]), np.zeros(2))


def test_baselines_and_report_files(tmp_path):
  n = 500
  rng = np.random.default_rng(0)
  close = np.exp(np.cumsum(rng.normal(0, 1e-3, n)))
  rand = backtest.random_policy(n, seed=0)
  assert set(np.unique(rand)) <= {-1.0, 0.0, 1.0}
  np.testing.assert_array_equal(rand, backtest.random_policy(n, seed=0))
  sig = backtest.signal_positions(['BUY', 'SELL', 'SELL', 'HOLD'])
  np.testing.assert_array_equal(sig, [1, -1, -1, 0])
  results = {name: backtest.run(close, pos) for name, pos in
             [('buy_and_hold', backtest.buy_and_hold(n)), ('flat', backtest.always_flat(n)),
              ('random', rand)]}
  table = backtest.save_results(results, str(tmp_path))
  assert 'buy_and_hold' in table and '| flat |' in table
  png = tmp_path / 'equity.png'
  assert png.exists() and png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


# --------------------------------------------------------------------------------------------------------
# The cost resolver (issue 9, item 4): a spread is always named, never silently zero.
# --------------------------------------------------------------------------------------------------------
def _cost_config(spread=None, point=None, cost_bps=1.0):
  config = ml_collections.ConfigDict()
  config.data = ml_collections.ConfigDict({'point': point})
  config.backtest = ml_collections.ConfigDict({'cost_bps': cost_bps, 'spread': spread})
  return config


def _part(n=6, spread_points=None):
  """One symbol's bars at ~1.1 on the 1e-5 grid; `spread` in price units (whole points) when given."""
  ticks = 110_000 + np.arange(n) * 3
  part = pd.DataFrame({'close': ticks * POINT, 'volume': np.arange(1, n + 1, dtype=np.float64)})
  if spread_points is not None:
    part['spread'] = np.asarray(spread_points, np.float64) * POINT
  return part


def test_data_without_a_spread_and_none_configured_is_an_error():
  with pytest.raises(UserError, match='never falls back to commission only'):
    backtest.resolve_costs(_part(), 'EURUSD', _cost_config())
  part = _part()
  part['spread'] = np.nan   # an all-missing column (a symbol without spreads among others) is no spread either
  with pytest.raises(UserError, match="backtest.spread"):
    backtest.resolve_costs(part, 'EURUSD', _cost_config())
  with pytest.raises(UserError, match='names no spread for EURUSD'):
    backtest.resolve_costs(_part(), 'EURUSD', _cost_config('USDJPY=0.015'))


def test_configured_spread_in_points_or_price_units_per_symbol():
  cfg = _cost_config('EURUSD=1.2 points,USDJPY=0.015')
  eur = backtest.resolve_costs(_part(), 'EURUSD', cfg, {'EURUSD': 1e-5})
  # 1.2 points of 1e-5: one float64 product, exact to an ulp.
  np.testing.assert_allclose(eur.spread, np.full(6, 1.2e-5), rtol=1e-15)
  d = eur.describe()
  assert d['mean_spread_points'] == pytest.approx(1.2, rel=1e-14) and d['commission_bps'] == 1.0
  assert '1.2 points x point 1e-05' in d['spread_source'] and d['point'] == 1e-5
  jpy = backtest.resolve_costs(_part(), 'USDJPY', cfg, {'USDJPY': 1e-3})
  assert jpy.mean_spread == 0.015 and jpy.describe()['mean_spread_points'] == pytest.approx(15.0, rel=1e-14)
  assert 'price units' in jpy.spread_source
  # The point from config.data.point when the market records none (library callers), per symbol or global.
  assert backtest.resolve_costs(_part(), 'EURUSD', _cost_config('2 points', point='EURUSD=1e-5')).mean_spread \
      == pytest.approx(2e-5, rel=1e-15)
  with pytest.raises(UserError, match='point of EURUSD is unknown'):
    backtest.resolve_costs(_part(), 'EURUSD', _cost_config('2 points'))
  # An explicit zero is allowed, and the reports say ZERO.
  zero = backtest.resolve_costs(_part(), 'EURUSD', _cost_config('0'))
  assert zero.mean_spread == 0.0 and 'ZERO spread' in backtest.cost_text(zero.describe())
  with pytest.raises(UserError, match='cannot read'):
    backtest.parse_spread('1.2 pips')


def test_the_data_spread_wins_and_the_report_says_where_it_came_from():
  part = _part(spread_points=[1, 2, 3, 1, 2, 3])
  cost = backtest.resolve_costs(part, 'EURUSD', _cost_config(), {'EURUSD': 1e-5},
                                spread_sources={'EURUSD': 'MT5 <SPREAD> in points x point 1e-5 (inferred)'})
  np.testing.assert_array_equal(cost.spread, part['spread'].to_numpy())
  assert cost.spread_source == 'data: MT5 <SPREAD> in points x point 1e-5 (inferred)'
  assert cost.describe()['mean_spread_points'] == pytest.approx(2.0, rel=1e-14)
  # A configured spread does not replace the data's, and the source says so (never silently ignored).
  other = backtest.resolve_costs(part, 'EURUSD', _cost_config('5 points'), {'EURUSD': 1e-5})
  np.testing.assert_array_equal(other.spread, part['spread'].to_numpy())
  assert "backtest.spread='5 points' not used" in other.spread_source
  # The span actually traded is what reports describe.
  assert cost.span(3, 6).describe()['bars'] == 3
  part.loc[2, 'spread'] = np.nan
  with pytest.raises(UserError, match='missing or negative in 1 of 6 rows'):
    backtest.resolve_costs(part, 'EURUSD', _cost_config())
  # The commission override (the rl phase's rl.cost_bps) is named.
  rl = backtest.resolve_costs(_part(spread_points=[1] * 6), 'X', _cost_config(), cost_bps=2.5,
                              commission_source='rl.cost_bps')
  assert rl.commission_bps == 2.5 and rl.describe()['commission_source'] == 'rl.cost_bps'


def test_saved_results_state_the_cost_model(tmp_path):
  part = _part(n=50, spread_points=np.full(50, 2))
  cost = backtest.resolve_costs(part, 'EURUSD', _cost_config(cost_bps=0.5), {'EURUSD': 1e-5})
  close = part['close'].to_numpy()
  results = {'buy_and_hold': backtest.run(close, np.ones(50), cost_bps=cost.commission_bps, spread=cost.spread)}
  table = backtest.save_results(results, str(tmp_path), cost=cost)
  saved = json.loads((tmp_path / 'metrics.json').read_text())
  assert saved['buy_and_hold']['cost_model'] == json.loads(json.dumps(cost.describe()))
  assert 'Costs (EURUSD): commission 0.5 bps' in table and '2.00 points' in table
  assert 'Costs (EURUSD)' in (tmp_path / 'table.md').read_text()
