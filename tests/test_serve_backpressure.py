"""Serving under load and attack (issue 10): memory under large bodies, JSON that decodes to far more than
its bytes, 200 concurrent /predict with deadlines and 503 + Retry-After, work skipped for clients that left,
and a model worker that dies or hangs. Real uvicorn on a free 127.0.0.1 port, real clients (raw sockets,
httpx); the figures each test measures are printed (pytest -s) and asserted only with generous bounds: the
test machine is a shared 2-core box.
"""
import asyncio
import gc
import json
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import orjson
import psutil
import pytest

from natron.errors import UserError
from natron.serve import create_app
from natron.serve import service as service_module
from natron.serve.guard import JsonAllowance, ServeSettings, check_json_size, trim_heap
from natron.serve.schemas import InvalidRequest
from test_serve import candles_json, running, window_frame
from test_predictor import shared_predictor

MB = 1 << 20


@pytest.fixture(scope='module')
def predictor():
  return shared_predictor()


class _Hooked:
  """The test predictor with a hook before every batched model call: hook(windows) may sleep, block or raise."""

  def __init__(self, inner, hook):
    self._inner, self._hook = inner, hook

  def __getattr__(self, name):
    return getattr(self._inner, name)

  def predict(self, ohlcv, **kwargs):
    self._hook(len(ohlcv))
    return self._inner.predict(ohlcv, **kwargs)


def _body(predictor, end: int = 0) -> bytes:
  r = predictor.required_candles
  return orjson.dumps({'candles': candles_json(window_frame(r + 5 + end, r))})


_FRAMED = {}


def _framed(piece: bytes) -> bytes:
  """`piece` as one HTTP chunk, built once (the clients share the server's process: their memory counts)."""
  if id(piece) not in _FRAMED:
    _FRAMED[id(piece)] = (piece, b'%x\r\n%s\r\n' % (len(piece), piece))
  return _FRAMED[id(piece)][1]


def _upload(port: int, path: str, size: int, *, chunked: bool, piece: bytes) -> tuple:
  """POSTs `size` bytes made of `piece` repeated (the client allocates nothing per request), declared with
  Content-Length or chunked; returns (status or None when the server cut the connection, seconds)."""
  start = time.perf_counter()
  framing = 'Transfer-Encoding: chunked' if chunked else f'Content-Length: {size}'
  framed = _framed(piece) if chunked else piece
  with socket.create_connection(('127.0.0.1', port), timeout=120) as sock:
    sock.sendall(f'POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{framing}\r\n\r\n'
                 .encode())
    try:
      for _ in range(size // len(piece)):
        sock.sendall(framed)
      if chunked:
        sock.sendall(b'0\r\n\r\n')
    except OSError:
      pass   # the server answered and closed before the whole body: expected
    data = b''
    try:
      while b'\r\n' not in data:
        more = sock.recv(65536)
        if not more:
          break
        data += more
    except OSError:
      pass
  status = int(data.split(b' ', 2)[1]) if data.startswith(b'HTTP/1.1 ') else None
  return status, time.perf_counter() - start


class _Watch:
  """While open: the process's resident memory (peak) and /health latencies, probed every 20 ms."""

  def __init__(self, port: int):
    self.port, self.peak, self.health = port, 0, []
    self._stop = threading.Event()
    self._threads = [threading.Thread(target=self._memory, daemon=True),
                     threading.Thread(target=self._probe, daemon=True)]

  def _memory(self):
    process = psutil.Process()
    while not self._stop.is_set():
      self.peak = max(self.peak, process.memory_info().rss)
      time.sleep(0.005)

  def _probe(self):
    with httpx.Client(base_url=f'http://127.0.0.1:{self.port}', timeout=30) as client:
      while not self._stop.is_set():
        start = time.perf_counter()
        status = client.get('/health').status_code
        self.health.append((status, time.perf_counter() - start))
        time.sleep(0.02)

  def __enter__(self):
    for t in self._threads:
      t.start()
    return self

  def __exit__(self, *exc):
    deadline = time.monotonic() + 10
    while len(self.health) < 3 and time.monotonic() < deadline:   # a quick attack still gets probes
      time.sleep(0.01)
    self._stop.set()
    for t in self._threads:
      t.join(timeout=60)

  def health_p99_ms(self) -> float:
    return float(np.percentile([s for _, s in self.health], 99) * 1000) if self.health else float('nan')


def _rss_settled() -> int:
  """Resident memory once garbage is collected and glibc has handed free pages back (the server trims after
  each large body, but the clients in this process free theirs later): what is still held, not allocator
  caches, whose size depends on what ran before in this process."""
  gc.collect()
  time.sleep(0.3)
  trim_heap()
  return psutil.Process().memory_info().rss


# --- settings ----------------------------------------------------------------------------------------------
def test_defaults_bound_bodies_and_config_is_validated():
  settings = ServeSettings()
  limits = settings.body_limits()
  # /predict: 5000 candles (1.3 MB); /batch_predict: 50,000 candles (12.8 MB), not 64 MB any more.
  assert limits == {'/predict': 256 * 5000 + 4096, '/batch_predict': 256 * 50_000 + 4096}
  assert settings.inflight_body_bytes() == 32 * MB
  # An explicit limit is used as given; the budget grows to hold one maximal request.
  big = ServeSettings(predict_body_bytes=40 * MB)
  assert big.body_limits()['/predict'] == 40 * MB and big.inflight_body_bytes() == 40 * MB
  for bad in ({'request_timeout_ms': 0}, {'batch_timeout_ms': -1}, {'max_queue': 0}, {'max_batch_candles': 0},
              {'max_inflight_body_bytes': 0}, {'max_series': 60_000}):
    with pytest.raises(UserError):
      ServeSettings.from_config(bad)
  assert ServeSettings.from_config({'request_timeout_ms': 800, 'max_queue': 64}).request_timeout_ms == 800.0


def test_json_size_counts_structure_not_bytes():
  allowance = JsonAllowance(candles=100, windows=1)
  valid = orjson.dumps({'candles': [{'time': 1, 'open': 1.0, 'high': 1.0, 'low': 1.0, 'close': 1.0,
                                     'volume': 1.0}] * 150})   # over the limit, but only a little: a 422 later
  check_json_size(valid, allowance)
  check_json_size(valid.decode(), allowance)                    # WebSocket text messages
  check_json_size(b'{"candles": [' + b'[' * 1000 + b']' * 1000 + b']}', allowance)   # nesting: orjson's 422
  for garbage in (b'[' + b'{},' * 300 + b'{}]', b'[' + b'1,' * 2000 + b'1]', b'[' + b'[],' * 1200 + b'[]]'):
    with pytest.raises(InvalidRequest) as e:
      check_json_size(garbage, allowance)
    assert e.value.rule == 'json'


# --- row "50 MB of empty candle objects" and "8 x 60 MB bodies at once" ------------------------------------
def test_large_and_hostile_bodies_cost_bounded_memory_and_keep_health_answering(predictor):
  app = create_app(predictor, {})   # the defaults: /predict 1.3 MB, /batch_predict 12.8 MB, 32 MB in flight
  limits = app.state.service.settings.body_limits()
  piece = b' ' * MB
  garbage = b'[' + b'{},' * ((limits['/batch_predict'] - 8) // 3) + b'{}]'   # just under the byte limit
  with running(app) as port:
    with httpx.Client(base_url=f'http://127.0.0.1:{port}', timeout=30) as client:
      # Under the byte limit, but far more objects than candles: refused before decoding.
      empty = b'{"candles": [' + b'{},' * ((limits['/predict'] - 20) // 3) + b'{}]}'
      reply = client.post('/predict', content=empty, headers={'Content-Type': 'application/json'})
      assert reply.status_code == 422 and reply.json()['rule'] == 'json', reply.text[:300]
      assert 'Not decoded' in reply.json()['detail']
      reply = client.post('/batch_predict', content=garbage, headers={'Content-Type': 'application/json'})
      assert reply.status_code == 422 and reply.json()['rule'] == 'json'
      assert client.post('/predict', content=_body(predictor)).status_code == 200   # and warm
    attacks = [('/predict', 60 * MB, False, piece), ('/batch_predict', 60 * MB, False, piece),
               ('/predict', 60 * MB, True, piece), ('/batch_predict', 60 * MB, True, piece)]
    report = {}
    for path, size, chunked, body_piece in attacks + [('/batch_predict', len(garbage), False, garbage),
                                                      ('/batch_predict', len(garbage), True, garbage)]:
      # Memory is measured on this process, which also runs the clients: they share one body, built here.
      if chunked:
        _framed(body_piece)
      before = _rss_settled()
      with _Watch(port) as watch:
        results = [None] * 8
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(
            i, _upload(port, path, size, chunked=chunked, piece=body_piece))) for i in range(8)]
        for t in threads:
          t.start()
        for t in threads:
          t.join(timeout=300)
      after = _rss_settled()
      name = f'8 x {size / MB:.0f} MB {"garbage " if body_piece is garbage else ""}{path} ' + (
          'chunked' if chunked else 'declared')
      statuses = sorted(str(s) for s, _ in results)
      report[name] = (round((watch.peak - before) / MB, 1), round((after - before) / MB, 1),
                      round(max(s for _, s in results), 2), round(watch.health_p99_ms(), 1), statuses)
      print(f'\n  {name}: (peak MB, after MB, slowest upload s, /health p99 ms, statuses) {report[name]}')
      # Refused (413 too large, 422 too many JSON values, 503 over the in-flight budget, or cut off mid-send):
      # never decoded.
      assert all(s in ('413', '422', '503', 'None') for s in statuses), (name, statuses)
      assert watch.peak - before <= 100 * MB, (name, report[name])
      assert after - before <= 30 * MB, (name, report[name])          # nothing retained
      assert watch.health and all(status == 200 for status, _ in watch.health), name
      # Generous: milliseconds normally; the shared 2-core machine can stall anything for a while.
      assert max(s for _, s in watch.health) < 5.0, (name, report[name])


def test_large_valid_batches_are_decoded_off_the_loop_and_health_answers(predictor):
  r = predictor.required_candles
  settings = {'max_candles': r, 'max_batch': 12, 'max_batch_candles': 12 * r}
  app = create_app(predictor, settings)
  windows = orjson.dumps({'windows': [candles_json(window_frame(r + 5 + i, r)) for i in range(12)]})
  with running(app) as port:
    with httpx.Client(base_url=f'http://127.0.0.1:{port}', timeout=60) as client:
      before = _rss_settled()
      with _Watch(port) as watch:
        async def main():
          async with httpx.AsyncClient(base_url=f'http://127.0.0.1:{port}', timeout=60) as aclient:
            return await asyncio.gather(*(aclient.post('/batch_predict', content=windows) for _ in range(8)))
        replies = asyncio.run(main())
      after = _rss_settled()
      assert [x.status_code for x in replies] == [200] * 8 and all(x.json()['count'] == 12 for x in replies)
      print(f'\n8 x {len(windows) / MB:.1f} MB valid batches: peak +{(watch.peak - before) / MB:.0f} MB, after '
            f'+{(after - before) / MB:.0f} MB, /health p99 {watch.health_p99_ms():.0f} ms over {len(watch.health)}')
      assert watch.health and max(s for _, s in watch.health) < 5.0
      assert after - before <= 50 * MB   # pymalloc keeps partly used arenas of the decoded candles: a little
      # Over the candles of all windows together: the precise 422.
      reply = client.post('/batch_predict', json={'windows': [candles_json(window_frame(r + 5, r + 1))] * 12})
      assert reply.status_code == 422 and reply.json()['rule'] == 'too_many_candles'


# --- row "200 concurrent /predict" ---------------------------------------------------------------------------
_LOAD_CLIENT = r"""
import asyncio, json, sys, time
import httpx
port, path = int(sys.argv[1]), sys.argv[2]
bodies = [line.rstrip(b'\n') for line in open(path, 'rb')]

async def one(client, body):
  start = time.perf_counter()
  try:
    reply = await client.post('/predict', content=body, headers={'Content-Type': 'application/json'})
  except httpx.HTTPError as e:
    return None, time.perf_counter() - start, None, {'error': repr(e)}
  return reply.status_code, time.perf_counter() - start, reply.headers.get('retry-after'), reply.json()

async def main():
  limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
  async with httpx.AsyncClient(base_url=f'http://127.0.0.1:{port}', timeout=60, limits=limits) as client:
    return await asyncio.gather(*(one(client, b) for b in bodies))

print(json.dumps(asyncio.run(main())))
"""


def _concurrent_predicts(port: int, bodies: list, tmp_path) -> list:
  """Sends every body at once from a client in its own process (its own GIL: the server's latency is not
  the client's); returns [(status, seconds, Retry-After, reply JSON)]."""
  path = tmp_path / 'bodies.jsonl'
  path.write_bytes(b'\n'.join(bodies) + b'\n')
  out = subprocess.run([sys.executable, '-c', _LOAD_CLIENT, str(port), str(path)], capture_output=True,
                       timeout=300, check=True)
  return [tuple(x) for x in json.loads(out.stdout)]


def _latency_summary(results) -> str:
  seconds = np.array([s for _, s, _, _ in results])
  ok = sum(status == 200 for status, *_ in results)
  return (f'{ok} answered, {sum(status == 503 for status, *_ in results)} x 503; latency p50 '
          f'{np.percentile(seconds, 50) * 1000:.0f} ms, p99 {np.percentile(seconds, 99) * 1000:.0f} ms, max '
          f'{seconds.max() * 1000:.0f} ms')


def _check_answers(results, timeout_s: float) -> list:
  statuses = [status for status, *_ in results]
  assert set(statuses) <= {200, 503}, statuses
  for status, seconds, retry_after, body in results:
    if status == 503:
      assert body['rule'] == 'overloaded' and retry_after is not None and int(retry_after) >= 1, body
    else:   # the deadline + grace, plus generous room for the shared machine (the client's clock starts earlier)
      assert seconds < timeout_s + 0.25 + 3.0
  return statuses


def _recovers(port: int, body: bytes) -> None:
  """After a burst, a client that retries as Retry-After asks is answered."""
  with httpx.Client(base_url=f'http://127.0.0.1:{port}', timeout=30) as client:
    for _ in range(20):
      reply = client.post('/predict', content=body)
      if reply.status_code == 200:
        return
      assert reply.status_code == 503
      time.sleep(min(float(reply.headers['retry-after']), 1.0))
  raise AssertionError('never answered after the burst')


def test_200_concurrent_predicts_answered_by_the_deadline_or_503_at_once(predictor, tmp_path):
  bodies = [_body(predictor, i % 20) for i in range(200)]
  # Defaults (1.5 s deadline). The test model answers in milliseconds, but parsing 1,016 candles takes the
  # event loop tens of ms: requests the loop cannot reach in time are 503 when they arrive, not answered late.
  app = create_app(predictor, {})
  with running(app) as port:
    _recovers(port, bodies[0])   # warm: the server measures what a request costs
    with _Watch(port) as watch:
      results = _concurrent_predicts(port, bodies, tmp_path)
    print(f'\n200 concurrent /predict, test model, defaults: {_latency_summary(results)}; /health p99 '
          f'{watch.health_p99_ms():.0f} ms')
    _check_answers(results, 1.5)
    _recovers(port, bodies[0])
  # A slow model (0.3 s a call) and a 1 s deadline: the model queue is the limit; 503 + Retry-After.
  slow = _Hooked(predictor, lambda windows: time.sleep(0.3))
  app = create_app(slow, {'request_timeout_ms': 1000})
  batcher = app.state.service.batcher
  with running(app) as port:
    _recovers(port, bodies[0])
    with _Watch(port) as watch:
      results = _concurrent_predicts(port, bodies, tmp_path)
    print(f'200 concurrent /predict, model 0.3 s a call, deadline 1 s: {_latency_summary(results)}; /health '
          f'p99 {watch.health_p99_ms():.0f} ms; batcher {batcher.state()}')
    assert 503 in _check_answers(results, 1.0)
    _recovers(port, bodies[0])


def test_work_for_a_client_that_disconnected_is_skipped(predictor):
  gate = threading.Event()
  blocked = threading.Event()

  def hook(windows):
    del windows
    blocked.set()
    assert gate.wait(30)

  app = create_app(_Hooked(predictor, hook), {'request_timeout_ms': 20_000})
  batcher = app.state.service.batcher
  body = _body(predictor)
  with running(app) as port:
    first = {}
    waiting = threading.Thread(target=lambda: first.update(reply=httpx.post(
        f'http://127.0.0.1:{port}/predict', content=body, timeout=60)))
    waiting.start()
    assert blocked.wait(30)                        # the model is busy with the first request
    with socket.create_connection(('127.0.0.1', port), timeout=30) as sock:
      sock.sendall(b'POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n'
                   b'Content-Length: %d\r\n\r\n%s' % (len(body), body))
      deadline = time.monotonic() + 30
      while batcher.state()['queued_windows'] < 1:   # the second request waits for the model
        assert time.monotonic() < deadline
        time.sleep(0.01)
      deadline = time.monotonic() + 30
    # The server sees the disconnect and cancels the handler, which cancels its queued job.
    while not all(job.future.done() for job in list(batcher._queue.queue)):   # pylint: disable=protected-access
      assert time.monotonic() < deadline
      time.sleep(0.01)
    gate.set()
    waiting.join(timeout=60)
    assert first['reply'].status_code == 200
    deadline = time.monotonic() + 30
    while batcher.skipped < 1:
      assert time.monotonic() < deadline, batcher.state()
      time.sleep(0.01)
    assert batcher.calls == 1 and batcher.windows == 1   # only the first request reached the model


# --- row "micro-batcher thread dies" -----------------------------------------------------------------------
class _Death(BaseException):
  """Not an Exception: escapes `except Exception` in the worker, as a bug or an interpreter signal would."""


def test_dead_worker_answers_503_at_once_and_health_says_failed(predictor):
  gate, blocked = threading.Event(), threading.Event()

  def hook(windows):
    del windows
    blocked.set()
    assert gate.wait(30)
    raise _Death('the model thread was killed')

  app = create_app(_Hooked(predictor, hook), {'request_timeout_ms': 20_000})
  body = _body(predictor)
  with running(app) as port:
    url = f'http://127.0.0.1:{port}'
    assert httpx.get(f'{url}/health').json()['status'] == 'ok'
    replies = []

    def post():
      replies.append(httpx.post(f'{url}/predict', content=body, timeout=60))

    threads = [threading.Thread(target=post) for _ in range(3)]
    threads[0].start()
    assert blocked.wait(30)
    for t in threads[1:]:
      t.start()
    deadline = time.monotonic() + 30
    while app.state.service.batcher.state()['queued_windows'] < 2:   # two more wait behind the running call
      assert time.monotonic() < deadline
      time.sleep(0.01)
    start = time.monotonic()
    gate.set()
    for t in threads:
      t.join(timeout=60)
    assert time.monotonic() - start < 10           # promptly (milliseconds), not at a timeout
    assert [x.status_code for x in replies] == [503] * 3
    assert {x.json()['rule'] for x in replies} == {'unavailable'}
    later = httpx.post(f'{url}/predict', content=body, timeout=60)
    assert later.status_code == 503 and later.json()['rule'] == 'unavailable'
    health = httpx.get(f'{url}/health').json()
    assert health['status'] == 'failed' and '_Death' in health['reason'], health


def test_a_hung_model_call_times_out_and_health_reports_it(predictor, monkeypatch):
  gate = threading.Event()
  app = create_app(_Hooked(predictor, lambda windows: gate.wait(30)), {'request_timeout_ms': 1000})
  with running(app) as port:
    url = f'http://127.0.0.1:{port}'
    start = time.monotonic()
    reply = httpx.post(f'{url}/predict', content=_body(predictor), timeout=60)
    waited = time.monotonic() - start
    assert reply.status_code == 503 and reply.json()['rule'] == 'overloaded' and 'retry-after' in reply.headers
    assert waited < 5.0                              # the deadline (1 s) + grace (0.25 s), not a hang
    monkeypatch.setattr(service_module, 'STALLED_S', 0.1)
    health = httpx.get(f'{url}/health').json()
    assert health['status'] == 'failed' and 'running for' in health['reason']
    gate.set()
    deadline = time.monotonic() + 30
    while httpx.get(f'{url}/health').json()['status'] != 'ok':   # the call returned: healthy again
      assert time.monotonic() < deadline
      time.sleep(0.05)
    assert httpx.post(f'{url}/predict', content=_body(predictor), timeout=60).status_code == 200
