r"""Serving benchmark: a real uvicorn server in a subprocess, real HTTP and WebSocket clients; prints JSON.

  python experiments/bench_serve.py                     # seed size (d_model 256, 6 layers) and quick size
  python experiments/bench_serve.py --sizes=quick --requests=500 --out=/tmp/bench_serve.json

For each model size it writes a bundle with random parameters (latency does not depend on their values) and a
scaler fitted on synthetic feature rows, starts `launch.py --config=configs/serve.py` on a free 127.0.0.1
port, and measures:
  startup_s            process start -> first successful GET /health (imports, bundle load, AOT compiles);
                       startup_warm_cache_s: the same on a restart with the compilation cache filled
  predict_ms           POST /predict round trip, p50/p99 over --requests requests, bodies pre-encoded JSON of
                       required_candles candles (unix-second times, as the MT5 EA sends), keep-alive
  server_ms            the server's own processing_time_ms for those requests (parse + validate + model)
  ws_bar_ms            WebSocket 'bar' round trip (subscribe once, then one closed bar per message)
  batch_windows_per_s  POST /batch_predict with max_batch windows (parsing 256 x required_candles candles
                       included), and with one long series (mode 'series', compiled chunks)
  rss_mb / peak_rss_mb resident memory of the server process after the run / its peak (VmHWM)
Targets (issue 5): /predict p50 <= 15 ms and p99 <= 40 ms; WS bar p50 <= 10 ms; batch >= 500 windows/s.
"""
import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np
import orjson
import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from configs import base   # pylint: disable=g-import-not-at-top,wrong-import-position

SIZES = {
    'seed': dict(d_model=256, num_heads=8, num_layers=6, d_ff=1024, head_hidden=128),
    'quick': dict(d_model=64, num_heads=4, num_layers=2, d_ff=128, head_hidden=64),
}


def make_bundle(directory: str, size: str, feats, names) -> str:
  import jax   # pylint: disable=g-import-not-at-top
  from natron import checkpoint, features   # pylint: disable=g-import-not-at-top
  from natron.dataset import fit_scaler   # pylint: disable=g-import-not-at-top
  from natron.labels import DIRECTIONS, REGIMES   # pylint: disable=g-import-not-at-top
  from natron.model import NatronModel   # pylint: disable=g-import-not-at-top
  config = base.get_base_config()
  config.model.update(**SIZES[size])
  window = config.dataset.window
  x = np.zeros((1, window, len(names)), np.float32)
  params = NatronModel(config.model.to_dict()).init(jax.random.key(0), x, train=False)['params']
  meta = {'config': config.to_dict(), 'feature_names': names, 'feature_schema_hash': features.feature_schema_hash(),
          'scaler': fit_scaler(feats[features.WARMUP:], clip=5.0, feature_names=names), 'window': window,
          'warmup': features.WARMUP, 'required_candles': window + features.WARMUP,
          'label_classes': {'direction': DIRECTIONS, 'regime': REGIMES}, 'thresholds': {'signal': 0.6},
          'model_version': f'bench-{size}'}
  return checkpoint.save_bundle(directory, params, meta)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def candle_dicts(frame) -> list:
  times = (frame['time'].astype('int64') // 10**9).tolist()
  return [{'time': t, 'open': round(o, 5), 'high': round(h, 5), 'low': round(l, 5), 'close': round(c, 5),
           'volume': int(v)} for t, o, h, l, c, v in zip(times, frame['open'], frame['high'], frame['low'],
                                                          frame['close'], frame['volume'])]


def percentiles(values) -> dict:
  a = np.asarray(values, np.float64)
  return {'p50': round(float(np.percentile(a, 50)), 2), 'p90': round(float(np.percentile(a, 90)), 2),
          'p99': round(float(np.percentile(a, 99)), 2), 'mean': round(float(a.mean()), 2), 'n': int(a.size)}


def peak_rss_mb(pid: int) -> float:
  with open(f'/proc/{pid}/status') as f:
    for line in f:
      if line.startswith('VmHWM:'):
        return round(int(line.split()[1]) / 1024, 1)
  return float('nan')


def start_server(bundle: str, workdir: str, port: int, args):
  """launch.py serve in a subprocess; returns (process, seconds until GET /health answered 200)."""
  command = [sys.executable, 'launch.py', '--config=configs/serve.py', f'--workdir={workdir}',
             f'--config.bundle={bundle}', f'--config.port={port}', '--config.ws_port=0',
             f'--config.max_batch={args.batch}', '--config.max_series=20000']
  start = time.perf_counter()
  server = subprocess.Popen(command, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  with httpx.Client(timeout=5) as client:
    while True:
      if server.poll() is not None:
        raise RuntimeError(f'server exited: {server.stderr.read().decode()[-3000:]}')
      try:
        if client.get(f'http://127.0.0.1:{port}/health').status_code == 200:
          return server, round(time.perf_counter() - start, 2)
      except httpx.TransportError:
        pass
      time.sleep(0.1)


def stop_server(server) -> None:
  server.terminate()
  try:
    server.wait(timeout=30)
  except subprocess.TimeoutExpired:
    server.kill()


def bench_size(size: str, bundle: str, market, args) -> dict:
  from websockets.sync.client import connect   # pylint: disable=g-import-not-at-top
  port = free_port()
  workdir = tempfile.mkdtemp(prefix='natron-bench-serve-')   # holds the compilation cache (serve/jax_cache)
  out = {'model': SIZES[size]}
  server, out['startup_s'] = start_server(bundle, workdir, port, args)
  url = f'http://127.0.0.1:{port}'
  try:
    with httpx.Client(base_url=url, timeout=120) as client:
      info = client.get('/model_info').json()
      r = info['required_candles']
      out['required_candles'] = r
      # Pre-encoded bodies of distinct windows (the server has no cache; distinct inputs keep it honest).
      bodies = [orjson.dumps({'candles': candle_dicts(market.iloc[i:i + r])}) for i in range(0, 50 * 7, 7)]
      headers = {'Content-Type': 'application/json'}
      for body in bodies[:10]:   # warm-up: connections, first-call allocations
        client.post('/predict', content=body, headers=headers).raise_for_status()
      round_trip, server_ms = [], []
      for i in range(args.requests):
        t0 = time.perf_counter()
        reply = client.post('/predict', content=bodies[i % len(bodies)], headers=headers)
        round_trip.append((time.perf_counter() - t0) * 1e3)
        reply.raise_for_status()
        server_ms.append(reply.json()['processing_time_ms'])
      out['predict_ms'] = percentiles(round_trip)
      out['predict_server_ms'] = percentiles(server_ms)
      out['request_bytes'] = len(bodies[0])

      # WebSocket streaming: subscribe with history, then one closed bar per message.
      with connect(f'ws://127.0.0.1:{port}/ws', max_size=None) as ws:
        ws.send(orjson.dumps({'command': 'subscribe', 'symbol': 'BENCH',
                              'candles': candle_dicts(market.iloc[:r])}).decode())
        assert orjson.loads(ws.recv())['type'] == 'prediction'
        bars = candle_dicts(market.iloc[r:r + args.requests + 10])
        messages = [orjson.dumps({'command': 'bar', 'symbol': 'BENCH', 'candle': b}).decode() for b in bars]
        ws_ms = []
        for k, message in enumerate(messages):
          t0 = time.perf_counter()
          ws.send(message)
          reply = orjson.loads(ws.recv())
          if k >= 10:
            ws_ms.append((time.perf_counter() - t0) * 1e3)
          assert reply['type'] == 'prediction', reply
      out['ws_bar_ms'] = percentiles(ws_ms)

      # Batch throughput: max_batch windows per request, and one long series.
      windows = orjson.dumps({'windows': [candle_dicts(market.iloc[i:i + r]) for i in range(args.batch)]})
      series = orjson.dumps({'candles': candle_dicts(market.iloc[:r + args.series - 1])})
      rates = {}
      for name, body, n in [('windows', windows, args.batch), ('series', series, args.series)]:
        client.post('/batch_predict', content=body, headers=headers).raise_for_status()   # warm-up
        times = []
        for _ in range(args.batch_repeats):
          t0 = time.perf_counter()
          reply = client.post('/batch_predict', content=body, headers=headers)
          times.append(time.perf_counter() - t0)
          reply.raise_for_status()
          assert reply.json()['count'] == n
        rates[name] = {'windows': n, 'seconds_median': round(float(np.median(times)), 3),
                       'windows_per_s': round(n / float(np.median(times)), 1),
                       'request_mb': round(len(body) / 2**20, 1)}
      out['batch'] = rates
      proc = psutil.Process(server.pid)
      out['rss_mb'] = round(proc.memory_info().rss / 2**20, 1)
      out['peak_rss_mb'] = peak_rss_mb(server.pid)
  finally:
    stop_server(server)
  try:   # a restart reuses the compiled executables from the persistent cache
    server, out['startup_warm_cache_s'] = start_server(bundle, workdir, port, args)
    stop_server(server)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--sizes', default='seed,quick')
  parser.add_argument('--requests', type=int, default=500)
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--series', type=int, default=2048, help='predictions per series request')
  parser.add_argument('--batch_repeats', type=int, default=3)
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  from natron import features   # pylint: disable=g-import-not-at-top
  from natron.data import synthetic_market   # pylint: disable=g-import-not-at-top
  market = synthetic_market(features.WARMUP + 96 + max(args.requests + 20, args.series, args.batch) + 400,
                            seed=1)[0]
  feats, names = features.compute_features(market)
  root = tempfile.mkdtemp(prefix='natron-bench-bundles-')
  result = {'machine': {'cpus': os.cpu_count(), 'processor': platform.processor() or platform.machine(),
                        'python': platform.python_version(), 'load_avg_at_start': os.getloadavg()},
            'targets': {'predict_p50_ms': 15, 'predict_p99_ms': 40, 'ws_bar_p50_ms': 10,
                        'batch_windows_per_s': 500}}
  try:
    for size in args.sizes.split(','):
      bundle = make_bundle(os.path.join(root, size), size, feats, names)
      result[size] = bench_size(size, bundle, market, args)
      print(json.dumps({size: result[size]}), file=sys.stderr, flush=True)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  result['machine']['load_avg_at_end'] = os.getloadavg()
  text = json.dumps(result, indent=2)
  print(text)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text + '\n')


if __name__ == '__main__':
  main()
