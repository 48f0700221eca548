"""Backtest engine: exact on a hand-worked example, equal to an independent loop, costs always charged."""
import numpy as np
import pandas as pd
import pytest

from natron import backtest
from natron.errors import UserError


def loop_backtest(close, position, cost_bps, spread=None):
  """Independent bar-by-bar reference: decide at close t, hold to close t+1, pay on every change."""
  equity, cash_pos, out = 1.0, 0.0, []
  trades, current, trade_growth = [], 0.0, 1.0
  for t in range(len(close)):
    unit = cost_bps * 1e-4 + (0.0 if spread is None else 0.5 * spread[t] / close[t])
    new = position[t]
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
  """A position decided at the last bar earns nothing; a position earns only the NEXT bar's move."""
  close = np.array([1.0, 2.0, 1.0])
  res = backtest.run(close, np.array([0.0, 0.0, 1.0]), cost_bps=0.0, timeframe='1D')
  assert res.equity[-1] == pytest.approx(1.0)
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
  np.testing.assert_allclose(res.equity, eq, rtol=1e-10)
  assert res.metrics['num_trades'] == len(trades)
  np.testing.assert_allclose(res.metrics['avg_trade'], np.mean(trades), rtol=1e-8, atol=1e-12)
  assert res.metrics['win_rate'] == pytest.approx(np.mean(np.array(trades) > 0))


def test_costs_are_charged_on_every_change():
  close = np.full(100, 1.0)
  position = np.tile([1.0, -1.0], 50)
  res = backtest.run(close, position, cost_bps=5.0)
  assert res.metrics['total_cost'] == pytest.approx((1 + 2 * 99) * 5e-4)
  assert res.equity[-1] < 1.0
  flat = backtest.run(close, np.zeros(100), cost_bps=5.0)
  assert flat.equity[-1] == 1.0 and flat.metrics['num_trades'] == 0


def test_daily_metrics_with_timestamps():
  rng = np.random.default_rng(3)
  time = pd.date_range('2024-01-01', periods=96 * 60, freq='15min', tz='UTC')
  close = np.exp(np.cumsum(rng.normal(2e-5, 1e-3, len(time))))
  res = backtest.run(close, np.ones(len(time)), cost_bps=0.0, time=time, periods_per_year=252)
  daily = backtest.daily_returns(res.equity, time=time)
  assert len(daily) == 60 and res.metrics['days'] == 60
  assert res.metrics['sharpe'] == pytest.approx(daily.mean() / daily.std(ddof=1) * np.sqrt(252))
  assert np.prod(1 + daily) - 1 == pytest.approx(res.metrics['total_return'])
  # Without timestamps, blocks of 96 bars per day give the same days here.
  res2 = backtest.run(close, np.ones(len(time)), cost_bps=0.0, periods_per_year=252, timeframe='15min')
  assert res2.metrics['sharpe'] == pytest.approx(res.metrics['sharpe'])


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
