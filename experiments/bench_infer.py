r"""Batch inference over a long series: where the time goes, how batch size and bf16 change it, the FLOP bound.

  python experiments/bench_infer.py                               # quick size, 200k bars, 1 and 2 cores
  python experiments/bench_infer.py --bars=1000000 --sizes=quick,seed --cores=2

What `configs/infer.py` does per series (natron.predictor.Predictor.predict_series): features once over the
whole series (compute_features + scaler), then the model over every window ending at bar t >= R - 1, in
fixed-size jitted batches of `series_batch` windows sliced from the scaled features on the device.

For each core count ONE process pinned to those cores (taskset, XLA's thread pool sized to match) measures,
in alternating rounds so a load change on a shared machine hits every variant alike:
  features_s            compute_features + scaling of `--bars` bars, steady state (features_first_call_s: with
                        the compile of the feature graph for that length)
  forward[dtype][batch] windows/s of the compiled window-batch forward (model + heads, no features), and
                        the FLOPs per window from XLA's cost analysis of that executable
  matmul peak           GFLOP/s of one dot at the model's largest shape ([batch * window, d_model] x
                        [d_model, d_ff]) and of a 1024^3 dot, float32 and bf16-in/f32-out, in the same process:
                        `flop_bound_windows_per_s` = the best of those peaks (any dtype) / FLOPs per window,
                        the ceiling for this model on this CPU if every FLOP ran at the fastest dot's speed
  end_to_end            predict_series over the whole series with the phase's default batch and dtype
Prints one JSON document with the CPU model and load. Random parameters (throughput does not depend on them).

Measured 2026-12-01, Intel Xeon (AVX-512, AMX-bf16), 2 vCPUs, quiet (load 0.1-1.5), quick size, 100k bars:
  end to end (series_batch 128): 2 cores 4,465 windows/s f32 (3,797 before attention normalised after the value
  product, same session), 3,780 bf16; 1 core 2,981 f32, 2,994 bf16. Forward only, 2 cores, f32: 3,710 / 4,236 /
  4,539 / 4,481 windows/s at batch 32 / 64 / 128 / 512 (bf16 at 512: 3,430). 21.2 MFLOP per window -> 97 GFLOP/s
  achieved, against 300 (f32) and 1,300 (bf16, AMX) GFLOP/s for one large dot on the same cores: the model's
  matmuls are small (d_model 64) and its time goes to softmax, GELU, LayerNorm and the 96x16 attention products,
  not to FLOPs, so neither bf16 nor bigger batches help at this size.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'experiments'))

from machine import cpu_flags, cpu_model, run_pinned  # pylint: disable=g-import-not-at-top,wrong-import-position


def _best_and_median(samples):
  ordered = sorted(samples)
  return round(ordered[-1], 1), round(ordered[len(ordered) // 2], 1)


def measure(payload: dict) -> dict:
  """Runs in the pinned child process."""
  from natron.train import state as state_lib  # pylint: disable=g-import-not-at-top
  state_lib.keep_host_memory_mapped()   # as launch.py does for the infer phase
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from bench_serve import make_bundle  # pylint: disable=g-import-not-at-top
  from natron import features  # pylint: disable=g-import-not-at-top
  from natron.data import synthetic_market  # pylint: disable=g-import-not-at-top
  from natron.predictor import Predictor  # pylint: disable=g-import-not-at-top

  market = synthetic_market(payload['bars'], seed=1)[0]
  sample = market.iloc[:20_000]
  feats, names = features.compute_features(sample)
  out = {}
  root = tempfile.mkdtemp(prefix='natron-bench-infer-')
  for size in payload['sizes']:
    bundle = make_bundle(os.path.join(root, size), size, feats, names)
    res = out[size] = {}
    base = Predictor.load(bundle)
    start = time.perf_counter()
    scaled_np = base.series_features(market)
    res['features_first_call_s'] = round(time.perf_counter() - start, 3)   # includes the feature graph's compile
    start = time.perf_counter()
    scaled_np = base.series_features(market)
    res['features_s'] = round(time.perf_counter() - start, 3)
    scaled = jax.device_put(scaled_np)
    model_cfg = base.meta['config']['model']
    d_model, d_ff, window = int(model_cfg['d_model']), int(model_cfg['d_ff']), base.window
    variants = {}
    for dtype in payload['dtypes']:
      for batch in payload['batches']:
        p = Predictor.load(bundle, series_batch=batch, dtype=dtype)
        ends = np.arange(p.required_candles - 1, p.required_candles - 1 + batch, dtype=np.int32)
        compiled = p._series_fn.lower(p._device_params, scaled, ends).compile()  # pylint: disable=protected-access
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        jax.block_until_ready(compiled(p._device_params, scaled, ends))  # pylint: disable=protected-access
        variants[(dtype, batch)] = dict(fn=compiled, params=p._device_params, ends=ends,  # pylint: disable=protected-access
                                        flops=float(cost.get('flops', 0.0)), samples=[])
    # Matmul probes at the model's largest dot and at 1024^3.
    probes = {}
    for name, (m, k, n) in {'model_ff': (max(payload['batches']) * window, d_model, d_ff),
                            'square_1024': (1024, 1024, 1024)}.items():
      for dtype in ('float32', 'bfloat16'):
        a = jnp.ones((m, k), dtype)
        b = jnp.ones((k, n), dtype)
        fn = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32)).lower(a, b).compile()
        jax.block_until_ready(fn(a, b))
        probes[(name, dtype)] = dict(fn=fn, args=(a, b), flops=2.0 * m * k * n, samples=[])
    for _ in range(payload['rounds']):
      for v in variants.values():
        reps = max(2, payload['windows_per_round'] // len(v['ends']))
        start = time.perf_counter()
        for _ in range(reps):
          jax.block_until_ready(v['fn'](v['params'], scaled, v['ends']))
        v['samples'].append(reps * len(v['ends']) / (time.perf_counter() - start))
      for pr in probes.values():
        start = time.perf_counter()
        for _ in range(5):
          jax.block_until_ready(pr['fn'](*pr['args']))
        pr['samples'].append(5 * pr['flops'] / (time.perf_counter() - start) / 1e9)
    res['matmul_gflops'] = {f'{n}_{d}': dict(zip(('best', 'median'), _best_and_median(pr['samples'])))
                            for (n, d), pr in probes.items()}
    peak = max(pr_best for pr_best in (max(pr['samples']) for pr in probes.values()))
    res['forward'] = {}
    for (dtype, batch), v in variants.items():
      best, median = _best_and_median(v['samples'])
      per_window = v['flops'] / batch
      res['forward'][f'{dtype}@{batch}'] = {
          'windows_per_s_best': best, 'windows_per_s_median': median,
          'gflop_per_window': round(per_window / 1e9, 5),
          'achieved_gflops': round(best * per_window / 1e9, 1),
          'flop_bound_windows_per_s': round(peak * 1e9 / per_window) if per_window else None}
    for dtype in payload['dtypes']:
      p = Predictor.load(bundle, dtype=dtype)
      p.predict_series(market.iloc[:p.required_candles + 8], with_encoded=False)   # compile
      start = time.perf_counter()
      p.predict_series(market, with_encoded=False)
      seconds = time.perf_counter() - start
      res[f'end_to_end_{dtype}'] = {'series_batch': p.series_batch, 'seconds': round(seconds, 2),
                                    'windows_per_s': round((len(market) - p.required_candles + 1) / seconds)}
  return out


def run_child(cores: int, payload: dict) -> dict:
  result, error = run_pinned(__file__, cores, payload)
  return {'cores': cores, 'error': error} if result is None else dict(result, cores=cores)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--bars', type=int, default=200_000)
  parser.add_argument('--sizes', default='quick')
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--batches', default='32,64,128,512')
  parser.add_argument('--cores', default='1,2')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--windows_per_round', type=int, default=4096)
  parser.add_argument('--child', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(measure(json.loads(args.child))))
    return
  payload = {'bars': args.bars, 'sizes': args.sizes.split(','), 'dtypes': args.dtypes.split(','),
             'batches': [int(b) for b in args.batches.split(',')], 'rounds': args.rounds,
             'windows_per_round': args.windows_per_round}
  result = {'machine': {'cpu_model': cpu_model(), 'isa': cpu_flags(), 'cpus': os.cpu_count(),
                        'load_avg_at_start': [round(x, 2) for x in os.getloadavg()]},
            'bars': args.bars, 'runs': []}
  for cores in (int(c) for c in args.cores.split(',')):
    result['runs'].append(run_child(cores, payload))
    print(json.dumps(result['runs'][-1]), file=sys.stderr, flush=True)
  result['machine']['load_avg_at_end'] = [round(x, 2) for x in os.getloadavg()]
  print(json.dumps(result, indent=2))


if __name__ == '__main__':
  main()
