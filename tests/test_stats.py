"""natron.stats: block bootstrap, paired margins, verdicts, PSR / DSR; and the policy evidence of natron.backtest.

Statistics are tested on predictions and returns the tests generate (fast, no model), with known answers: a
predictor with no information reads "no evidence", one with real information reads "skill", and the Sharpe
statistics match their closed forms.
"""
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from natron import backtest
from natron import stats
from natron.train import evaluate

# Two float64 formulas of the same F1 (2PR/(P+R) and 2TP/(predicted+actual)) differ by a few roundings of numbers
# <= 1: 1e-12 is ~4500 ulps, far above that and far below any real difference (>= 1/n for n rows).
F1_ATOL = 1e-12


def markov_labels(n, num_classes, stay, seed):
  """Serially dependent labels: keep the previous class with probability `stay` (like overlapping labels)."""
  rng = np.random.default_rng(seed)
  y = np.empty(n, np.int64)
  y[0] = rng.integers(num_classes)
  draws, stays = rng.integers(num_classes, size=n), rng.random(n) < stay
  for t in range(1, n):
    y[t] = y[t - 1] if stays[t] else draws[t]
  return y


def test_block_indices_are_seeded_wrapped_blocks_of_consecutive_rows():
  idx = stats.block_indices(100, block=12, n_boot=50, seed=3)
  assert idx.shape == (50, 100)
  np.testing.assert_array_equal(idx, stats.block_indices(100, block=12, n_boot=50, seed=3))
  assert not np.array_equal(idx, stats.block_indices(100, block=12, n_boot=50, seed=4))
  blocks = idx[:, :96].reshape(50, 8, 12)
  np.testing.assert_array_equal(np.diff(blocks, axis=-1) % 100, 1)   # consecutive, wrapping round the end
  assert idx.min() >= 0 and idx.max() < 100


def test_batched_metrics_equal_the_single_matrix_definitions():
  rng = np.random.default_rng(0)
  for c in (2, 3, 6):
    y = rng.integers(0, c, size=(20, 300))
    p = np.where(rng.random((20, 300)) < 0.5, y, rng.integers(0, c - 1, size=(20, 300)))   # some classes unused
    cms = stats.confusion_matrices(y, p, c)
    for i in range(20):
      cm = evaluate.confusion_matrix(y[i], p[i], c)
      np.testing.assert_array_equal(cms[i], cm)
      assert stats.accuracy_of(cms[i]) == evaluate.accuracy(cm)
      assert abs(stats.macro_f1_of(cms[i]) - evaluate.macro_f1(cm)) <= F1_ATOL


def test_no_information_reads_no_evidence_and_information_reads_skill():
  y = markov_labels(3000, 3, stay=0.9, seed=1)
  rng = np.random.default_rng(2)
  guess = markov_labels(3000, 3, stay=0.9, seed=5)                 # independent of y, same persistence
  informed = np.where(rng.random(3000) < 0.5, y, rng.integers(0, 3, 3000))   # ~67% right
  majority = np.full(3000, np.bincount(y[:1000]).argmax())
  for model, skilled in ((guess, False), (informed, True)):
    entry = evaluate.with_baselines({}, y, model, {'majority': majority, 'momentum': guess[::-1].copy()}, 3,
                                    block=12, n_boot=500, seed=0)
    for key in ('accuracy_ci', 'macro_f1_ci', 'baselines', 'margin_over_best_baseline', 'verdict'):
      assert key in entry
    best = entry['margin_over_best_baseline']
    lo, hi = best['ci']
    assert lo <= hi
    assert entry['verdict'].startswith('skill over') == skilled, entry['verdict']
    assert entry['verdict'].startswith('no evidence of skill over') != skilled
    assert (lo > 0) == skilled
    assert best['baseline'] in ('majority', 'momentum')


def test_intervals_cover_the_truth_about_as_often_as_promised():
  """Coverage of the 95% interval of an accuracy on dependent labels: a predictor right with probability 0.6
  per row has true accuracy 0.6; over 200 independent series the interval must contain it in ~95% of them.
  Binomial(200, 0.95) lies in [182, 197] with probability > 99.8%; block bootstrap undercovers a little on
  short series, so 175 is the floor."""
  hits = 0
  for seed in range(200):
    y = markov_labels(1500, 2, stay=0.9, seed=1000 + seed)
    right = np.repeat(np.random.default_rng(seed).random(150) < 0.6, 10)   # dependent errors (runs of 10)
    p = np.where(right, y, 1 - y)
    ci = stats.classification_intervals(y, {'m': p}, 2, block=20, n_boot=300, seed=seed)['m']['accuracy_ci']
    hits += ci[0] <= 0.6 <= ci[1]
  assert hits >= 175, hits


def test_psr_and_dsr_follow_bailey_and_lopez_de_prado():
  rng = np.random.default_rng(0)
  r = 0.001 + 0.01 * rng.standard_t(5, size=500)
  sr = r.mean() / r.std(ddof=1)
  g3, g4 = scipy_stats.skew(r), scipy_stats.kurtosis(r, fisher=False)
  expected = scipy_stats.norm.cdf(sr * math.sqrt(499) / math.sqrt(1 - g3 * sr + (g4 - 1) / 4 * sr**2))
  assert stats.probabilistic_sharpe(r) == pytest.approx(expected, rel=1e-12)
  assert stats.deflated_sharpe(r, trials=1) == stats.probabilistic_sharpe(r)
  dsr = [stats.deflated_sharpe(r, trials=n) for n in (1, 2, 10, 100)]
  assert all(a > b for a, b in zip(dsr, dsr[1:]))               # more trials, less evidence
  # SR0 for N trials of known variance: the paper's example (V = 1/2 of annual SR^2 ... ) reduces to this formula.
  z = scipy_stats.norm.ppf
  v = 0.04
  assert stats.expected_max_sharpe(100, v) == pytest.approx(
      math.sqrt(v) * ((1 - stats.EULER_GAMMA) * z(0.99) + stats.EULER_GAMMA * z(1 - 1 / (100 * math.e))))
  assert stats.probabilistic_sharpe(np.zeros(50)) == 0.5


def _random_walk_close(n, seed, point=1e-5):
  ticks = 110_000 + np.cumsum(np.random.default_rng(seed).integers(-8, 9, n))
  return ticks * point


def test_policy_evidence_on_a_random_walk_says_no_evidence_against_flat():
  n = 96 * 60
  close = _random_walk_close(n, 7)
  time = np.datetime64('2024-01-01T00:00') + np.arange(n) * np.timedelta64(15, 'm')
  rng = np.random.default_rng(1)
  policies = {'ppo': backtest.random_policy(n, seed=11), 'supervised': np.sign(rng.standard_normal(n)),
              'buy_and_hold': backtest.buy_and_hold(n), 'flat': backtest.always_flat(n)}
  results = {k: backtest.run(close, p, cost_bps=0.5, spread=np.full(n, 1e-4), time=time)
             for k, p in policies.items()}
  found = backtest.evidence(results, time=time, n_boot=500, trials={'ppo': 4})
  for name in ('ppo', 'supervised'):
    e = found[name]
    for key in ('total_return_ci', 'sharpe_ci', 'psr', 'dsr', 'verdict'):
      assert key in e
    assert e['verdicts']['flat'].startswith('no evidence of skill over flat'), e['verdicts']['flat']
    assert e['verdict'].startswith('no evidence'), e['verdict']
    assert 0.0 <= e['dsr'] <= e['psr'] + 1e-15 <= 1.0 + 1e-15
  assert found['ppo']['trials'] == 4 and found['ppo']['dsr'] < found['ppo']['psr']
  assert found['flat']['total_return_ci'] == [0.0, 0.0]


def test_policy_evidence_sees_a_policy_that_knows_the_next_bar():
  n = 96 * 60
  close = _random_walk_close(n, 8)
  oracle = np.sign(np.r_[np.diff(close), 0.0])    # the next bar's move: skill by construction
  # Without costs: flipping every bar would pay ~2 bps a flip for moves of ~0.4 bps (this tests the statistics).
  results = {k: backtest.run(close, p, cost_bps=0.0, spread=np.zeros(n))
             for k, p in (('supervised', oracle), ('flat', backtest.always_flat(n)),
                          ('buy_and_hold', backtest.buy_and_hold(n)))}
  found = backtest.evidence(results, n_boot=300)
  assert found['supervised']['verdict'].startswith('skill over'), found['supervised']['verdict']
  assert found['supervised']['psr'] > 0.99
