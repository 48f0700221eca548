r"""Speed of data loading and of the feature engine; prints one JSON document (issue 2, section 5).

  python experiments/bench_features.py                     # full run, 1M bars (~1-2 min on 2 cores)
  python experiments/bench_features.py --one_thread        # pin to one core, one XLA thread
  python experiments/bench_features.py --bars=100000 --latency_calls=50 --skip=csv   # quick look

Measures, on the synthetic market (`natron.data.synthetic_market`, 15-minute bars, quantised to the 1e-5 grid
when it is not on a grid already), with prices IN POINTS (`natron.data.grid.to_ticks`, issue 9):
- `csv_load`: `natron.data.load_ohlcv` on a CSV of `--bars` rows written to a temp dir (parse + validate);
- `compute_features`: the jitted core `compute_features_jax` on `--bars` bars of ticks, compile time (lower +
  compile) and steady-state time separately, plus the numpy wrapper `compute_features` end to end (validation,
  point inference, price -> points conversion, the core, transfer back), and the conversion alone
  (`to_points`: the cost of the fix);
- `talib` vs `natron_indicators`: the 17 TA-Lib-covered indicators of `natron.features.indicators` (SMA, EMA,
  RSI, ATR, NATR, ADX, PLUS_DI, MINUS_DI, CCI, MFI, OBV, WILLR, ROC, MACD, BBANDS, STOCH, AROON) at TA-Lib's
  default periods: TA-Lib (float64, single-threaded C) in total and per indicator, and ours fused in one jit
  (float32; +DI, -DI and ADX from the one-pass `dmi`) with its compile time, plus per indicator;
- `serving_latency`: the jitted `compute_features_jax` on one serving window of WARMUP + 96 bars, called
  `--latency_calls` times with numpy inputs after compile: median and p99; plus the window's price -> points
  conversion (`to_points` with the point given, as a server that knows the symbol's point does);
- `parity`: max scaled error (tests/test_indicators.py's measure: |a - b| / max(|b|, scale) after 10 x period)
  of each TA-Lib-defined indicator on generated quote grids (1e-5 at 1.1 with 200,000 bars, 1e-3 at 150, 1e-2
  at 50 and at 3000): ours on ticks vs TA-Lib float64 on ticks (what we match), TA-Lib on the raw float64
  quotes vs TA-Lib on ticks (float64 itself breaks grid ties in ADX/DI), and the old path (ours on float32
  prices) vs TA-Lib on ticks.
Steady-state figures are medians of `--repeats` calls. Absolute times drift on shared machines: compare
ratios taken in the same run.
"""
import argparse
import os
import sys

# Thread pinning must happen before jax (XLA reads its flags at import).
_PARSER = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
_PARSER.add_argument('--bars', type=int, default=1_000_000, help='bars for the CSV and 1M-bar timings')
_PARSER.add_argument('--repeats', type=int, default=3, help='steady-state calls (median reported)')
_PARSER.add_argument('--latency_calls', type=int, default=200, help='calls for the serving-window latency')
_PARSER.add_argument('--one_thread', action='store_true', help='pin to one core and one XLA thread')
_PARSER.add_argument('--skip', default='',
                     help='comma-separated parts to skip: csv,features,indicators,latency,parity')
ARGS = _PARSER.parse_args()
if ARGS.one_thread:
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_cpu_multi_thread_eigen=false').strip()
  os.environ.setdefault('OMP_NUM_THREADS', '1')
  if hasattr(os, 'sched_setaffinity'):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import json  # pylint: disable=g-import-not-at-top,wrong-import-position
import platform  # pylint: disable=wrong-import-position
import tempfile  # pylint: disable=wrong-import-position
import time  # pylint: disable=wrong-import-position

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from natron.features import indicators as ind  # pylint: disable=wrong-import-position
from machine import cpu_model  # pylint: disable=wrong-import-position


def median_time(fn, repeats: int) -> tuple[float, list[float]]:
  """Median and all wall times (s) of `repeats` calls of fn() (results blocked on)."""
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return float(np.median(times)), times


def ms(seconds: float) -> float:
  return round(seconds * 1e3, 3)


def market_arrays(n_bars: int):
  """(frame, dict of float64 OHLCV quotes on a grid) from the synthetic market."""
  from natron.data import grid, synthetic_market
  frame, _ = synthetic_market(n_bars, seed=0)
  prices = ('open', 'high', 'low', 'close')
  try:
    grid.infer_point(frame[list(prices)].to_numpy())
  except grid.GridError:   # a continuous synthetic market: quote it to 5 decimals, as a feed would
    for k in prices:
      frame[k] = np.round(frame[k], 5)
    frame['volume'] = np.round(frame['volume'])
  return frame, {k: frame[k].to_numpy(np.float64) for k in ('open', 'high', 'low', 'close', 'volume')}


def tick_arrays(arrays: dict) -> dict:
  """The same bars with prices in points (float32 exact integers) and float32 volume."""
  import natron.features as nf
  cols, _ = nf.to_points(arrays)
  return dict(zip(('open', 'high', 'low', 'close', 'volume'), cols))


# ------------------------------------------------------------------------------------------------ CSV load

def bench_csv(frame, repeats: int) -> dict:
  from natron.data import load_ohlcv
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'bars.csv')
    t0 = time.perf_counter()
    out = frame.copy()
    out['time'] = out['time'].dt.strftime('%Y-%m-%d %H:%M:%S')
    out.to_csv(path, index=False, float_format='%.6f')
    write_s = time.perf_counter() - t0
    loaded = load_ohlcv(path)   # first read also warms the page cache
    assert len(loaded) == len(frame), (len(loaded), len(frame))
    load_s, times = median_time(lambda: load_ohlcv(path), repeats)
    size_mb = os.path.getsize(path) / 2**20
  return {'rows': len(frame), 'columns': list(frame.columns), 'file_mb': round(size_mb, 1),
          'write_s': round(write_s, 2), 'load_s_median': round(load_s, 3),
          'load_s_all': [round(t, 3) for t in times]}


# ---------------------------------------------------------------------------------------- compute_features

def bench_features(arrays: dict, repeats: int) -> dict:
  import natron.features as nf
  ticks = tick_arrays(arrays)
  cols = [ticks[k] for k in ('open', 'high', 'low', 'close', 'volume')]
  t0 = time.perf_counter()
  lowered = jax.jit(nf.compute_features_jax).lower(*cols)
  trace_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(compiled(*cols))
  steady_s, times = median_time(lambda: compiled(*cols), repeats)
  # The numpy wrapper (validation, point inference, price -> points, transfer back): compile first, then time.
  nf.compute_features(arrays)
  wrapper_s, wrapper_all = median_time(lambda: nf.compute_features(arrays)[0], repeats)
  convert_s, _ = median_time(lambda: nf.to_points(arrays)[0], repeats)
  convert_given_s, _ = median_time(lambda: nf.to_points(arrays, point=1e-5)[0], repeats)
  x = np.asarray(compiled(*cols))
  return {'bars': len(cols[0]), 'num_features': int(x.shape[1]), 'warmup': int(nf.WARMUP),
          'trace_s': round(trace_s, 2), 'compile_s': round(compile_s, 2),
          'compile_total_s': round(trace_s + compile_s, 2), 'steady_ms_median': ms(steady_s),
          'steady_ms_all': [ms(t) for t in times], 'wrapper_ms_median': ms(wrapper_s),
          'wrapper_ms_all': [ms(t) for t in wrapper_all], 'to_points_ms_inferred_point': ms(convert_s),
          'to_points_ms_given_point': ms(convert_given_s),
          'nan_free_after_warmup': bool(np.isfinite(x[nf.WARMUP:]).all())}


# ------------------------------------------------------------------------------------- TA-Lib comparison

def talib_calls(m):
  import talib
  h, l, c, v = m['high'], m['low'], m['close'], m['volume']
  return {
      'SMA': lambda: talib.SMA(c), 'EMA': lambda: talib.EMA(c), 'RSI': lambda: talib.RSI(c),
      'ATR': lambda: talib.ATR(h, l, c), 'NATR': lambda: talib.NATR(h, l, c),
      'ADX': lambda: talib.ADX(h, l, c), 'PLUS_DI': lambda: talib.PLUS_DI(h, l, c),
      'MINUS_DI': lambda: talib.MINUS_DI(h, l, c), 'CCI': lambda: talib.CCI(h, l, c),
      'MFI': lambda: talib.MFI(h, l, c, v), 'OBV': lambda: talib.OBV(c, v),
      'WILLR': lambda: talib.WILLR(h, l, c),
      'ROC': lambda: talib.ROC(c), 'MACD': lambda: talib.MACD(c), 'BBANDS': lambda: talib.BBANDS(c),
      'STOCH': lambda: talib.STOCH(h, l, c), 'AROON': lambda: talib.AROON(h, l),
  }


def natron_calls():
  """name -> fn(h, l, c, v) with TA-Lib's default periods (same keys as talib_calls)."""
  return {
      'SMA': lambda h, l, c, v: ind.sma(c), 'EMA': lambda h, l, c, v: ind.ema(c),
      'RSI': lambda h, l, c, v: ind.rsi(c), 'ATR': lambda h, l, c, v: ind.atr(h, l, c),
      'NATR': lambda h, l, c, v: ind.natr(h, l, c), 'ADX': lambda h, l, c, v: ind.adx(h, l, c),
      'PLUS_DI': lambda h, l, c, v: ind.plus_di(h, l, c),
      'MINUS_DI': lambda h, l, c, v: ind.minus_di(h, l, c),
      'CCI': lambda h, l, c, v: ind.cci(h, l, c), 'MFI': lambda h, l, c, v: ind.mfi(h, l, c, v),
      'OBV': lambda h, l, c, v: ind.obv(c, v), 'WILLR': lambda h, l, c, v: ind.willr(h, l, c),
      'ROC': lambda h, l, c, v: ind.roc(c), 'MACD': lambda h, l, c, v: ind.macd(c),
      'BBANDS': lambda h, l, c, v: ind.bbands(c), 'STOCH': lambda h, l, c, v: ind.stoch(h, l, c),
      'AROON': lambda h, l, c, v: ind.aroon(h, l),
  }


def fused_indicators(h, l, c, v):
  """All 17 in one jit; +DI, -DI and ADX share one scan through `dmi`."""
  calls = natron_calls()
  out = {k: f(h, l, c, v) for k, f in calls.items() if k not in ('ADX', 'PLUS_DI', 'MINUS_DI')}
  out['PLUS_DI'], out['MINUS_DI'], out['ADX'] = ind.dmi(h, l, c)
  return out


def bench_indicators(arrays: dict, repeats: int) -> dict:
  import talib
  ticks = tick_arrays(arrays)
  m64 = {k: np.ascontiguousarray(a, np.float64) for k, a in ticks.items()}   # TA-Lib on price / point
  cols32 = [jax.device_put(ticks[k]) for k in ('high', 'low', 'close', 'volume')]
  per_talib = {k: median_time(f, repeats)[0] for k, f in talib_calls(m64).items()}
  talib_total, _ = median_time(lambda: [f() for f in talib_calls(m64).values()], repeats)

  t0 = time.perf_counter()
  fused = jax.jit(fused_indicators).lower(*cols32).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(fused(*cols32))
  fused_s, _ = median_time(lambda: fused(*cols32), repeats)

  per_natron = {}
  for k, f in natron_calls().items():
    jitted = jax.jit(f)
    jax.block_until_ready(jitted(*cols32))
    per_natron[k] = median_time(lambda jitted=jitted: jitted(*cols32), repeats)[0]
  return {
      'bars': len(m64['close']), 'count': len(per_talib), 'talib_version': talib.__version__,
      'talib_total_ms': ms(talib_total), 'natron_fused_ms': ms(fused_s),
      'natron_fused_compile_s': round(compile_s, 2), 'ratio_fused_vs_talib': round(fused_s / talib_total, 2),
      'per_indicator_ms': {k: {'talib': ms(per_talib[k]), 'natron': ms(per_natron[k]),
                               'ratio': round(per_natron[k] / per_talib[k], 2)} for k in per_talib},
      'natron_separate_sum_ms': ms(sum(per_natron.values())),
  }


# ------------------------------------------------------------------------------------- serving latency

def bench_latency(arrays: dict, calls: int) -> dict:
  import natron.features as nf
  n = nf.WARMUP + 96
  raw = {k: np.ascontiguousarray(arrays[k][-n:]) for k in ('open', 'high', 'low', 'close', 'volume')}
  window = list(nf.to_points(raw, point=1e-5)[0])
  t0 = time.perf_counter()
  core = jax.jit(nf.compute_features_jax).lower(*window).compile()
  compile_s = time.perf_counter() - t0
  for _ in range(5):   # warm caches and allocator
    jax.block_until_ready(core(*window))
  times = []
  for _ in range(calls):
    t0 = time.perf_counter()
    jax.block_until_ready(core(*window))
    times.append(time.perf_counter() - t0)
  times = np.asarray(times)
  convert = []
  for _ in range(calls):
    t0 = time.perf_counter()
    nf.to_points(raw, point=1e-5)
    convert.append(time.perf_counter() - t0)
  return {'window_bars': n, 'calls': calls, 'compile_s': round(compile_s, 2),
          'median_ms': ms(float(np.median(times))), 'p99_ms': ms(float(np.percentile(times, 99))),
          'min_ms': ms(float(times.min())), 'to_points_median_ms': ms(float(np.median(convert))),
          'with_to_points_median_ms': ms(float(np.median(times) + np.median(convert)))}


# ---------------------------------------------------------------------------------- parity on quote grids

def bench_parity() -> dict:
  """Max scaled error per indicator and grid (see the module docstring); uses the test suite's generator."""
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests'))
  import test_indicators as ti  # pylint: disable=g-import-not-at-top
  out = {}
  for i, (grid_name, (price, point)) in enumerate(ti.GRIDS.items()):
    n = ti.LONG_BARS if point == 1e-5 else ti.GRID_BARS
    ticks, prices = ti.grid_market(n, price, point, seed=i)
    f32 = {k: v.astype(np.float32) for k, v in prices.items()}
    rows = {}
    for name in ti.TALIB_DEFINED:
      talib_fn, ours_fn, _, _, unit = ti.SPECS[name]
      worst = lambda errs: float(f'{max(e for e, _ in errs):.2e}')
      old = ti._outputs(ours_fn(f32))
      rows[name] = {
          'ours_vs_talib_ticks': worst(ti.scaled_errors(name, ticks, ti._outputs(ours_fn(ticks)))),
          'talib_raw_quotes_vs_talib_ticks': worst(ti.scaled_errors(
              name, ticks, tuple(o / point for o in ti._outputs(talib_fn(prices))) if unit
              else ti._outputs(talib_fn(prices)))),
          'old_float32_prices_vs_talib_ticks': worst(ti.scaled_errors(
              name, ticks, tuple(o / point for o in old) if unit else old)),
      }
    out[f'{grid_name} ({n} bars, point {point:g})'] = rows
  return out


def main():
  skip = {s.strip() for s in ARGS.skip.split(',') if s.strip()}
  unknown = skip - {'csv', 'features', 'indicators', 'latency', 'parity'}
  if unknown:
    raise SystemExit(f'--skip: unknown part(s) {sorted(unknown)}')
  t0 = time.perf_counter()
  frame, arrays = market_arrays(ARGS.bars)
  result = {
      'benchmark': 'features', 'bars': ARGS.bars, 'repeats': ARGS.repeats,
      'synthetic_market_s': round(time.perf_counter() - t0, 2),
      'env': {'jax': jax.__version__, 'device': str(jax.devices()[0]), 'platform': jax.default_backend(),
              'cpu': platform.processor() or platform.machine(), 'cpu_model': cpu_model(),
              'cores_visible': os.cpu_count(),
              'cores_usable': len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else None,
              'one_thread': ARGS.one_thread, 'python': platform.python_version(),
              'load_avg_1m_at_start': round(os.getloadavg()[0], 2)},
  }
  parts = {'csv': lambda: bench_csv(frame, ARGS.repeats),
           'features': lambda: bench_features(arrays, ARGS.repeats),
           'indicators': lambda: bench_indicators(arrays, ARGS.repeats),
           'latency': lambda: bench_latency(arrays, ARGS.latency_calls),
           'parity': bench_parity}
  for name, run in parts.items():
    if name in skip:
      result[name] = 'skipped (--skip)'
      continue
    try:
      result[name] = run()
    except ImportError as e:   # a module another part of the build has not landed yet
      result[name] = f'unavailable: {e}'
  result['env']['load_avg_1m_at_end'] = round(os.getloadavg()[0], 2)
  print(json.dumps(result, indent=1))


if __name__ == '__main__':
  main()
