"""Labels: hand-worked triple barrier, masking, uniqueness weights, train-only fitting, regime agreement."""
import numpy as np
import pytest

from natron import labels as L
from natron.data import REGIMES, synthetic_market
from natron.errors import UserError

PT, SL, H = 2.0, 1.0, 3
SIGMA = 0.01
TP_LONG, SL_LONG = 100 * np.exp(PT * SIGMA), 100 * np.exp(-SL * SIGMA)      # 102.020, 99.005
TP_SHORT, SL_SHORT = 100 * np.exp(-PT * SIGMA), 100 * np.exp(SL * SIGMA)    # 98.020, 101.005


def _barrier(bars):
  """Row 0 opens at close 100; `bars` are (high, low, close) of bars 1..; constant sigma."""
  high = np.array([100.0] + [b[0] for b in bars])
  low = np.array([100.0] + [b[1] for b in bars])
  close = np.array([100.0] + [b[2] for b in bars])
  return L.triple_barrier(high, low, close, np.full(len(close), SIGMA), H, PT, SL)


def test_barrier_levels_are_log_barriers():
  # The hand-worked levels the cases below are built around.
  assert 102.01 < TP_LONG < 102.03 and 99.00 < SL_LONG < 99.01
  assert 98.01 < TP_SHORT < 98.03 and 101.00 < SL_SHORT < 101.01


def test_take_profit_first_after_short_stop():
  # Bar 1 stops the short (high 101.5 >= 101.005) but not the long; bar 2 reaches the long's TP (102.5).
  buy, sell, exit_long, exit_short = _barrier([(101.5, 99.5, 101.0), (102.5, 100.5, 102.0), (102, 101, 101.5)])
  assert (buy[0], sell[0]) == (1, 0)
  assert (exit_long[0], exit_short[0]) == (2, 1)


def test_short_take_profit():
  # Bar 1 falls to 97.5: short TP (<= 98.02) without touching the short stop; the long is stopped (<= 99.005).
  buy, sell, exit_long, exit_short = _barrier([(100.5, 97.5, 98.0), (99, 97, 98), (99, 97, 98)])
  assert (buy[0], sell[0]) == (0, 1)
  assert (exit_long[0], exit_short[0]) == (1, 1)


def test_both_barriers_in_one_bar_counts_the_stop():
  # Bar 1 spans 97.9..102.5: it touches both barriers of the long AND of the short: stop first for both.
  buy, sell, exit_long, exit_short = _barrier([(102.5, 97.9, 100.0), (103, 100, 102.9), (104, 102, 103.5)])
  assert (buy[0], sell[0]) == (0, 0)
  assert (exit_long[0], exit_short[0]) == (1, 1)
  # Long TP and SL in bar 2 after a quiet bar 1: still a loss for the long.
  buy, _, exit_long, _ = _barrier([(100.5, 99.5, 100.0), (102.1, 98.9, 101.0), (101, 100, 100.5)])
  assert buy[0] == 0 and exit_long[0] == 2


def test_vertical_barrier():
  # Nothing is touched within H = 3 bars (a TP on bar 4 is too late): both 0, exit at t + H.
  buy, sell, exit_long, exit_short = _barrier([(100.9, 99.1, 100.5), (100.9, 99.1, 100.2), (100.9, 99.1, 100.8),
                                               (103.0, 100.0, 102.9)])
  assert (buy[0], sell[0]) == (0, 0)
  assert (exit_long[0], exit_short[0]) == (3, 3)


def test_barrier_tail_is_masked_not_truncated():
  # Only H bars after row 0 exist for row 0; rows 1..H have incomplete horizons, even though row 1's TP is hit.
  buy, sell, exit_long, _ = _barrier([(100.5, 99.5, 100.0), (103, 100, 102.9), (103, 102, 102.5)])
  assert buy[0] == 1 and exit_long[0] == 2
  assert np.all(buy[1:] == -1) and np.all(sell[1:] == -1) and np.all(exit_long[1:] == -1)


def test_pt_below_sl_keeps_the_earlier_take_profit():
  # pt < sl: +1 sigma (long TP) on bar 1, then -1 sigma (short TP) on bar 2, no stop at 2 sigma touched.
  high = np.array([100, 101.2, 100.2, 100.0])
  low = np.array([100, 100.0, 98.8, 99.0])
  close = np.array([100, 101.0, 99.0, 99.5])
  buy, sell, _, _ = L.triple_barrier(high, low, close, np.full(4, SIGMA), 3, 1.0, 2.0)
  assert (buy[0], sell[0]) == (1, 0)


@pytest.fixture(scope='module')
def market():
  frame, true = synthetic_market(6000, seed=7)
  return frame, true


def test_buy_and_sell_never_both_one(market):
  frame, _ = market
  for pt, sl in ((2.0, 1.0), (1.0, 1.0), (0.5, 1.5)):
    lab = L.make_labels(frame, {'pt': pt, 'sl': sl}, train_end=4000)
    assert not np.any((lab.buy == 1) & (lab.sell == 1))
    assert np.mean(lab.buy == 1) > 0.05 and np.mean(lab.sell == 1) > 0.05


def test_sigma_is_causal(market):
  frame, _ = market
  close = frame['close'].to_numpy()
  full = L.ewm_volatility(close, 100)
  prefix = L.ewm_volatility(close[:2500], 100)
  np.testing.assert_allclose(prefix, full[:2500], rtol=1e-12, equal_nan=True)
  assert np.all(np.isnan(full[:100])) and np.all(np.isfinite(full[100:]))


def test_masked_tail_and_t1(market):
  frame, _ = market
  n = len(frame)
  lab = L.make_labels(frame, None, train_end=4000)
  for name in ('buy', 'sell', 'direction'):
    y = lab.task(name)
    assert np.all(y[n - 12:] == -1) and np.all(y[200:n - 12] >= 0)
  assert np.all(lab.regime[n - 48:] == -1) and np.all(lab.regime[2000:n - 48] >= 0)
  labelled = lab.t1 >= 0
  rows = np.arange(n)
  assert np.all(lab.t1[labelled] <= n - 1)
  np.testing.assert_array_equal(lab.t1[lab.regime >= 0], rows[lab.regime >= 0] + 48)
  only_h = (lab.buy >= 0) & (lab.regime < 0)
  np.testing.assert_array_equal(lab.t1[only_h], rows[only_h] + 12)
  assert np.all(lab.weight[lab.buy < 0] == 0) and np.all((lab.weight[lab.buy >= 0] > 0) &
                                                           (lab.weight[lab.buy >= 0] <= 1))


def test_labels_change_with_future_bars_only(market):
  frame, _ = market
  # train_end well before t: fitted thresholds must not move (they would if t's labels were training labels).
  lab = L.make_labels(frame, None, train_end=2500)
  t = 3000 + int(np.argmax((lab.buy[3000:] == 0) & (lab.direction[3000:] != L.UP)))
  moved = frame.copy()
  c_t = frame.loc[t, 'close']
  # Bars t+1..t+4 flat at close_t, then a jump of 40 sigma on bar t+5 (the rest of the path shifted with it):
  # the long's take-profit is hit on bar t+5 with no stop before it, the short is stopped there.
  jump = c_t * np.exp(40 * lab.sigma[t]) / frame.loc[t + 5, 'close']
  moved.loc[t + 5:, ['open', 'high', 'low', 'close']] *= jump
  moved.loc[t + 1:t + 4, ['open', 'high', 'low', 'close']] = c_t
  moved.loc[t + 5, ['open', 'low']] = c_t
  changed = L.make_labels(moved, None, train_end=2500)
  assert (changed.buy[t], changed.sell[t], changed.direction[t]) == (1, 0, L.UP)
  assert (lab.buy[t], lab.direction[t]) != (1, L.UP)
  # Rows whose every horizon ends at or before t keep their labels, and sigma up to t is untouched.
  keep = slice(0, t - 48 + 1)
  for name in L.TASKS + ('weight',):
    np.testing.assert_array_equal(getattr(lab, name)[keep], getattr(changed, name)[keep])
  np.testing.assert_array_equal(lab.sigma[:t + 1], changed.sigma[:t + 1])


def test_uniqueness_weights_hand_example():
  # Events over bars 1..3, 2..4, 4..5 and one unlabelled row. Concurrency: bar1 1, bar2 2, bar3 2, bar4 2, bar5 1.
  w = L.uniqueness_weights(np.array([1, 2, 4, -1]), np.array([3, 4, 5, -1]), n_bars=6)
  np.testing.assert_allclose(w, [(1 + 0.5 + 0.5) / 3, 0.5, (0.5 + 1) / 2, 0.0], rtol=1e-6)
  assert w.dtype == np.float32
  # Non-overlapping events are fully unique.
  np.testing.assert_allclose(L.uniqueness_weights(np.array([0, 2]), np.array([1, 3]), 4), [1.0, 1.0])


def test_class_weights_inverse_frequency():
  np.testing.assert_allclose(L.class_weights(np.array([0, 0, 0, 1, -1]), 2), [0.5, 1.5])
  # An absent class gets 0; the present ones average 1.
  np.testing.assert_allclose(L.class_weights(np.array([0, 2, 2, 2]), 3), [1.5, 0.0, 0.5])
  assert L.class_shares(np.array([0, 1, 1, -1]), 3) == [1 / 3, 2 / 3, 0.0]


def test_balancing_is_fitted_on_train_only(market):
  frame, _ = market
  train_end = 3500
  shares = {'regime_shares': (0.2, 0.1, 0.2, 0.1, 0.2, 0.2)}
  lab = L.make_labels(frame, shares, train_end=train_end)
  train = slice(0, train_end)
  # Direction: the neutral share on labelled training rows is the configured 1/3.
  y = lab.direction[train]
  assert abs(np.mean(y[y >= 0] == L.NEUTRAL) - 1 / 3) < 0.01
  # Regime (fitted mode): the training shares follow the configured ones.
  r = lab.regime[train]
  got = np.bincount(r[r >= 0], minlength=6) / np.sum(r >= 0)
  np.testing.assert_allclose(got[[L.VOLATILE, L.RANGE]], [0.2, 0.2], atol=0.01)
  np.testing.assert_allclose(got[L.BULL_STRONG] + got[L.BEAR_STRONG], 0.4, atol=0.02)
  # Altering every bar after the training labels' last forward bar changes none of the fitted values.
  moved = frame.copy()
  after = train_end + 48
  noise = np.exp(np.cumsum(np.random.default_rng(0).normal(0, 0.003, len(frame) - after)))
  for c in ('open', 'high', 'low', 'close'):
    moved.loc[after:, c] *= noise
  again = L.make_labels(moved, shares, train_end=train_end)
  assert again.params['direction_k'] == lab.params['direction_k']
  assert again.params['regime_thresholds'] == lab.params['regime_thresholds']
  assert again.class_weights == lab.class_weights
  assert not np.array_equal(again.direction, lab.direction)   # the change did reach later labels
  # ... while moving train_end does change them (they really come from the training span).
  other = L.make_labels(frame, shares, train_end=5000)
  assert other.params['direction_k'] != lab.params['direction_k']


def test_regime_agreement_with_the_generator():
  """Default (fixed-threshold) regime labels vs the generator's dominant regime on held-out rows.

  Four 6000-bar markets, labels fitted with train_end = 70% of the bars, compared on the last 30%.
  """
  hits, rows, recall = 0, 0, {}
  for seed in (11, 12, 13, 14):
    frame, true = synthetic_market(6000, seed=seed)
    train_end = 4200
    lab = L.make_labels(frame, None, train_end=train_end)
    held_out = np.arange(train_end, len(frame))
    result = L.regime_agreement(lab.regime, true, 48, rows=held_out)
    hits += result['agreement'] * result['rows']
    rows += result['rows']
    dom = L.dominant_regime(true, 48)[held_out]
    for i, name in enumerate(REGIMES):
      pick = (dom == i) & (lab.regime[held_out] >= 0)
      recall.setdefault(name, []).extend(lab.regime[held_out][pick] == i)
  agreement = hits / rows
  print(f'\nregime agreement on {rows} held-out rows: {agreement:.4f}; recall ' +
        ', '.join(f'{k} {np.mean(v):.2f}' for k, v in recall.items()))
  assert rows > 6500
  assert agreement >= 0.70
  assert all(len(v) > 100 and np.mean(v) > 0.5 for v in recall.values())


def test_dominant_regime_hand_example():
  true = np.array([4, 4, 0, 0, 0, 5, 5, 5, 5])
  np.testing.assert_array_equal(L.dominant_regime(true, 3), [0, 0, 0, 5, 5, 5, -1, -1, -1])
  assert L.regime_agreement(np.array([0, 1, 0, 5, 5, 5, -1, -1, -1]), true, 3)['agreement'] == 5 / 6


def test_breaks_mask_labels_across_gaps(market):
  frame, _ = market
  breaks = np.zeros(len(frame), bool)
  breaks[3000] = True
  lab = L.make_labels(frame, None, train_end=4000, breaks=breaks)
  assert np.all(lab.buy[3000 - 12:3000] == -1) and lab.buy[2999 - 12] >= 0 and lab.buy[3000] >= 0
  assert np.all(lab.regime[3000 - 48:3000] == -1) and lab.regime[3000] >= 0


def test_bad_inputs_raise_user_errors(market):
  frame, _ = market
  with pytest.raises(UserError, match='train_end'):
    L.make_labels(frame, None, train_end=0)
  with pytest.raises(UserError, match='direction_shares'):
    L.make_labels(frame, {'direction_shares': (0.5, -0.1, 0.6)}, train_end=3000)
  with pytest.raises(UserError, match='close'):
    L.make_labels({'high': [1.0, 2.0], 'low': [1.0, 1.0]}, None, train_end=1)


def _reference_barrier(high, low, close, sigma, horizon, pt, sl):
  """Bar-by-bar loops, written from the definition: the oracle for the vectorised version."""
  n = len(close)
  out = {'buy': np.full(n, -1), 'sell': np.full(n, -1), 'exit_long': np.full(n, -1), 'exit_short': np.full(n, -1)}
  for t in range(n - horizon):
    for side, tp, stop in (('long', close[t] * np.exp(pt * sigma[t]), close[t] * np.exp(-sl * sigma[t])),
                           ('short', close[t] * np.exp(-pt * sigma[t]), close[t] * np.exp(sl * sigma[t]))):
      win, end = 0, t + horizon
      for s in range(t + 1, t + horizon + 1):
        hit_tp = high[s] >= tp if side == 'long' else low[s] <= tp
        hit_stop = low[s] <= stop if side == 'long' else high[s] >= stop
        if hit_stop or hit_tp:
          win, end = int(hit_tp and not hit_stop), s
          break
      out['buy' if side == 'long' else 'sell'][t] = win
      out['exit_' + side][t] = end
  return out


@pytest.mark.parametrize('seed', range(6))
def test_triple_barrier_matches_a_bar_by_bar_reference(seed):
  rng = np.random.default_rng(seed)
  n, horizon = 80, 6
  close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, n)))
  high = close * np.exp(np.abs(rng.normal(0, 0.01, n)))
  low = close * np.exp(-np.abs(rng.normal(0, 0.01, n)))
  sigma = rng.uniform(0.005, 0.02, n)
  buy, sell, exit_long, exit_short = L.triple_barrier(high, low, close, sigma, horizon, 2.0, 1.0)
  ref = _reference_barrier(high, low, close, sigma, horizon, 2.0, 1.0)
  np.testing.assert_array_equal(buy, ref['buy'])
  np.testing.assert_array_equal(sell, ref['sell'])
  np.testing.assert_array_equal(exit_long, ref['exit_long'])
  np.testing.assert_array_equal(exit_short, ref['exit_short'])
  assert np.sum(buy == 1) > 3 and np.sum(sell == 1) > 3 and np.sum((buy == 0) & (sell == 0)) > 3


@pytest.mark.parametrize('seed', range(4))
def test_uniqueness_matches_a_loop_reference(seed):
  rng = np.random.default_rng(seed)
  n = 60
  starts = rng.integers(0, n - 8, 40)
  ends = starts + rng.integers(0, 8, 40)
  starts[:5] = -1                                   # unlabelled rows
  live = starts >= 0
  concurrency = np.array([np.sum(live & (starts <= s) & (ends >= s)) for s in range(n)])
  expected = [np.mean(1.0 / concurrency[a:b + 1]) if a >= 0 else 0.0 for a, b in zip(starts, ends)]
  np.testing.assert_allclose(L.uniqueness_weights(starts, ends, n), expected, rtol=1e-6)
