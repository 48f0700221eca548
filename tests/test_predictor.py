"""predict_fn, Predictor (series path) and the serving engine: train/serve parity, bucket padding without
recompiles, the signal rule (natron.signals), the infer phase, clear errors.

One tiny bundle (random parameters, a scaler fitted on real feature rows, saved with checkpoint.save_bundle)
is built once per test session by `bundle_dir()`; `shared_predictor()` is its ServingPredictor
(natron.serve.engine), which tests/test_serve.py serves too, so the feature graph is compiled only for
bucket 4, one series chunk and one series length.
"""
import atexit
import functools
import os
import shutil
import tempfile

import jax
import numpy as np
import pandas as pd
import pytest

from configs import base
from natron import checkpoint
from natron import features
from natron.data import synthetic_market
from natron.dataset import fit_scaler
from natron.labels import DIRECTIONS, REGIMES
from natron.model import NatronModel
from natron import predictor as predictor_lib
from natron.predictor import Predictor, TooFewCandles, resolve_bundle
from natron.serve.engine import ServingPredictor
from natron.signals import signal_rule
from conftest import gamma32, prob_atol

WINDOW = 16
SERIES_BARS = 1200      # one length for the scaler fit and the parity series (one compile of compute_features)
BUCKETS = (4,)          # one bucket: requests of 1..3 are padded, larger ones split (each compile is costly)
SERIES_CHUNK = 8
THRESHOLD = 0.5         # random heads give probabilities near 0.5: this makes BUY and SELL both reachable


def tiny_config():
  config = base.get_base_config()
  config.dataset.window = WINDOW
  config.model.update(d_model=16, num_heads=2, num_layers=1, d_ff=32, head_hidden=16, dropout=0.0)
  return config


def atol() -> float:
  """The float32 bound for one probability computed under two batch shapes / chunkings (conftest.prob_atol)."""
  return prob_atol(tiny_config().model.to_dict(), WINDOW, features.NUM_FEATURES)


# A softmax's probabilities sum to 1 up to the rounding of its k-term sum and the k divisions.
SUM_ATOL = gamma32(2 * len(REGIMES))
U32_ULP = float(np.finfo(np.float32).eps)


@functools.lru_cache(maxsize=None)
def market(n_bars: int = SERIES_BARS) -> pd.DataFrame:
  return synthetic_market(n_bars, seed=3)[0]


@functools.lru_cache(maxsize=None)
def bundle_dir() -> str:
  """A bundle directory: tiny NatronModel with random params + a scaler fitted on real feature rows."""
  config = tiny_config()
  feats, names = features.compute_features(market())
  scaler = fit_scaler(feats[features.WARMUP:], clip=5.0, feature_names=names)
  x = np.zeros((1, WINDOW, len(names)), np.float32)
  params = NatronModel(config.model.to_dict()).init(jax.random.key(0), x, train=False)['params']
  # Make the heads' logits spread out, so probabilities vary and every signal occurs.
  params = jax.tree.map(lambda p: p * 3.0, params)
  meta = {
      'config': config.to_dict(), 'feature_names': names,
      'feature_schema_hash': features.feature_schema_hash(), 'scaler': scaler, 'window': WINDOW,
      'warmup': features.WARMUP, 'required_candles': WINDOW + features.WARMUP,
      'label_classes': {'direction': DIRECTIONS, 'regime': REGIMES}, 'thresholds': {'signal': THRESHOLD},
      'model_version': 'test-tiny-1',
  }
  root = tempfile.mkdtemp(prefix='natron-test-bundle-')
  atexit.register(shutil.rmtree, root, True)
  return checkpoint.save_bundle(os.path.join(root, 'finetune', 'bundle'), params, meta)


@functools.lru_cache(maxsize=None)
def shared_predictor() -> ServingPredictor:
  return ServingPredictor.load(bundle_dir(), buckets=BUCKETS, series_chunk=SERIES_CHUNK)


def ohlcv_array(frame: pd.DataFrame) -> np.ndarray:
  return frame[['open', 'high', 'low', 'close', 'volume']].to_numpy(np.float32)


@pytest.fixture(scope='module')
def predictor():
  return shared_predictor()


def test_load_accepts_workdir_and_reports_required_candles(predictor):
  workdir = os.path.dirname(os.path.dirname(bundle_dir()))
  assert resolve_bundle(workdir) == bundle_dir()
  assert predictor.required_candles == WINDOW + features.WARMUP
  assert predictor.threshold == THRESHOLD and predictor.model_version == 'test-tiny-1'
  info = predictor.info()
  assert info['num_features'] == features.NUM_FEATURES and info['labels']['regime'] == list(REGIMES)


def test_train_serve_parity(predictor):
  """The last required_candles bars give the prediction the full-history batch path gives for that bar."""
  frame = market()
  series = predictor.predict_series(frame)
  r = predictor.required_candles
  assert np.isnan(series['buy_prob'][:r - 1]).all() and not series['valid'][:r - 1].any()
  assert (series['signal'][:r - 1] == 'HOLD').all() and series['valid'][r - 1:].all()
  assert series['encoded'].shape == (len(frame), 16)
  candles = ohlcv_array(frame)
  bars = np.array([r - 1, r + 40, len(frame) - 1])
  windows = np.stack([candles[t - r + 1:t + 1] for t in bars])
  served = predictor.predict(windows, times=frame['time'].to_numpy()[bars])
  for key in ('buy_prob', 'sell_prob', 'direction_probs', 'regime_probs'):
    np.testing.assert_allclose(served[key], series[key][bars], atol=atol(), rtol=0)
  assert 'encoded' not in served    # the served function returns probabilities only (predict_fn)
  assert list(served['signal']) == list(series['signal'][bars])
  # More candles than needed: only the last required_candles count.
  longer = predictor.predict(candles[:r + 41])
  np.testing.assert_allclose(longer['buy_prob'], served['buy_prob'][1:2], atol=atol())   # batch 1 vs 3


def test_series_chunks_equal_windows(predictor):
  """predict_recent (compiled chunks, what /batch_predict series mode uses) == /predict's window path."""
  candles = ohlcv_array(market())
  r = predictor.required_candles
  part = candles[:r + 10]        # 11 predictions: one full chunk of 8 and a padded one
  recent = predictor.predict_recent(part)
  windows = np.lib.stride_tricks.sliding_window_view(part, (r, 5))[:, 0]
  direct = predictor.predict(windows)
  assert recent['buy_prob'].shape == (11,)
  for key in ('buy_prob', 'sell_prob', 'direction_probs', 'regime_probs'):
    np.testing.assert_allclose(recent[key], direct[key], atol=atol(), rtol=0)


def test_bucket_padding_never_recompiles(predictor):
  """Any batch size is padded/split onto the compiled buckets: the trace counter does not move."""
  candles = ohlcv_array(market())
  r = predictor.required_candles
  windows = np.stack([candles[i:i + r] for i in range(0, 11 * 7, 7)])   # 11 distinct windows
  traces = predictor.trace_count
  assert traces == len(BUCKETS) + 1          # one per bucket + the series chunk, all at load time
  together = predictor.predict(windows)
  for n in (1, 2, 3, 5, 11):
    part = predictor.predict(windows[:n])
    np.testing.assert_allclose(part['buy_prob'], together['buy_prob'][:n], atol=atol())
  predictor.predict_recent(candles[:r + 20])
  assert predictor.trace_count == traces
  assert together['buy_prob'].shape == (11,) and np.unique(together['buy_prob']).size > 1


def test_too_few_candles_is_a_clear_error(predictor):
  candles = ohlcv_array(market())
  r = predictor.required_candles
  with pytest.raises(TooFewCandles, match=f'needs {r}'):
    predictor.predict(candles[:r - 1])
  with pytest.raises(TooFewCandles, match=f'{r}'):
    predictor.predict_series(market().iloc[:r - 1])


def test_outputs_are_distributions_and_signal_follows_rule(predictor):
  frame = market()
  pred = predictor.predict_series(frame, with_encoded=False)
  valid = pred['valid']
  assert 'encoded' not in pred
  np.testing.assert_allclose(pred['direction_probs'][valid].sum(-1), 1.0, atol=SUM_ATOL)
  np.testing.assert_allclose(pred['regime_probs'][valid].sum(-1), 1.0, atol=SUM_ATOL)
  expected = signal_rule(pred['buy_prob'][valid], pred['sell_prob'][valid], THRESHOLD)
  assert list(pred['signal'][valid]) == list(expected)
  assert set(pred['signal'][valid]) >= {'BUY', 'SELL'}
  np.testing.assert_allclose(pred['confidence'][valid],
                             np.maximum(pred['buy_prob'], pred['sell_prob'])[valid])
  np.testing.assert_allclose(pred['regime_confidence'][valid], pred['regime_probs'][valid].max(-1))
  assert set(pred['direction'][valid]) <= set(DIRECTIONS) and set(pred['regime'][valid]) <= set(REGIMES)
  record = predictor.records(pred, rows=[len(frame) - 1])[0]
  assert record['time'] == frame['time'].iloc[-1].strftime('%Y-%m-%dT%H:%M:%SZ')
  assert record['timestamp'] == int(frame['time'].iloc[-1].timestamp())
  assert set(record['direction_probs']) == set(DIRECTIONS) and set(record['regime_probs']) == set(REGIMES)


def test_signal_rule_edges():
  buy = np.array([0.7, 0.7, 0.6, 0.2, 0.59, np.nan, 0.65])
  sell = np.array([0.2, 0.7, 0.1, 0.8, 0.1, 0.9, 0.65])
  assert list(signal_rule(buy, sell, 0.6)) == ['BUY', 'HOLD', 'BUY', 'SELL', 'HOLD', 'HOLD', 'HOLD']


def test_bf16_series_inference_is_close_to_float32():
  """configs/infer.py --config.dtype=bfloat16: bf16 matmul inputs, f32 accumulation, over the same bundle."""
  frame = market()
  ref = Predictor.load(bundle_dir()).predict_series(frame, with_encoded=False)
  low = Predictor.load(bundle_dir(), dtype='bfloat16').predict_series(frame, with_encoded=False)
  valid = ref['valid']
  assert np.array_equal(valid, low['valid']) and valid.any()
  # tests/test_model.py bounds the bf16 logits by 0.1 + 5% of f32's (bfloat16's 2^-9 per rounding over the
  # ~10 roundings of a 2-layer path); a sigmoid/softmax probability moves at most 1/2 as much as its logits.
  for key in ('buy_prob', 'sell_prob'):
    np.testing.assert_allclose(low[key][valid], ref[key][valid], atol=0.1)
  assert not np.array_equal(low['buy_prob'][valid], ref['buy_prob'][valid])   # it really computed in bf16
  assert Predictor.load(bundle_dir(), dtype='bfloat16')._model.config['dtype'] == 'bfloat16'   # pylint: disable=protected-access


def test_infer_phase_writes_one_row_per_bar(tmp_path):
  """The batch-inference CLI path: CSV in, one prediction row per bar out."""
  from configs import infer as infer_config   # pylint: disable=g-import-not-at-top
  from natron.infer import run_phase   # pylint: disable=g-import-not-at-top
  frame = market()
  csv = tmp_path / 'bars.csv'
  frame.drop(columns=['spread']).assign(time=frame['time'].dt.strftime('%Y-%m-%d %H:%M:%S')).to_csv(
      csv, index=False)
  config = infer_config.get_config()
  config.data.path = str(csv)
  config.bundle = bundle_dir()
  config.output = str(tmp_path / 'predictions.csv')
  summary = run_phase(config, str(tmp_path))
  out = pd.read_csv(config.output)
  r = WINDOW + features.WARMUP
  assert len(out) == len(frame) and summary['predicted'] == len(frame) - r + 1
  assert list(out.columns[:5]) == ['time', 'symbol', 'valid', 'buy_prob', 'sell_prob']
  assert {'prob_UP', 'prob_VOLATILE', 'regime_confidence', 'signal', 'confidence'} <= set(out.columns)
  assert not out['valid'][:r - 1].any() and out['valid'][r - 1:].all()
  expected = shared_predictor().predict_series(frame, with_encoded=False)
  # The same program on the same bars (the CSV round-trips float64 exactly); only the CSV's printing of the
  # float32 probability (shortest repr) can differ, by less than an ulp of 1.
  np.testing.assert_allclose(out['buy_prob'][r - 1:], expected['buy_prob'][r - 1:], atol=2 * U32_ULP)


def test_bundle_with_other_feature_schema_is_refused(tmp_path):
  params, meta = checkpoint.load_bundle(bundle_dir())
  meta['feature_schema_hash'] = 'not-this-code'
  other = checkpoint.save_bundle(str(tmp_path / 'bundle'), params, meta)
  with pytest.raises(checkpoint.CheckpointError, match='Feature schema mismatch'):
    Predictor.load(other, buckets=())
  with pytest.raises(checkpoint.CheckpointError, match='No Natron bundle'):
    Predictor.load(str(tmp_path / 'nowhere'))


def test_series_predictor_compiles_nothing_until_used():
  """Predictor.load (backtests, RL, infer) builds no buckets; the old keywords are accepted and ignored."""
  series = Predictor.load(bundle_dir(), buckets=(1, 8), series_chunk=0)
  assert not hasattr(series, 'predict') and not hasattr(series, 'buckets')
  assert series.predict_series(market().iloc[:series.required_candles + 2])['valid'][-3:].all()


def test_predict_fn_is_the_served_function(predictor):
  """predict_fn(params, meta) on points == the engine's bucketed window path (same arithmetic, batch 1)."""
  params, meta = checkpoint.load_bundle(bundle_dir())
  frame = market()
  r = predictor.required_candles
  window = ohlcv_array(frame)[-r:]
  fn = jax.jit(predictor_lib.predict_fn(params, meta))
  out = fn(predictor_lib.candles_in_points(window[None]))
  served = predictor.predict(window)
  assert set(out) == {'buy_prob', 'sell_prob', 'direction_probs', 'regime_probs'}
  for key in out:
    np.testing.assert_allclose(np.asarray(out[key]), served[key], atol=atol(), rtol=0)
  with pytest.raises(Exception, match='candles'):
    fn(np.zeros((1, r - 1, 5), np.float32))
