r"""Export benchmark: the ONNX model in onnxruntime next to the JAX function, and server start-up; prints JSON.

  python experiments/bench_export.py                          # quick size (d_model 64, 2 layers, window 96)
  python experiments/bench_export.py --sizes=quick,seed --runs=200 --out=/tmp/bench_export.json

For each model size it writes a bundle with random parameters (latency does not depend on their values; the
same bundle maker as bench_serve.py), runs the export phase (natron.export) and measures:
  export_s             the export phase: jax.export serialisation + jax2onnx conversion + compiled serving
                       executables for this machine (one fresh compile of every bucket and the series chunk)
  onnx_ms              one window [1, required_candles, 5] through onnxruntime (CPU provider), p50 / p99 over
                       --runs runs; with 1 intra-op thread (what an MT5 terminal gives one EA, roughly) and
                       with onnxruntime's default threads
  jax_ms               the same window through jax.jit(predict_fn) (batch 1, the same prices in points)
  max_abs_diff         the largest probability difference between the two over those windows
  startup_s            ServingPredictor.load + the first /predict-sized prediction in a fresh process (imports
                       excluded; import_s beside), buckets (1, 8, 32, 128) and the series chunk: cold (empty
                       compilation cache) traced / from natron.jax compiling / from natron.jax loading the
                       compiled executables, and warm (cache filled) traced / from natron.jax compiling
The CPU model and thread counts are in the output.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import cpu_model  # noqa: E402  pylint: disable=wrong-import-position
os.environ.setdefault('JAX_PLATFORMS', 'cpu')


def percentiles(samples) -> dict:
  a = np.asarray(samples) * 1000.0
  return {'p50': round(float(np.percentile(a, 50)), 2), 'p99': round(float(np.percentile(a, 99)), 2)}


_STARTUP = r'''
import os, sys, time, json
start = time.perf_counter()
sys.path.insert(0, {root!r})
os.environ['JAX_PLATFORMS'] = 'cpu'
import jax
jax.config.update('jax_compilation_cache_dir', {cache!r})
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
import numpy as np
from natron.serve.engine import ServingPredictor
imported = time.perf_counter()
engine = ServingPredictor.load({bundle!r}, buckets=(1, 8, 32, 128), exported={exported!r},
                               executables={executables!r})
ticks = 110_000 + np.arange(engine.required_candles) % 50     # a window on the 1e-5 grid
candles = np.stack([ticks, ticks + 3, ticks - 3, ticks + 1, 100 + 0 * ticks], -1) * np.array([1e-5] * 4 + [1])
engine.predict(candles, point=1e-5)
print(json.dumps({{'import_s': imported - start, 'ready_s': time.perf_counter() - imported,
                  'loaded': engine.info()['executables']}}))
'''


def startup(bundle: str, cache: str, exported: str, executables: bool = False) -> dict:
  """{'import_s', 'ready_s' (load + first prediction), 'loaded' (executables)} of a fresh process."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  code = _STARTUP.format(root=root, cache=cache, bundle=bundle, exported=exported, executables=executables)
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  return {k: round(v, 1) if isinstance(v, float) else v for k, v in result.items()}


def bench_size(size: str, runs: int, with_startup: bool) -> dict:
  import jax   # pylint: disable=g-import-not-at-top
  import onnxruntime   # pylint: disable=g-import-not-at-top
  from bench_serve import make_bundle   # pylint: disable=g-import-not-at-top
  from configs import export as export_config   # pylint: disable=g-import-not-at-top
  from natron import checkpoint, features   # pylint: disable=g-import-not-at-top
  from natron import export as export_lib, predictor as predictor_lib   # pylint: disable=g-import-not-at-top
  from natron.data import synthetic_market   # pylint: disable=g-import-not-at-top
  root = tempfile.mkdtemp(prefix=f'natron-bench-export-{size}-')
  frame = synthetic_market(4000, seed=1)[0]
  feats, names = features.compute_features(frame)
  bundle = make_bundle(os.path.join(root, 'finetune', 'bundle'), size, feats, names)
  config = export_config.get_config()
  config.bundle = bundle
  start = time.perf_counter()
  export_lib.run_phase(config, root)
  out = {'export_s': round(time.perf_counter() - start, 1)}
  out_dir = os.path.join(root, 'export')
  params, meta = checkpoint.load_bundle(bundle)
  r = int(meta['required_candles'])
  ends = np.linspace(r - 1, len(frame) - 1, 20).astype(int)
  candles = np.stack([frame[list(predictor_lib.COLUMNS)].to_numpy(np.float64)[e - r + 1:e + 1] for e in ends])
  points = predictor_lib.candles_in_points(candles, 1e-5)
  fn = jax.jit(predictor_lib.predict_fn(params, meta))
  names_out = list(export_lib.OUTPUTS)
  jax.block_until_ready(fn(points[:1]))
  times, diffs = [], []
  for i in range(runs):
    x = points[i % len(points)][None]
    t = time.perf_counter()
    jax.block_until_ready(fn(x))
    times.append(time.perf_counter() - t)
  out['jax_ms'] = percentiles(times)
  for threads in (1, 0):
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(os.path.join(out_dir, 'natron.onnx'), options,
                                           providers=['CPUExecutionProvider'])
    session.run(names_out, {'candles': points[:1]})
    times = []
    for i in range(runs):
      x = points[i % len(points)][None]
      t = time.perf_counter()
      got = session.run(names_out, {'candles': x})
      times.append(time.perf_counter() - t)
      if threads == 1 and i < len(points):
        want = fn(x)
        diffs.append(max(float(np.max(np.abs(g - np.asarray(want[k])))) for g, k in zip(got, names_out)))
    out[f'onnx_ms_{"1thread" if threads == 1 else "default_threads"}'] = percentiles(times)
  out['max_abs_diff_onnx_vs_jax'] = float(max(diffs))
  out['onnx_bytes'] = os.path.getsize(os.path.join(out_dir, 'natron.onnx'))
  if with_startup:
    cold_a, cold_b, cold_c, warm = (tempfile.mkdtemp(prefix='natron-cache-') for _ in range(4))
    out['startup_s'] = {
        'cold_traced': startup(bundle, cold_a, ''),
        'cold_from_natron_jax': startup(bundle, cold_b, out_dir),
        'cold_from_executables': startup(bundle, cold_c, out_dir, executables=True),
        'warm_traced': (startup(bundle, warm, ''), startup(bundle, warm, ''))[1],
        'warm_from_natron_jax': startup(bundle, cold_b, out_dir),
    }
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--sizes', default='quick')
  parser.add_argument('--runs', type=int, default=100)
  parser.add_argument('--no-startup', action='store_true')
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  import onnxruntime   # pylint: disable=g-import-not-at-top
  import jax   # pylint: disable=g-import-not-at-top
  result = {'cpu': cpu_model(), 'cores': os.cpu_count(), 'jax': jax.__version__,
            'onnxruntime': onnxruntime.__version__,
            'sizes': {s: bench_size(s, args.runs, not args.no_startup) for s in args.sizes.split(',')}}
  text = json.dumps(result, indent=2)
  print(text)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text)


if __name__ == '__main__':
  main()
