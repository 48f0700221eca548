"""natron.baselines: rules from the past only, fitted on the training span only; the linear model is DLinear.

Plus the verdict machinery end to end at the dataset level: on a random walk on a tick grid a trained model (the
linear one, through the same `with_baselines` the fine-tuning report uses) reads "no evidence" in direction; on
the default learnable market it shows skill over majority, and the margin over momentum is stated with its
interval whatever its sign.
"""
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from configs import finetune as finetune_config
from natron import baselines
from natron import data as data_lib
from natron import dataset as dataset_lib
from natron import labels as labels_lib
from natron.train import evaluate
from natron.train.finetune import tempered_class_weights

from conftest import gamma32

POINT = 1e-5


def small_config(bars=6000):
  config = finetune_config.get_config('quick')
  config.data.synthetic_bars = bars
  config.dataset.window = 32
  config.baselines.linear_epochs = 3
  config.evaluation.bootstrap = 400
  return config


def random_walk_frame(n, seed=0):
  """A driftless random walk on a 1e-5 tick grid: OHLC in whole ticks, 15-minute bars, a 10-point spread."""
  rng = np.random.default_rng(seed)
  close_ticks = 110_000 + np.cumsum(rng.integers(-6, 7, n))
  open_ticks = np.r_[close_ticks[0], close_ticks[:-1]]
  high = np.maximum(open_ticks, close_ticks) + rng.integers(0, 4, n)
  low = np.minimum(open_ticks, close_ticks) - rng.integers(0, 4, n)
  frame = pd.DataFrame({'time': pd.date_range('2024-01-01', periods=n, freq='15min', tz='UTC'),
                        'open': open_ticks * POINT, 'high': high * POINT, 'low': low * POINT,
                        'close': close_ticks * POINT, 'volume': rng.integers(20, 200, n).astype(np.float64),
                        'spread': np.full(n, 10 * POINT)})
  frame.attrs['points'] = {'SYMBOL': POINT}
  return frame


def report_of(ds, config, split='test'):
  """{task: with_baselines entry} with the linear baseline as the model under test."""
  cw = tempered_class_weights(ds.class_weights, 0.5)
  preds, momentum, linear, history = baselines.fit_and_predict(ds, config, cw)
  ends = ds.split_ends(split)
  out = {}
  for task in labels_lib.TASKS:
    block = evaluate.bootstrap_block(ds.info['label_params'], -1, task)
    y = ds.labels.task(task)[ends]
    others = {k: v[task] for k, v in preds[split].items() if k != 'linear'}
    out[task] = evaluate.with_baselines({}, y, preds[split]['linear'][task], others, labels_lib.NUM_CLASSES[task],
                                        block=block, n_boot=int(config.evaluation.bootstrap), seed=0)
  return out, momentum, history


@pytest.fixture(scope='module')
def learnable():
  config = small_config()
  return dataset_lib.build_dataset(data_lib.load_market(config.data), config), config


def test_past_score_uses_only_the_past():
  close = np.exp(np.cumsum(np.random.default_rng(0).normal(0, 1e-3, 400)))
  sigma = labels_lib.ewm_volatility(close, 20)
  full = baselines.past_score(close, sigma, 12)
  for t in (30, 150, 399):
    prefix = baselines.past_score(close[:t + 1], labels_lib.ewm_volatility(close[:t + 1], 20), 12)
    np.testing.assert_array_equal(prefix[-1], full[t])   # bit-exact: the same float64 operations
  assert np.isnan(full[:12]).all()


def test_trailing_regime_is_the_label_rule_on_the_window_that_just_ended(learnable):
  ds, config = learnable
  b = ds.bounds[0]
  close, sigma = ds.close[b['start']:b['stop']], ds.labels.sigma[b['start']:b['stop']]
  params = ds.info['label_params'][b['symbol']]
  h = int(params['regime_horizon'])
  trail = baselines.trailing_regime(close, sigma, params, int(config.labels.regime_vol_lookback))
  # The trend part does not depend on the volatility median: where both rules see a calm, trending window,
  # the trailing label at t is the forward label at t - H_r.
  forward = ds.labels.regime[b['start']:b['stop']]
  both = (trail[h:] >= 0) & (forward[:-h] >= 0) & (trail[h:] < labels_lib.RANGE) & (forward[:-h] < labels_lib.RANGE)
  assert both.sum() > 100
  np.testing.assert_array_equal(trail[h:][both], forward[:-h][both])
  # No look-ahead: computing on a prefix gives the same trailing labels.
  cut = len(close) - 500
  prefix = baselines.trailing_regime(close[:cut], sigma[:cut], params, int(config.labels.regime_vol_lookback))
  np.testing.assert_array_equal(prefix, trail[:cut])


def test_momentum_is_fitted_on_the_training_span_only(learnable):
  ds, config = learnable
  train = ds.split_ends('train')
  fitted = baselines.fit_momentum(ds, train, config.labels)
  # Changing the labels of every non-training row changes nothing.
  saved = {t: ds.labels.task(t).copy() for t in labels_lib.TASKS}
  try:
    outside = np.setdiff1d(np.arange(len(ds.close)), train)
    for t in labels_lib.TASKS:
      ds.labels.task(t)[outside] = 0
    assert baselines.fit_momentum(ds, train, config.labels) == fitted
  finally:
    for t in labels_lib.TASKS:
      setattr(ds.labels, t, saved[t])
  for task in ('buy', 'sell', 'direction'):
    assert fitted[task]['lookback'] in {max(1, round(m * 12)) for m in baselines.LOOKBACKS}


def test_linear_model_is_dlinear_trend_plus_remainder():
  rng = np.random.default_rng(0)
  w, f = 32, 5
  a = baselines.trend_matrix(w)
  np.testing.assert_allclose(a.sum(axis=1), 1.0, rtol=0, atol=w * 2**-24)   # a mean: rows sum to 1
  params = {'trend': jnp.asarray(rng.normal(size=(w, f, 13)), jnp.float32),
            'rest': jnp.asarray(rng.normal(size=(w, f, 13)), jnp.float32),
            'bias': jnp.asarray(rng.normal(size=13), jnp.float32)}
  x = rng.normal(size=(4, w, f)).astype(np.float32)
  got = baselines.linear_logits(params, jnp.asarray(x))
  trend = np.einsum('vw,bwf->bvf', a.astype(np.float64), x)
  ref = (np.einsum('bwf,wfc->bc', trend, np.asarray(params['trend'], np.float64))
         + np.einsum('bwf,wfc->bc', x - trend, np.asarray(params['rest'], np.float64))
         + np.asarray(params['bias'], np.float64))
  # float32 sums of 2 * W * F products of O(1) terms (|x|, |w| ~ 1, ~3 sigma): gamma_n times the sum of |terms|.
  atol = gamma32(4 * w * f + w) * 2 * w * f * 9
  np.testing.assert_allclose(np.concatenate([np.asarray(got[t]) for t in labels_lib.TASKS], axis=1), ref,
                             rtol=0, atol=atol)


def test_learnable_market_shows_skill_over_majority_and_states_the_margin_over_momentum(learnable):
  ds, config = learnable
  report, momentum, history = report_of(ds, config)
  d = report['direction']
  assert d['margins']['majority']['ci'][0] > 0, d['verdicts']['majority']
  assert d['verdicts']['majority'].startswith('skill over majority')
  m = d['margins']['momentum']
  assert np.isfinite(m['value']) and m['ci'][0] <= m['ci'][1]
  assert 'momentum' in d['verdicts']['momentum']
  assert len(history) == int(config.baselines.linear_epochs)


def test_random_walk_reads_no_evidence_in_direction():
  config = small_config()
  ds = dataset_lib.build_dataset(random_walk_frame(6000, seed=3), config)
  report, _, _ = report_of(ds, config)
  d = report['direction']
  assert d['verdict'].startswith('no evidence of skill over'), d['verdict']
  assert d['verdicts']['majority'].startswith('no evidence'), d['verdicts']['majority']


def test_end_to_end_finetune_on_a_random_walk_reads_no_evidence_in_direction(tmp_path, fast_compile):
  """The fine-tuning phase itself, tiny, on a random-walk CSV on a tick grid: direction has no skill to find."""
  import test_finetune   # pylint: disable=g-import-not-at-top
  from natron.train import finetune   # pylint: disable=g-import-not-at-top
  frame = random_walk_frame(3500, seed=11).drop(columns=['spread'])
  frame['time'] = frame['time'].dt.strftime('%Y-%m-%d %H:%M')
  path = tmp_path / 'RW.csv'
  frame.to_csv(path, index=False)
  config = test_finetune.tiny_config()
  config.data.path = str(path)
  config.data.point = '1e-5'
  finetune.run_phase(config, str(tmp_path / 'run'))
  report = test_finetune.read_report(str(tmp_path / 'run'))
  for split in ('val', 'test'):
    d = report[split]['direction']
    assert d['verdict'].startswith('no evidence of skill over'), (split, d['verdict'])


def test_rl_holdout_purges_the_encoders_training_windows_by_label_end(learnable):
  """finetune.rl_holdout: no training window kept for the encoder has a label reading a bar of the RL part."""
  from natron.train import finetune   # pylint: disable=g-import-not-at-top
  ds, _ = learnable
  saved = ds.ends['train'].copy()
  try:
    starts = finetune.hold_out_for_rl(ds, 0.3)
    kept = ds.ends['train']
    (sym, start), = starts.items()
    b = ds.bounds[0]
    first = int(saved.min())
    assert start == b['train_end'] - round(0.3 * (b['train_end'] - first))
    assert np.all(dataset_lib.label_end_rows(kept, ds.labels.t1) < start)
    # Exactly the windows whose labels reach the RL part were dropped, no more.
    dropped = np.setdiff1d(saved, kept)
    assert np.all(dataset_lib.label_end_rows(dropped, ds.labels.t1) >= start)
    assert 0.25 < len(dropped) / len(saved) < 0.35
  finally:
    ds.ends['train'] = saved
  assert finetune.hold_out_for_rl(ds, 0.0)[ds.bounds[0]['symbol']] == ds.bounds[0]['train_end']
  np.testing.assert_array_equal(ds.ends['train'], saved)
