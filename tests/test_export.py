"""Export phase: natron.onnx + natron.jax + natron.json of the tiny test bundle, and their parity.

Parity is measured on quantised real-like data, three instruments on their own quote grids (5-digit FX ~1.1,
3-digit JPY ~150, 2-digit gold ~3000), >= 50 windows in all, prices converted to points as the server does
(`candles_in_points`, float64) and as the EA does (MathRound(price / _Point) in double):
- onnxruntime (the oracle for MT5's ONNX Runtime) vs the JAX function predict_fn: 1e-4 absolute. Both are
  float32 graphs of the same arithmetic; the ONNX kernels sum and fuse in other orders, and a probability's
  rounding is bounded by conftest.prob_atol (well below 1e-4 at this size);
- the deserialised jax.export program vs predict_fn: 1e-6 (the same StableHLO, compiled by the same XLA;
  only the vmap over the batch differs).

The export runs once per session (module fixture): the jax2onnx conversion of the feature graph is the
slowest step of the suite (see configs/export.py for its runtime).
"""
import functools
import json
import os

import jax
import numpy as np
import pandas as pd
import pytest

import mt5_client
from natron import checkpoint
from natron import export as export_lib
from natron import predictor as predictor_lib
from natron.data import grid, synthetic_market
from natron.serve.engine import ServingPredictor
from test_predictor import BUCKETS, atol, bundle_dir, shared_predictor

INSTRUMENTS = (('EURUSD', 1.1, 1e-5), ('USDJPY', 150.0, 1e-3), ('XAUUSD', 3000.0, 1e-2))
WINDOWS_PER_INSTRUMENT = 17          # 51 windows in all
ONNX_ATOL = 1e-4
EXPORT_ATOL = 1e-6


def quiet_session_options():
  import onnxruntime   # pylint: disable=g-import-not-at-top
  options = onnxruntime.SessionOptions()
  options.log_severity_level = 3    # not the unused-initializer warnings of every Loop body
  return options


@functools.lru_cache(maxsize=None)
def exported_dir() -> str:
  from configs import export as export_config   # pylint: disable=g-import-not-at-top
  config = export_config.get_config()
  config.bundle = bundle_dir()
  config.executables = False    # tested in tests/test_engine_startup.py; here they would cost fresh compiles
  workdir = os.path.dirname(os.path.dirname(bundle_dir()))
  export_lib.run_phase(config, workdir)
  return os.path.join(workdir, 'export')


@pytest.fixture(scope='module')
def out_dir():
  return exported_dir()


@pytest.fixture(scope='module')
def meta(out_dir):
  return export_lib.read_meta(out_dir)


@functools.lru_cache(maxsize=None)
def instrument(level: float, point: float) -> pd.DataFrame:
  """The synthetic market (5-digit, ~1.1) moved to `level` and re-quantised to `point` (float64 prices)."""
  frame = synthetic_market(1200, seed=11)[0]
  scale = level / 1.1
  out = frame.copy()
  for k in ('open', 'high', 'low', 'close'):
    out[k] = np.rint(frame[k].to_numpy() * scale / point) * point
  out['high'] = out[['open', 'high', 'low', 'close']].max(axis=1)
  out['low'] = out[['open', 'high', 'low', 'close']].min(axis=1)
  return out


def windows_of(frame: pd.DataFrame, r: int) -> tuple[np.ndarray, list[pd.DataFrame]]:
  """WINDOWS_PER_INSTRUMENT windows [n, r, 5] (float64 prices), ending at spread-out bars."""
  ends = np.linspace(r - 1, len(frame) - 1, WINDOWS_PER_INSTRUMENT).astype(int)
  parts = [frame.iloc[e - r + 1:e + 1] for e in ends]
  return np.stack([p[list(predictor_lib.COLUMNS)].to_numpy(np.float64) for p in parts]), parts


@functools.lru_cache(maxsize=None)
def reference() -> dict:
  """predict_fn (jit, batch 1) on every parity window, in points: {symbol: (points [n, r, 5], outputs)}."""
  params, meta = checkpoint.load_bundle(bundle_dir())
  fn = jax.jit(predictor_lib.predict_fn(params, meta))
  r = int(meta['required_candles'])
  out = {}
  for symbol, level, point in INSTRUMENTS:
    candles, _ = windows_of(instrument(level, point), r)
    points = predictor_lib.candles_in_points(candles, point)
    rows = [jax.tree.map(np.asarray, fn(points[i:i + 1])) for i in range(len(points))]
    out[symbol] = points, {k: np.concatenate([row[k] for row in rows]) for k in export_lib.OUTPUTS}
  return out


def test_export_writes_the_three_files_and_the_contract(out_dir, meta):
  assert sorted(os.listdir(out_dir)) == ['natron.jax', 'natron.json', 'natron.onnx']
  params, bundle_meta = checkpoint.load_bundle(bundle_dir())
  del params
  r = int(bundle_meta['required_candles'])
  assert meta['format'] == export_lib.EXPORT_FORMAT and meta['opset'] == export_lib.ONNX_OPSET == 14
  assert meta['required_candles'] == r and meta['input']['shape'] == [1, r, 5]
  assert meta['input']['columns'] == ['open', 'high', 'low', 'close', 'volume']
  assert [o['name'] for o in meta['outputs']] == list(export_lib.OUTPUTS)
  assert meta['label_classes']['regime'] == list(bundle_meta['label_classes']['regime'])
  assert meta['num_direction_classes'] == 3 and meta['num_regime_classes'] == 6 and meta['num_columns'] == 5
  assert meta['thresholds'] == {'signal': bundle_meta['thresholds']['signal']}
  assert meta['model_version'] == bundle_meta['model_version']
  assert meta['feature_schema_hash'] == bundle_meta['feature_schema_hash']
  for name in ('natron.onnx', 'natron.jax'):
    assert meta['files'][name]['sha256'] == export_lib.sha256_of(os.path.join(out_dir, name))
  assert 'points' in meta['input']['prices'] and 'UTC' in meta['time']


def test_onnx_graph_runs_on_mt5s_onnx_runtime_kernels(out_dir, meta):
  """Opset 14 (<= 18, what ONNX Runtime 1.14 runs) and only operators with 1.14 CPU kernels; the names and
  shapes the EA sets with OnnxSetInputShape / OnnxSetOutputShape."""
  import onnx   # pylint: disable=g-import-not-at-top
  model = onnx.load(os.path.join(out_dir, 'natron.onnx'))
  onnx.checker.check_model(model)
  assert {o.domain or 'ai.onnx': o.version for o in model.opset_import}.get('ai.onnx') == 14
  ops = export_lib.operators(model)
  assert set(ops) <= export_lib.ORT_1_14_CPU_OPS, sorted(set(ops) - export_lib.ORT_1_14_CPU_OPS)
  assert meta['files']['natron.onnx']['operators'] == ops
  ea = mt5_client.OnnxEA(os.path.join(out_dir, 'natron.onnx'), meta, point=1e-5)   # raises on a mismatch
  assert ea.required == meta['required_candles']


def test_onnx_equals_the_jax_function_on_three_quote_grids(out_dir):
  import onnxruntime   # pylint: disable=g-import-not-at-top
  session = onnxruntime.InferenceSession(os.path.join(out_dir, 'natron.onnx'), quiet_session_options(),
                                         providers=['CPUExecutionProvider'])
  n, worst = 0, 0.0
  for symbol, (points, expected) in reference().items():
    for i in range(len(points)):
      got = dict(zip(export_lib.OUTPUTS, session.run(list(export_lib.OUTPUTS), {'candles': points[i:i + 1]})))
      for key in export_lib.OUTPUTS:
        np.testing.assert_allclose(got[key], expected[key][i:i + 1], atol=ONNX_ATOL, rtol=0,
                                   err_msg=f'{symbol} window {i} {key}')
        worst = max(worst, float(np.max(np.abs(got[key] - expected[key][i:i + 1]))))
      n += 1
  assert n >= 50
  print(f'onnx vs jax: {n} windows, max abs difference {worst:.2e}')


def test_jax_export_equals_the_jax_function(out_dir):
  """The deserialised program (symbolic batch) vs predict_fn traced now, on the same batch of windows per
  instrument: the same StableHLO through the same XLA, so only compilation differences remain."""
  params, bundle_meta = checkpoint.load_bundle(bundle_dir())
  program = export_lib.load_jax_export(out_dir, bundle_meta)
  call, fn = jax.jit(program.call), jax.jit(predictor_lib.predict_fn(params, bundle_meta))
  n, worst = 0, 0.0
  for symbol, (points, _) in reference().items():
    got, want = jax.tree.map(np.asarray, call(points)), jax.tree.map(np.asarray, fn(points))
    for key in export_lib.OUTPUTS:
      np.testing.assert_allclose(got[key], want[key], atol=EXPORT_ATOL, rtol=0, err_msg=f'{symbol} {key}')
      worst = max(worst, float(np.max(np.abs(got[key] - want[key]))))
    n += len(points)
  assert n >= 50
  print(f'jax.export vs jax: {n} windows, max abs difference {worst:.2e}')


def test_ea_points_equal_the_servers_points():
  """MathRound(price / _Point) in double (the EA's ONNX input) == grid.to_ticks (the server and training)."""
  r = shared_predictor().required_candles
  for _, level, point in INSTRUMENTS:
    _, parts = windows_of(instrument(level, point), r)
    for part in parts[:3]:
      ea = mt5_client.points_input(part, point)[0]
      server = predictor_lib.candles_in_points(part[list(predictor_lib.COLUMNS)].to_numpy(np.float64), point)
      np.testing.assert_array_equal(ea, server)
      assert np.array_equal(ea[:, :4], grid.to_ticks(part[['open', 'high', 'low', 'close']].to_numpy(), point))


def test_onnx_ea_decides_what_the_server_decides(out_dir, meta):
  """The ONNX engine, bar by bar (mt5_client.OnnxEA), against the server's engine on the same closed bars."""
  served = shared_predictor()
  r = served.required_candles
  frame = instrument(1.1, 1e-5).reset_index(drop=True)
  ea = mt5_client.OnnxEA(os.path.join(out_dir, 'natron.onnx'), meta, point=1e-5, threshold=served.threshold)
  start = r + 5
  ea.init(frame.iloc[:start])
  seen = 0
  for n in range(start + 1, start + 8):
    decision = ea.on_tick(frame.iloc[:n])
    closed = frame.iloc[n - 1 - r:n - 1]
    if decision.action == 'REFUSED':      # only a weekend gap may stop it (the bar is then stale)
      assert decision.reason == 'stale bar'
      continue
    local = served.predict(closed[list(predictor_lib.COLUMNS)].to_numpy(np.float64), point=1e-5)
    assert decision.buy_prob == pytest.approx(float(local['buy_prob'][0]), abs=ONNX_ATOL + atol())
    if abs(max(decision.buy_prob, decision.sell_prob) - served.threshold) > 1e-3:
      assert decision.action == local['signal'][0]
    seen += 1
  assert seen >= 3


def test_server_can_start_from_the_exported_program(out_dir):
  """ServingPredictor(exported=...) calls natron.jax instead of tracing predict_fn: same predictions."""
  traced = shared_predictor()
  engine = ServingPredictor.load(bundle_dir(), buckets=BUCKETS, series_chunk=0, exported=out_dir)
  assert engine.info()['program'] == 'jax.export' and engine.trace_count == len(BUCKETS)
  r = traced.required_candles
  frame = instrument(3000.0, 1e-2)
  candles, _ = windows_of(frame, r)
  got, want = engine.predict(candles[:5]), traced.predict(candles[:5])
  for key in export_lib.OUTPUTS:
    np.testing.assert_allclose(got[key], want[key], atol=atol(), rtol=0)
  assert list(got['signal']) == list(want['signal'])


def test_exported_program_of_another_model_is_refused(out_dir, tmp_path):
  params, bundle_meta = checkpoint.load_bundle(bundle_dir())
  del params
  other = dict(bundle_meta, model_version='someone-else')
  with pytest.raises(Exception, match='exported from another model'):
    export_lib.load_jax_export(out_dir, other)
  with open(os.path.join(out_dir, 'natron.json')) as f:
    info = json.load(f)
  (tmp_path / 'natron.json').write_text(json.dumps(info))
  (tmp_path / 'natron.jax').write_bytes(b'truncated')
  with pytest.raises(Exception, match='sha256'):
    export_lib.load_jax_export(str(tmp_path), bundle_meta)


def test_export_phase_is_registered():
  from natron import phases   # pylint: disable=g-import-not-at-top
  from configs import export as export_config   # pylint: disable=g-import-not-at-top
  assert phases.PHASES['export'] == 'natron.export' and phases.PHASES['infer'] == 'natron.infer'
  config = export_config.get_config()
  assert config.phase == 'export' and config.opset == 14
