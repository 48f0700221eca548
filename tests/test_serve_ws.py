"""WebSocket serving (issue 10): the connection limit, memory per connection, failures that keep the
connection and its subscriptions, and bar-time rules (one timeframe, closed-market gaps stated, stale bars
refused). Real uvicorn on a free 127.0.0.1 port and real websockets clients, as in tests/test_serve.py.
"""
import asyncio
import gc
import socket
import time
import tracemalloc

import numpy as np
import orjson
import pandas as pd
import psutil
import pytest
import websockets
from websockets.sync.client import connect as ws_connect

from natron.serve import create_app
from natron.serve.app import get_service
from natron.serve.guard import HttpError
from natron.serve.ws import BYTES_PER_BAR, WsSession, session_bytes_bound
from test_predictor import market
from test_serve import _ask, candles_json, predictor, running, window_frame  # noqa: F401  (fixture)

MB = 1 << 20


class _Flaky:
  """The test predictor whose next `fail` batched model calls raise."""

  def __init__(self, inner):
    self._inner, self.fail = inner, 0

  def __getattr__(self, name):
    return getattr(self._inner, name)

  def predict(self, ohlcv, **kwargs):
    if self.fail:
      self.fail -= 1
      raise RuntimeError('model call failed (test)')
    return self._inner.predict(ohlcv, **kwargs)


def _open_count(app, expected: int, timeout: float = 10.0) -> int:
  deadline = time.monotonic() + timeout
  while app.state.ws_slots.open != expected and time.monotonic() < deadline:
    time.sleep(0.02)
  return app.state.ws_slots.open


# --- The connection limit ---------------------------------------------------------------------------------
def test_connection_limit_closes_with_1013_and_every_disconnect_frees_a_slot(predictor):
  r = predictor.required_candles
  app = create_app(predictor, {'max_connections': 3})
  with running(app) as port:
    url = f'ws://127.0.0.1:{port}/ws'
    held = [ws_connect(url, open_timeout=10) for _ in range(3)]
    for ws in held:
      assert _ask(ws, {'command': 'ping'})['type'] == 'pong'
    with ws_connect(url, open_timeout=10) as extra:   # over the limit: closed at once, 1013 with the reason
      with pytest.raises(websockets.exceptions.ConnectionClosedError) as refused:
        extra.recv(timeout=10)
    assert refused.value.rcvd.code == 1013 and 'max_connections (3)' in refused.value.rcvd.reason
    assert app.state.ws_slots.open == 3 and app.state.ws_slots.refused == 1
    # 1. a clean close; 2. a dropped TCP connection (no close frame); 3. a client gone while its request runs.
    held[0].close()
    held[1].socket.shutdown(socket.SHUT_RDWR)
    held[1].socket.close()
    held[2].send(orjson.dumps({'command': 'predict', 'candles': candles_json(window_frame(r + 5, r))}).decode())
    held[2].socket.shutdown(socket.SHUT_RDWR)
    held[2].socket.close()
    assert _open_count(app, 0) == 0
    again = [ws_connect(url, open_timeout=10) for _ in range(3)]   # every slot is usable again
    for ws in again:
      assert _ask(ws, {'command': 'ping'})['type'] == 'pong'
    for ws in again:
      ws.close()
    assert _open_count(app, 0) == 0 and app.state.ws_slots.peak == 3
    # Refused handshakes (wrong Origin, over the limit) never took a slot.
    with pytest.raises(websockets.exceptions.InvalidStatus):
      ws_connect(url, origin='http://evil.example', open_timeout=10)
    assert app.state.ws_slots.open == 0


# --- Memory per connection --------------------------------------------------------------------------------
def test_a_session_holding_max_symbols_stays_within_its_bound(predictor):
  r = predictor.required_candles
  max_symbols = 64
  app = create_app(predictor, {'max_symbols': max_symbols, 'max_candles': r + 50})
  session = WsSession(app.state.service)
  history = candles_json(window_frame(r + 60, r + 50))   # longer than needed: only the last r bars are kept

  async def fill():
    for i in range(max_symbols):
      reply = await session.handle(orjson.dumps({'command': 'subscribe', 'symbol': f'S{i:02d}' + 'x' * 61,
                                                 'candles': history}))
      assert reply['type'] == 'prediction', reply
    bar = candles_json(market().iloc[r + 61:r + 62])[0]
    reply = await session.handle(orjson.dumps({'command': 'bar', 'symbol': 'S00' + 'x' * 61, 'candle': bar}))
    assert reply['type'] == 'prediction', reply
    over = await session.handle(orjson.dumps({'command': 'subscribe', 'symbol': 'one-more', 'candles': history}))
    assert over['rule'] == 'too_many_symbols'

  try:
    asyncio.run(fill())
  finally:
    app.state.service.batcher.close()
  assert len(session.histories) == max_symbols
  arrays = sum(h.time.nbytes + h.ohlcv.nbytes for h in session.histories.values())
  assert arrays == max_symbols * r * BYTES_PER_BAR
  # Arrays that own their memory: a view would keep the whole decoded request behind it alive.
  assert all(h.time.base is None and h.ohlcv.base is None for h in session.histories.values())
  bound = session_bytes_bound(max_symbols, r)
  assert arrays < session.nbytes() <= bound, (session.nbytes(), bound)
  print(f'\n  session with {max_symbols} symbols x {r} bars: {session.nbytes() / MB:.2f} MB '
        f'(bound {bound / MB:.2f} MB)')


def test_memory_per_websocket_connection_on_a_real_server(predictor):
  """N connections x 64 subscribed symbols: the memory held per connection is about the session bound (the
  histories) plus buffers; the slots are all free once they close."""
  r = predictor.required_candles
  n_connections, n_symbols = 4, 64
  app = create_app(predictor, {'max_symbols': n_symbols})
  history = orjson.dumps(candles_json(window_frame(r + 30, r))).decode()
  process = psutil.Process()

  async def hold(port, symbols, opened: asyncio.Event, release: asyncio.Event, ready: list, connections):
    async with websockets.connect(f'ws://127.0.0.1:{port}/ws', max_size=None) as ws:
      for i in range(symbols):
        await ws.send(f'{{"command":"subscribe","symbol":"SYM{i}","candles":{history}}}')
        assert orjson.loads(await ws.recv())['type'] == 'prediction'
      ready.append(1)
      if len(ready) == connections:
        opened.set()
      await release.wait()

  async def main(port, connections, symbols):
    opened, release, ready = asyncio.Event(), asyncio.Event(), []
    tasks = [asyncio.create_task(hold(port, symbols, opened, release, ready, connections))
             for _ in range(connections)]
    await asyncio.wait_for(opened.wait(), 600)
    await asyncio.sleep(0.5)                    # the server thread finishes its last replies
    held = process.memory_info().rss, tracemalloc.get_traced_memory()[0]
    release.set()
    await asyncio.gather(*tasks)
    return held

  with running(app) as port:
    asyncio.run(main(port, 1, 2))               # warm-up: code paths and buffers, two symbols' worth
    gc.collect()
    # Resident memory shows what the OS sees, but in a long test process freed pools are reused, so it can
    # under-count; tracemalloc (numpy reports its buffers to it) counts what is held since it started:
    # the server's side of the connections (sessions, histories, websockets buffers) and this client's.
    rss_before = process.memory_info().rss
    tracemalloc.start()
    try:
      rss_held, traced = asyncio.run(main(port, n_connections, n_symbols))
    finally:
      tracemalloc.stop()
    assert _open_count(app, 0) == 0
  per_connection = traced / n_connections
  bound = session_bytes_bound(n_symbols, r)
  print(f'\n  {n_connections} connections x {n_symbols} symbols (required_candles {r}): held {traced / MB:.1f} MB '
        f'(tracemalloc; resident +{(rss_held - rss_before) / MB:.1f} MB), {per_connection / MB:.2f} MB per '
        f'connection; session bound {bound / MB:.2f} MB')
  # The histories are the bound; websockets' buffers and the client's objects come on top.
  assert n_symbols * r * BYTES_PER_BAR < per_connection < 1.5 * bound, (per_connection, bound)


# --- Failures keep the connection and its subscriptions -----------------------------------------------------
def test_a_failing_model_call_keeps_the_connection_and_its_subscriptions(predictor):
  r = predictor.required_candles
  flaky = _Flaky(predictor)
  app = create_app(flaky, {})
  start = r + 40
  with running(app) as port:
    with ws_connect(f'ws://127.0.0.1:{port}/ws', open_timeout=10) as ws:
      first = _ask(ws, {'command': 'subscribe', 'symbol': 'EURUSD', 'candles': candles_json(window_frame(start, r))})
      assert first['type'] == 'prediction'
      bar = candles_json(market().iloc[start + 1:start + 2])[0]
      flaky.fail = 1
      failed = _ask(ws, {'command': 'bar', 'symbol': 'EURUSD', 'candle': bar, 'id': 'b1'})
      assert failed == {'type': 'error', 'command': 'bar', 'rule': 'internal', 'id': 'b1',
                        'detail': failed['detail']} and 'kept' in failed['detail']
      # The same bar again: the failed one did not advance the history, and the subscription is there.
      retried = _ask(ws, {'command': 'bar', 'symbol': 'EURUSD', 'candle': bar})
      assert retried['type'] == 'prediction' and retried['timestamp'] == int(pd.Timestamp(bar['time']).timestamp())
      following = candles_json(market().iloc[start + 2:start + 3])[0]
      assert _ask(ws, {'command': 'bar', 'symbol': 'EURUSD', 'candle': following})['type'] == 'prediction'
      flaky.fail = 1
      assert _ask(ws, {'command': 'predict', 'candles': candles_json(window_frame(start, r))})['rule'] == 'internal'
      assert _ask(ws, {'command': 'unsubscribe', 'symbol': 'EURUSD'})['was_subscribed'] is True


class _Overloaded:
  """A Service stand-in (through dependency_overrides) whose predictions are refused as overloaded."""

  def __init__(self, service):
    self.inner, self.calls = service, 0

  def __getattr__(self, name):
    return getattr(self.inner, name)

  async def predict_one(self, items):
    del items
    self.calls += 1
    raise HttpError(503, 'overloaded', 'Too many requests are queued; retry shortly.', {'Retry-After': '2'})

  async def predict_windows(self, ohlcv, times, **kwargs):
    return await self.predict_one(None)


def test_a_503_during_a_websocket_command_is_an_error_message_with_retry_after(predictor):
  r = predictor.required_candles
  app = create_app(predictor, {})
  overloaded = _Overloaded(app.state.service)
  app.dependency_overrides[get_service] = lambda: overloaded
  with running(app) as port:
    with ws_connect(f'ws://127.0.0.1:{port}/ws', open_timeout=10) as ws:
      for message in ({'command': 'predict', 'candles': candles_json(window_frame(r + 5, r))},
                      {'command': 'subscribe', 'symbol': 'X', 'candles': candles_json(window_frame(r + 5, r))}):
        reply = _ask(ws, message)
        assert reply['type'] == 'error' and reply['rule'] == 'overloaded' and reply['retry_after'] == 2.0, reply
      assert overloaded.calls == 2
      assert _ask(ws, {'command': 'bar', 'symbol': 'X', 'candle': candles_json(window_frame(r + 6, 1))[0]})[
          'rule'] == 'not_subscribed'                     # the refused subscribe left no state
      del app.dependency_overrides[get_service]
      assert _ask(ws, {'command': 'subscribe', 'symbol': 'X',
                       'candles': candles_json(window_frame(r + 5, r))})['type'] == 'prediction'


# --- Bar times: one timeframe, closed-market gaps stated, stale bars refused ------------------------------------
def _hourly(predictor, last: str, n: int) -> list[dict]:
  """n hourly candles (the test market's prices) ending at `last` (UTC), Monday-Friday hours only."""
  hours = pd.date_range(end=pd.Timestamp(last, tz='UTC'), periods=n * 2, freq='h')
  hours = hours[hours.dayofweek < 5][-n:]
  assert len(hours) == n
  frame = market().iloc[:n].reset_index(drop=True).assign(time=hours)
  return candles_json(frame)


def _next_bar(previous: dict, when: str) -> dict:
  return dict(previous, time=pd.Timestamp(when, tz='UTC').strftime('%Y-%m-%dT%H:%M:%SZ'))


def test_bar_must_follow_by_one_timeframe_or_a_stated_closed_market_gap(predictor):
  r = predictor.required_candles
  app = create_app(predictor, {'max_candles': r + 20})
  history = _hourly(predictor, '2024-03-15 21:00', r)            # ends on a Friday, 21:00 UTC
  template = dict(history[-1])
  with running(app) as port:
    with ws_connect(f'ws://127.0.0.1:{port}/ws', open_timeout=10) as ws:
      first = _ask(ws, {'command': 'subscribe', 'symbol': 'EURUSD', 'candles': history})
      assert first['type'] == 'prediction' and first['timeframe_s'] == 3600
      refused = {}
      for name, when in (('30 days later', '2024-04-14 21:00'), ('off the hour', '2024-03-15 22:30'),
                         ('duplicate', '2024-03-15 21:00'), ('earlier', '2024-03-15 20:00')):
        reply = _ask(ws, {'command': 'bar', 'symbol': 'EURUSD', 'candle': _next_bar(template, when)})
        assert reply['type'] == 'error' and reply['field'] == 'time', (name, reply)
        assert reply['expected_time'] == '2024-03-15T22:00:00Z' and reply['timeframe_s'] == 3600, (name, reply)
        refused[name] = reply['rule']
      assert refused == {'30 days later': 'stale', 'off the hour': 'timeframe', 'duplicate': 'time_order',
                         'earlier': 'time_order'}
      # The weekend: Friday 21:00 -> Sunday 22:00 UTC, 48 hourly bar times without a bar. Accepted, and stated.
      weekend = _ask(ws, {'command': 'bar', 'symbol': 'EURUSD', 'candle': _next_bar(template, '2024-03-17 22:00')})
      assert weekend['type'] == 'prediction' and weekend['gap_bars'] == 48, weekend
      assert weekend['time'] == '2024-03-17T22:00:00Z'
      following = _ask(ws, {'command': 'bar', 'symbol': 'EURUSD', 'candle': _next_bar(template, '2024-03-17 23:00')})
      assert following['type'] == 'prediction' and 'gap_bars' not in following
      # A holiday on top (Friday 21:00 -> Tuesday 22:00, 97 h) is over the default max_gap_hours of 96.
      holiday = _ask(ws, {'command': 'subscribe', 'symbol': 'GBPUSD', 'candles': history})
      assert holiday['type'] == 'prediction'
      long = _ask(ws, {'command': 'bar', 'symbol': 'GBPUSD', 'candle': _next_bar(template, '2024-03-19 22:00')})
      assert long['rule'] == 'stale' and 'subscribe' in long['detail']
      assert _ask(ws, {'command': 'bar', 'symbol': 'GBPUSD', 'candle': _next_bar(template, '2024-03-19 21:00')})[
          'gap_bars'] == 95
  # A configured max_gap_hours: 2 h allows one missing bar, not the weekend.
  strict = create_app(predictor, {'max_candles': r + 20, 'max_gap_hours': 2})
  with running(strict) as port:
    with ws_connect(f'ws://127.0.0.1:{port}/ws', open_timeout=10) as ws:
      assert _ask(ws, {'command': 'subscribe', 'symbol': 'X', 'candles': history})['type'] == 'prediction'
      assert _ask(ws, {'command': 'bar', 'symbol': 'X', 'candle': _next_bar(template, '2024-03-17 22:00')})[
          'rule'] == 'stale'
      assert _ask(ws, {'command': 'bar', 'symbol': 'X', 'candle': _next_bar(template, '2024-03-15 23:00')})[
          'gap_bars'] == 1


def test_subscribe_refuses_a_history_without_a_clear_timeframe(predictor):
  r = predictor.required_candles
  app = create_app(predictor, {'max_candles': r + 20})
  base = pd.Timestamp('2024-03-04', tz='UTC')
  alternating = np.cumsum([0] + [3600 if i % 2 else 7200 for i in range(r)])[:r + 1]  # as many 1 h as 2 h steps
  frame = market().iloc[:r + 1].reset_index(drop=True).assign(time=base + pd.to_timedelta(alternating, unit='s'))
  with running(app) as port:
    with ws_connect(f'ws://127.0.0.1:{port}/ws', open_timeout=10) as ws:
      reply = _ask(ws, {'command': 'subscribe', 'symbol': 'X', 'candles': candles_json(frame)})
      assert reply['type'] == 'error' and reply['rule'] == 'timeframe' and reply['field'] == 'candles', reply
      assert _ask(ws, {'command': 'bar', 'symbol': 'X', 'candle': candles_json(frame)[-1]})['rule'] == 'not_subscribed'
