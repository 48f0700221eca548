"""Natron's serving API: FastAPI REST + WebSocket over one `Predictor`.

Routes (an API key, when configured, protects all but /health: header `X-API-Key: KEY` or
`Authorization: Bearer KEY`; WebSockets may also pass `?api_key=KEY`; /docs and /openapi.json are then not
served at all):
  GET  /health          liveness, model version, uptime (never needs the key)
  GET  /model_info      model version, required_candles, features, thresholds, label definitions, limits
  POST /predict         {"candles": [{time, open, high, low, close, volume}, ...]} -> one prediction
  POST /batch_predict   {"windows": [[...], ...]} -> one prediction per window, or
                        {"candles": [...long series...]} -> one prediction per bar from bar required_candles-1
  WS   /ws  (and /)     JSON commands: predict, subscribe, bar, unsubscribe, ping, model_info (see WsSession)

Bad input is HTTP 422 (WebSocket: an error message, connection kept) naming the rule, window and candle index
(natron/serve/schemas.py); a missing key is 401, a wrong one 403, an oversized body 413. Never a silent fix.
Values the client sent are echoed in messages clipped to 100 characters ('…'), however large or deeply nested.

Hardening (`Guard`, the first middleware): a Host header outside `allowed_hosts` is 400 and a browser Origin
outside `allowed_origins` 403 (WebSocket handshakes: refused, 403), both loopback-only by default (DNS rebinding,
cross-site WebSocket hijacking); bodies over the route's limit are 413 before they are decoded (declared
Content-Length: before a byte is read), defaults derived from max_candles (`body_bytes_for`). The key comes
from NATRON_API_KEY or a mode-0600 api_key_file (`resolve_api_key`; --config.api_key works but warns), is never
written to config.json (launch.py) and is redacted from uvicorn's access/WebSocket log lines; `run_phase`
refuses a non-loopback host without a key.

Concurrency. Handlers parse and validate on the event loop (vectorised, well under a millisecond per
window) and hand the model call to `MicroBatcher`, a single worker thread that owns the model: whatever
requests are queued when it becomes free (waiting at most `batch_wait_ms`, default 1 ms, for company) are
stacked into one call of the bucketed predictor. The model therefore never runs on the event loop, requests
arriving together share one call, and a slow client only delays itself (its handler awaits its own socket).
The worker is a thread rather than an asyncio task so one batcher serves every event loop the app runs on
(uvicorn's, or test clients that start a loop per request).

`run_phase(config, workdir)` (configs/serve.py) serves HTTP on config.host:config.port and, when
config.ws_port is set, the same app on config.ws_port as well: the seed's standalone `ws://localhost:8765`
WebSocket server is that second socket (connect to `ws://HOST:8765/` or `/ws`).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging as logging_std
import dataclasses
import ipaddress
import os
import re
import stat
import queue
import secrets
import socket
import threading
import time
from typing import Any, Mapping, Optional

from absl import logging
from fastapi import Depends, FastAPI, Request, Security, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
import numpy as np

from natron.data import grid
from natron.errors import UserError
from natron.serve import schemas
from natron.serve.schemas import InvalidRequest


@dataclasses.dataclass(frozen=True)
class ServeSettings:
  """The serve-time knobs (configs/serve.py keys of the same names)."""
  api_key: str = ''               # '' -> no authentication
  max_candles: int = 5000         # candles per window (/predict, /batch_predict windows, WS predict/subscribe)
  max_batch: int = 256            # windows per /batch_predict request
  max_series: int = 10_000        # candles in one /batch_predict series
  max_symbols: int = 64           # subscribed symbols per WebSocket connection
  batch_wait_ms: float = 1.0      # how long the batcher waits for more requests to join a model call
  max_body_bytes: int = 64 << 20  # ceiling of every body limit (and the limit of routes not named below)
  predict_body_bytes: int = 0     # /predict body limit; 0 -> body_bytes_for(max_candles)
  batch_body_bytes: int = 0       # /batch_predict; 0 -> body_bytes_for(max(max_series, max_batch * max_candles))
  # Host header names and WebSocket/browser Origin hosts accepted (any port); '*' accepts any.
  allowed_hosts: str = 'localhost,127.0.0.1,[::1]'
  allowed_origins: str = 'localhost,127.0.0.1,[::1]'

  def body_limits(self) -> dict[str, int]:
    """{path: body limit in bytes} of the routes that take a body (others: max_body_bytes)."""
    predict = self.predict_body_bytes or body_bytes_for(self.max_candles)
    batch = self.batch_body_bytes or body_bytes_for(max(self.max_series, self.max_batch * self.max_candles))
    return {'/predict': min(predict, self.max_body_bytes), '/batch_predict': min(batch, self.max_body_bytes)}

  @classmethod
  def from_config(cls, config: Optional[Mapping[str, Any]]) -> 'ServeSettings':
    if config is None:
      return cls()
    if isinstance(config, ServeSettings):
      return config
    # Each known key present in `config`, cast to the type of its default ('' api_key stays a str).
    values = {f.name: type(f.default)(config.get(f.name)) for f in dataclasses.fields(cls)
              if config.get(f.name) is not None}
    out = cls(**values)
    for name in ('max_candles', 'max_batch', 'max_series', 'max_symbols', 'max_body_bytes',
                 'predict_body_bytes', 'batch_body_bytes'):
      if getattr(out, name) < (0 if name.endswith('body_bytes') and name != 'max_body_bytes' else 1):
        raise UserError(f'serve config: {name} must be >= 1, got {getattr(out, name)}.')
    return out


# One candle as JSON is ~130 bytes with an ISO time and 5-6 decimal prices ({"time":"2024-01-02T15:00:00Z",
# "open":1.23456,...,"volume":1234.0}); allowing 256 leaves room for long decimals and pretty-printing.
BYTES_PER_CANDLE = 256
BODY_OVERHEAD = 4096


def body_bytes_for(candles: int) -> int:
  """The default body limit of a route taking `candles` candles: BYTES_PER_CANDLE * candles + BODY_OVERHEAD."""
  return BYTES_PER_CANDLE * int(candles) + BODY_OVERHEAD


def _names(spec: str) -> frozenset:
  return frozenset(n.strip().lower().strip('[]') for n in str(spec).split(',') if n.strip())


def host_name(value: str) -> str:
  """'HOST[:PORT]' or '[V6]:PORT' (a Host header or an Origin's netloc) -> the lower-case host, no brackets."""
  value = value.strip().lower()
  if value.startswith('['):
    return value[1:value.find(']')] if ']' in value else value
  return value.rsplit(':', 1)[0] if value.count(':') == 1 else value


def is_loopback(host: str) -> bool:
  host = host_name(host) if host.startswith('[') else host.strip().lower()
  if host == 'localhost':
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def check_exposure(host: str, api_key: str) -> None:
  """Refuses (UserError) to serve a non-loopback address without an API key."""
  if not api_key and not is_loopback(host):
    raise UserError(f'Refusing to listen on {host} without an API key: every machine that can reach it could '
                    'use the model. Set NATRON_API_KEY or --config.api_key_file=PATH (mode 0600), or bind '
                    '127.0.0.1.')


async def _send_json(send, status: int, payload: dict) -> None:
  body = schemas.encode_json(payload)
  await send({'type': 'http.response.start', 'status': status,
              'headers': [(b'content-type', b'application/json'), (b'content-length', str(len(body)).encode()),
                          (b'connection', b'close')]})
  await send({'type': 'http.response.body', 'body': body})


class Guard:
  """ASGI middleware, first on every request: Host and Origin allow-lists, then the per-route body limit.

  Host (DNS rebinding): a Host header whose name is not in `allowed_hosts` -> 400 (WebSocket: refused, 403).
  Origin (cross-site WebSocket hijacking; browsers send it, the EA and scripts do not): present and not in
  `allowed_origins` -> 403. Body: a declared Content-Length over the route's limit -> 413 before anything is
  read; otherwise the body is read here, counting bytes, and 413 as soon as it passes the limit; the app
  then gets the buffered body. So an oversized body never reaches JSON decoding, and at most `limit` bytes
  of a request are ever held.
  """

  def __init__(self, app, settings: ServeSettings):
    self.app = app
    self.limits = settings.body_limits()
    self.default_limit = settings.max_body_bytes
    self.hosts = _names(settings.allowed_hosts)
    self.origins = _names(settings.allowed_origins)

  def _refusal(self, scope) -> Optional[tuple[int, str, str]]:
    headers = dict(scope.get('headers') or ())
    host = headers.get(b'host', b'').decode('latin-1')
    if '*' not in self.hosts and host_name(host) not in self.hosts:
      return 400, 'host', (f'Host {schemas.show(host)} is not allowed (allowed_hosts: {sorted(self.hosts)}); '
                           'set --config.allowed_hosts to serve another name.')
    origin = headers.get(b'origin')
    if origin is not None and '*' not in self.origins:
      text = origin.decode('latin-1')
      netloc = text.split('://', 1)[1] if '://' in text else ''
      if host_name(netloc.split('/', 1)[0]) not in self.origins:
        return 403, 'origin', (f'Origin {schemas.show(text)} is not allowed (allowed_origins: '
                               f'{sorted(self.origins)}).')
    return None

  async def __call__(self, scope, receive, send):
    if scope['type'] not in ('http', 'websocket'):
      return await self.app(scope, receive, send)
    refusal = self._refusal(scope)
    if refusal is not None:
      status, rule, detail = refusal
      if scope['type'] == 'websocket':
        logging.warning('natron serve: WebSocket refused: %s', detail)
        await send({'type': 'websocket.close', 'code': 1008})   # before accept: HTTP 403
      else:
        await _send_json(send, status, {'detail': detail, 'rule': rule})
      return None
    if scope['type'] != 'http' or scope['method'] in ('GET', 'HEAD', 'OPTIONS'):
      return await self.app(scope, receive, send)
    limit = self.limits.get(scope['path'], self.default_limit)
    declared = dict(scope.get('headers') or ()).get(b'content-length')
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
      return await _send_json(send, 413, {'detail': f'Request body of {schemas.show(declared.decode("latin-1"))} '
                                                    f'bytes is larger than the limit of {limit} for {scope["path"]}.',
                                          'rule': 'size'})
    chunks, size, more = [], 0, True
    while more:
      message = await receive()
      if message['type'] == 'http.disconnect':
        return None
      chunk = message.get('body', b'')
      size += len(chunk)
      if size > limit:
        return await _send_json(send, 413, {'detail': f'Request body is larger than the limit of {limit} bytes '
                                                      f'for {scope["path"]}.', 'rule': 'size'})
      chunks.append(chunk)
      more = message.get('more_body', False)
    body = b''.join(chunks)
    del chunks
    sent = False

    async def replay():
      nonlocal sent
      if not sent:
        sent = True
        return {'type': 'http.request', 'body': body, 'more_body': False}
      return await receive()

    return await self.app(scope, replay, send)


class HttpError(Exception):
  """A refusal that is not a 422 (401/403 auth, 413 size): status + rule + message."""

  def __init__(self, status: int, rule: str, message: str):
    super().__init__(message)
    self.status = status
    self.rule = rule


# ---------------------------------------------------------------------------------------------------------
# Micro-batching.
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Job:
  ohlcv: np.ndarray     # float64 [B, R, 5] windows (merged with other jobs), or [N, 5] for `call`
  times: np.ndarray     # int64 [B] ns
  loop: asyncio.AbstractEventLoop
  future: asyncio.Future
  call: Optional[Any] = None   # a function of (ohlcv, times) run alone on the worker (series chunks)

  def size(self) -> int:
    """Windows this job adds to a merged model call; a `call` job is too big to merge with anything."""
    return len(self.ohlcv) if self.call is None else _NEVER_MERGES


_NEVER_MERGES = 1 << 62


def _resolve(future: asyncio.Future, result=None, error: Optional[BaseException] = None) -> None:
  if future.done():    # the client went away and its handler was cancelled
    return
  if error is not None:
    future.set_exception(error)
  else:
    future.set_result(result)


class MicroBatcher:
  """One worker thread that stacks queued requests into one `predictor.predict` call (see module doc)."""

  def __init__(self, predictor, *, max_wait_s: float = 0.001):
    self.predictor = predictor
    self.max_wait_s = max(float(max_wait_s), 0.0)
    self.max_windows = predictor.buckets[-1]
    self.calls = 0             # model calls made (tests check that concurrent requests were merged)
    self.windows = 0
    self._queue: queue.Queue = queue.Queue()
    self._carry: Optional[_Job] = None
    self._thread = threading.Thread(target=self._run, name='natron-batcher', daemon=True)
    self._thread.start()

  async def predict(self, ohlcv: np.ndarray, times: np.ndarray) -> dict:
    """ohlcv float64 [B, R, 5], times int64 [B] -> Predictor.finish dict for those B windows."""
    return await self._submit(ohlcv, times, None)

  async def run(self, call, ohlcv: np.ndarray, times: np.ndarray) -> dict:
    """Runs call(ohlcv, times) on the worker thread, alone (e.g. Predictor.predict_recent)."""
    return await self._submit(ohlcv, times, call)

  async def _submit(self, ohlcv, times, call) -> dict:
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    self._queue.put(_Job(ohlcv, times, loop, future, call))
    return await future

  def close(self) -> None:
    self._queue.put(None)
    self._thread.join(timeout=10)

  def _next_jobs(self) -> Optional[list[_Job]]:
    first = self._carry or self._queue.get()
    self._carry = None
    if first is None:
      return None
    jobs, size = [first], first.size()
    deadline = time.monotonic() + self.max_wait_s
    while size < self.max_windows:
      remaining = deadline - time.monotonic()
      try:
        job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
      except queue.Empty:
        break
      if job is None or size + job.size() > self.max_windows:
        self._carry = job     # too big to join (or the stop signal): it goes first next time
        if job is None:
          self._queue.put(None)
          self._carry = None
        break
      jobs.append(job)
      size += job.size()
    return jobs

  def _run(self) -> None:
    while True:
      jobs = self._next_jobs()
      if jobs is None:
        return
      try:
        if jobs[0].call is not None:
          result = jobs[0].call(jobs[0].ohlcv, jobs[0].times)
          self.calls += 1
          self.windows += len(result['buy_prob'])
          _call_soon(jobs[0], result, None)
          continue
        pred = self.predictor.predict(np.concatenate([j.ohlcv for j in jobs]),
                                      times=np.concatenate([j.times for j in jobs]))
        self.calls += 1
        self.windows += sum(len(j.ohlcv) for j in jobs)
        start = 0
        for job in jobs:
          stop = start + len(job.ohlcv)
          part = {k: v[start:stop] for k, v in pred.items()}
          start = stop
          _call_soon(job, part, None)
      except Exception as e:   # pylint: disable=broad-except
        logging.exception('natron batcher: model call failed')
        for job in jobs:
          _call_soon(job, None, e)


def _call_soon(job: _Job, result, error) -> None:
  try:
    job.loop.call_soon_threadsafe(_resolve, job.future, result, error)
  except RuntimeError:   # that request's event loop has closed: nobody is waiting any more
    pass


# ---------------------------------------------------------------------------------------------------------
# Request handling shared by REST and WebSocket.
# ---------------------------------------------------------------------------------------------------------
class Service:
  """Validation + prediction + reply formatting; the routes and WebSocket sessions are thin wrappers."""

  def __init__(self, predictor, settings: ServeSettings):
    if not predictor.buckets:
      raise UserError('The server needs a Predictor compiled with batch buckets (e.g. buckets=(1, 8, 32, 128)).')
    self.predictor = predictor
    self.settings = settings
    self.batcher = MicroBatcher(predictor, max_wait_s=settings.batch_wait_ms / 1000.0)
    self.started = time.time()
    if settings.max_candles < predictor.required_candles:
      raise UserError(f'serve config: max_candles {settings.max_candles} is below the model\'s '
                      f'required_candles {predictor.required_candles}: no request could succeed.')

  def candles(self, items, *, window: Optional[int] = None, max_count: Optional[int] = None):
    parsed = schemas.parse_candles(items, min_count=self.predictor.required_candles,
                                   max_count=max_count or self.settings.max_candles, window=window)
    check_grid(parsed.ohlcv, window=window)
    return parsed

  async def predict_windows(self, ohlcv: np.ndarray, times: np.ndarray) -> list[dict]:
    """[B, N >= R, 5] windows -> one record per window; submitted in bucket-sized jobs so a large batch
    does not hold the model while other clients' single requests wait."""
    r = self.predictor.required_candles
    step = self.predictor.buckets[-1]
    records = []
    for start in range(0, len(ohlcv), step):
      chunk = np.ascontiguousarray(ohlcv[start:start + step, -r:], dtype=np.float64)
      pred = await self.batcher.predict(chunk, times[start:start + step])
      records.extend(self._records(pred, start))
    return records

  async def predict_series(self, ohlcv: np.ndarray, times: np.ndarray) -> list[dict]:
    """One series [N >= R, 5] -> a record per bar from R - 1 on (the /predict answer for each), computed
    with the predictor's compiled series chunks, one chunk per job so other requests interleave."""
    predictor = self.predictor
    if predictor.series_chunk <= 0:   # no chunk executable: every window through the window path
      windows = np.lib.stride_tricks.sliding_window_view(ohlcv, (predictor.required_candles, 5))[:, 0]
      return await self.predict_windows(windows, times[predictor.required_candles - 1:])
    r, c = predictor.required_candles, predictor.series_chunk
    records = []
    for start in range(0, len(ohlcv) - r + 1, c):
      part = ohlcv[start:start + r + c - 1]
      pred = await self.batcher.run(predictor.predict_recent, part, times[start:start + r + c - 1])
      records.extend(self._records(pred, start))
    return records

  def _records(self, pred: dict, offset: int) -> list[dict]:
    if not pred['valid'].all():
      bad = offset + int(np.argmin(pred['valid']))
      raise InvalidRequest(f'window {bad}: the features or the model output are not finite for these '
                           'candles (extreme or degenerate values)', rule='not_finite', window=bad)
    return self.predictor.records(pred)

  async def predict_one(self, items) -> dict:
    parsed = self.candles(items)
    return (await self.predict_windows(parsed.ohlcv[None], parsed.time[-1:]))[0]

  async def batch(self, body: Mapping[str, Any]) -> dict:
    body = schemas.body_object(body, ('windows', 'candles'))
    if ('windows' in body) == ('candles' in body):
      raise InvalidRequest("Send exactly one of 'windows' (a list of candle lists) or 'candles' (one long "
                           'series).', rule='fields')
    if 'windows' in body:
      windows = body['windows']
      if not isinstance(windows, list) or not windows:
        raise InvalidRequest("'windows' must be a non-empty list of candle lists.", rule='fields')
      if len(windows) > self.settings.max_batch:
        raise InvalidRequest(f'{len(windows)} windows is more than the limit of {self.settings.max_batch} per '
                             'request.', rule='too_many_windows')
      r = self.predictor.required_candles
      parsed = [self.candles(w, window=i) for i, w in enumerate(windows)]
      ohlcv = np.stack([p.ohlcv[-r:] for p in parsed])
      times = np.array([p.time[-1] for p in parsed], np.int64)
      return {'mode': 'windows', 'predictions': await self.predict_windows(ohlcv, times)}
    series = self.candles(body['candles'], max_count=self.settings.max_series)
    return {'mode': 'series', 'predictions': await self.predict_series(series.ohlcv, series.time)}

  def info(self) -> dict:
    s = self.settings
    return dict(self.predictor.info(), limits={
        'max_candles': s.max_candles, 'max_batch': s.max_batch, 'max_series': s.max_series,
        'max_symbols': s.max_symbols, 'batch_wait_ms': s.batch_wait_ms}, auth=bool(s.api_key))

  def health(self) -> dict:
    return {'status': 'ok', 'model_version': self.predictor.model_version,
            'uptime_s': round(time.time() - self.started, 3)}

  def authorised(self, supplied: Optional[str]) -> bool:
    return secrets.compare_digest((supplied or '').encode(), self.settings.api_key.encode())


def _elapsed_ms(start: float) -> float:
  return round((time.perf_counter() - start) * 1000.0, 3)


def _json(payload, status: int = 200) -> Response:
  return Response(schemas.encode_json(payload), status_code=status,
                  media_type='application/json')


async def _read_body(request: Request, limit: int) -> bytes:
  declared = request.headers.get('content-length')
  if declared is not None and declared.isdigit() and int(declared) > limit:
    raise HttpError(413, 'size', f'Request body of {declared} bytes is larger than the limit of {limit}.')
  chunks, size = [], 0
  async for chunk in request.stream():
    size += len(chunk)
    if size > limit:
      raise HttpError(413, 'size', f'Request body is larger than the limit of {limit} bytes.')
    chunks.append(chunk)
  return b''.join(chunks)


def check_grid(ohlcv: np.ndarray, *, window: Optional[int] = None, field: Optional[str] = None) -> None:
  """Features run on prices in points (natron.data.grid): one window's prices must lie on one quote grid."""
  try:
    grid.infer_point(ohlcv[:, :4])
  except grid.GridError as e:
    raise InvalidRequest(str(e), rule='quote_grid', window=window, field=field) from None


# ---------------------------------------------------------------------------------------------------------
# WebSocket sessions.
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _History:
  time: np.ndarray    # int64 [R] ns
  ohlcv: np.ndarray   # float64 [R, 5] (prices exact: converted to points by the Predictor)


class WsSession:
  """One connection's state: subscribed symbols, each with the last required_candles bars.

  Commands (JSON objects; any message may carry an "id", echoed in the reply):
    {"command": "ping"}                                   -> {"type": "pong", ...}
    {"command": "model_info"}                             -> {"type": "model_info", ...}
    {"command": "predict", "candles": [...]}              -> the /predict reply + "type": "prediction"
    {"command": "subscribe", "symbol": S, "candles": [history >= required_candles]}
                                                          -> the prediction for the last history bar
    {"command": "bar", "symbol": S, "candle": {...}}      -> the prediction for that bar (time must increase)
    {"command": "unsubscribe", "symbol": S}               -> {"type": "unsubscribed", ...}
  Errors: {"type": "error", "command": ..., "detail": ..., "rule": ..., [index, field]}; the connection stays
  open and its state is unchanged by the failed command.
  """
  COMMANDS = ('ping', 'model_info', 'predict', 'subscribe', 'bar', 'unsubscribe')

  def __init__(self, service: Service):
    self.service = service
    self.histories: dict[str, _History] = {}

  async def handle(self, raw) -> dict:
    start = time.perf_counter()
    command, request_id = None, None
    try:
      msg = schemas.decode_json(raw)
      if not isinstance(msg, dict):
        raise InvalidRequest(f'A message must be a JSON object with a "command", got {type(msg).__name__}.',
                             rule='fields')
      command, request_id = msg.get('command'), msg.get('id')
      if request_id is not None and not (type(request_id) in (int, float) or
                                         (isinstance(request_id, str) and len(request_id) <= 100)):
        request_id = None   # never echoed: a nested or huge id would make the reply as big as the request
        raise InvalidRequest('"id" must be a number or a string of at most 100 characters.', rule='fields',
                             field='id')
      if command not in self.COMMANDS:
        raise InvalidRequest(f'Unknown command {schemas.show(command)}; expected one of {list(self.COMMANDS)}.',
                             rule='command')
      reply = await getattr(self, f'_{command}')(msg)
      if reply.get('type') == 'prediction':
        reply['processing_time_ms'] = _elapsed_ms(start)
    except InvalidRequest as e:
      reply = {'type': 'error', 'command': command if command in self.COMMANDS else None, **e.to_dict()}
    except Exception:   # pylint: disable=broad-except
      # Documented contract: an error message, the connection and its subscriptions kept.
      logging.exception('natron serve: WebSocket command %s failed', command if command in self.COMMANDS else '?')
      reply = {'type': 'error', 'command': command if command in self.COMMANDS else None,
               'detail': 'Internal error while handling this command; the connection and its subscriptions are '
                         'kept.', 'rule': 'internal'}
    if request_id is not None:
      reply['id'] = request_id
    return reply

  def _fields(self, msg: dict, allowed: tuple[str, ...]) -> None:
    extra = sorted(k for k in msg if k not in allowed + ('command', 'id'))
    if extra:
      raise InvalidRequest(f'Unexpected field(s) {schemas.show_keys(extra)} for command {msg["command"]!r}; allowed: '
                           f'{list(allowed)}.', rule='fields')

  def _symbol(self, msg: dict) -> str:
    symbol = msg.get('symbol')
    if not isinstance(symbol, str) or not 0 < len(symbol) <= 64:
      raise InvalidRequest('"symbol" must be a non-empty string of at most 64 characters.', rule='fields',
                           field='symbol')
    return symbol

  async def _ping(self, msg):
    self._fields(msg, ())
    return {'type': 'pong', 'server_time': time.time()}

  async def _model_info(self, msg):
    self._fields(msg, ())
    return {'type': 'model_info', **self.service.info()}

  async def _predict(self, msg):
    self._fields(msg, ('candles',))
    return {'type': 'prediction', **(await self.service.predict_one(msg.get('candles')))}

  async def _subscribe(self, msg):
    self._fields(msg, ('symbol', 'candles'))
    symbol = self._symbol(msg)
    if symbol not in self.histories and len(self.histories) >= self.service.settings.max_symbols:
      raise InvalidRequest(f'At most {self.service.settings.max_symbols} symbols per connection.',
                           rule='too_many_symbols')
    parsed = self.service.candles(msg.get('candles'))
    r = self.service.predictor.required_candles
    history = _History(parsed.time[-r:].copy(), parsed.ohlcv[-r:].copy())
    record = await self._predict_history(history)
    self.histories[symbol] = history
    return {'type': 'prediction', 'symbol': symbol, 'subscribed': True, **record}

  async def _bar(self, msg):
    self._fields(msg, ('symbol', 'candle'))
    symbol = self._symbol(msg)
    history = self.histories.get(symbol)
    if history is None:
      raise InvalidRequest(f'Symbol {symbol!r} is not subscribed on this connection: send "subscribe" with '
                           'its history first.', rule='not_subscribed', field='symbol')
    bar = schemas.parse_candle(msg.get('candle'))
    if bar.time[0] <= history.time[-1]:
      kind = 'duplicates' if bar.time[0] == history.time[-1] else 'is earlier than'
      raise InvalidRequest(f'candle.time {schemas.iso_time(bar.time[0])} {kind} the last bar of {symbol} '
                           f'({schemas.iso_time(history.time[-1])}); send each closed bar once, in order.',
                           rule='time_order', field='time')
    updated = _History(np.concatenate([history.time[1:], bar.time]),
                       np.concatenate([history.ohlcv[1:], bar.ohlcv]))
    check_grid(updated.ohlcv, field='candle')
    record = await self._predict_history(updated)
    self.histories[symbol] = updated     # only after success: a failed bar leaves the history as it was
    return {'type': 'prediction', 'symbol': symbol, **record}

  async def _unsubscribe(self, msg):
    self._fields(msg, ('symbol',))
    symbol = self._symbol(msg)
    existed = self.histories.pop(symbol, None) is not None
    return {'type': 'unsubscribed', 'symbol': symbol, 'was_subscribed': existed}

  async def _predict_history(self, history: _History) -> dict:
    return (await self.service.predict_windows(history.ohlcv[None], history.time[-1:]))[0]


# ---------------------------------------------------------------------------------------------------------
# The app.
# ---------------------------------------------------------------------------------------------------------
_API_KEY_HEADER = APIKeyHeader(name='X-API-Key', auto_error=False,
                               description='The server\'s API key (when it is configured with one).')
_BEARER = HTTPBearer(auto_error=False, description='Alternatively: Authorization: Bearer <API key>.')

_ERRORS = {422: {'model': schemas.ErrorResponse, 'description': 'Invalid request: the rule, window, candle '
                                                                'index and field that failed.'},
           401: {'model': schemas.ErrorResponse, 'description': 'API key missing.'},
           403: {'model': schemas.ErrorResponse, 'description': 'API key wrong.'},
           413: {'model': schemas.ErrorResponse, 'description': 'Body larger than the route\'s limit '
                                                                '(predict_body_bytes / batch_body_bytes).'}}


def create_app(predictor, serve_config: Optional[Mapping[str, Any]] = None) -> FastAPI:
  """The FastAPI app serving `predictor` with the limits and key of `serve_config` (see ServeSettings)."""
  settings = ServeSettings.from_config(serve_config)
  service = Service(predictor, settings)
  body_limits = settings.body_limits()

  @contextlib.asynccontextmanager
  async def lifespan(app):
    del app
    yield
    service.batcher.close()

  # With an API key, the schema and docs pages are not served either (they would be unauthenticated routes).
  public_docs = not settings.api_key
  app = FastAPI(title='Natron', version=predictor.model_version, lifespan=lifespan,
                description='Multi-task market model: buy/sell probabilities, direction, regime.',
                docs_url='/docs' if public_docs else None, redoc_url='/redoc' if public_docs else None,
                openapi_url='/openapi.json' if public_docs else None)
  app.state.service = service
  app.add_middleware(Guard, settings=settings)

  async def require_key(key: Optional[str] = Security(_API_KEY_HEADER),
                        bearer: Optional[HTTPAuthorizationCredentials] = Security(_BEARER)) -> None:
    if not settings.api_key:
      return
    supplied = key if key is not None else (bearer.credentials if bearer is not None else None)
    if supplied is None:
      raise HttpError(401, 'auth', 'API key required: send the X-API-Key header or Authorization: Bearer <key>.')
    if not service.authorised(supplied):
      raise HttpError(403, 'auth', 'API key rejected.')

  @app.exception_handler(InvalidRequest)
  async def _invalid(request, exc: InvalidRequest):
    del request
    return _json(exc.to_dict(), 422)

  @app.exception_handler(HttpError)
  async def _http_error(request, exc: HttpError):
    del request
    headers = {'WWW-Authenticate': 'Bearer'} if exc.status == 401 else None
    return JSONResponse({'detail': str(exc), 'rule': exc.rule}, status_code=exc.status, headers=headers)

  @app.exception_handler(RequestValidationError)
  async def _request_validation(request, exc: RequestValidationError):
    del request
    first = exc.errors()[0] if exc.errors() else {}
    where = '.'.join(str(p) for p in first.get('loc', ()))
    return _json({'detail': f'{where}: {first.get("msg", "invalid request")}', 'rule': 'request'}, 422)

  @app.get('/health', response_model=schemas.HealthResponse)
  async def health():
    return _json(service.health())

  @app.get('/model_info', response_model=schemas.ModelInfoResponse, dependencies=[Depends(require_key)],
           responses={k: _ERRORS[k] for k in (401, 403)})
  async def model_info():
    return _json(service.info())

  @app.post('/predict', dependencies=[Depends(require_key)],
            openapi_extra=schemas.openapi_body(schemas.PredictRequest),
            responses={200: {'model': schemas.PredictResponse}, **_ERRORS})
  async def predict(request: Request):
    start = time.perf_counter()
    body = schemas.body_object(schemas.decode_json(await _read_body(request, body_limits['/predict'])),
                               ('candles',))
    if 'candles' not in body:
      raise InvalidRequest("Body needs 'candles': a list of candle objects.", rule='fields', field='candles')
    record = await service.predict_one(body['candles'])
    record['processing_time_ms'] = _elapsed_ms(start)
    return _json(record)

  @app.post('/batch_predict', dependencies=[Depends(require_key)],
            openapi_extra=schemas.openapi_body(schemas.BatchPredictRequest),
            responses={200: {'model': schemas.BatchPredictResponse}, **_ERRORS})
  async def batch_predict(request: Request):
    start = time.perf_counter()
    raw = await _read_body(request, body_limits['/batch_predict'])
    reply = await service.batch(schemas.decode_json(raw))
    reply['count'] = len(reply['predictions'])
    reply['processing_time_ms'] = _elapsed_ms(start)
    return _json(reply)

  async def websocket_endpoint(websocket: WebSocket):
    if settings.api_key:
      supplied = websocket.headers.get('x-api-key') or websocket.query_params.get('api_key')
      auth = websocket.headers.get('authorization', '')
      if supplied is None and auth.lower().startswith('bearer '):
        supplied = auth[7:].strip()
      if not service.authorised(supplied):
        await websocket.close(code=1008, reason='API key missing or wrong')
        return
    await websocket.accept()
    session = WsSession(service)
    try:
      while True:
        message = await websocket.receive()
        if message['type'] == 'websocket.disconnect':
          return
        raw = message.get('text')
        raw = raw if raw is not None else message.get('bytes', b'')
        reply = await session.handle(raw)
        await websocket.send_text(schemas.encode_json(reply).decode())
    except WebSocketDisconnect:
      return

  app.add_api_websocket_route('/ws', websocket_endpoint)
  app.add_api_websocket_route('/', websocket_endpoint)   # the seed's ws://localhost:8765 (path '/')

  def openapi():
    if app.openapi_schema is None:
      spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
      components = spec.setdefault('components', {}).setdefault('schemas', {})
      components.update(schemas.component_schemas(schemas.PredictRequest, schemas.BatchPredictRequest))
      app.openapi_schema = spec
    return app.openapi_schema

  app.openapi = openapi
  return app


# ---------------------------------------------------------------------------------------------------------
# Phase entry point: python launch.py --config=configs/serve.py --workdir=DIR
# ---------------------------------------------------------------------------------------------------------
def bind(host: str, port: int) -> socket.socket:
  """A listening TCP socket on host:port (port 0: any free port)."""
  family = socket.AF_INET6 if ':' in host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((host, port))
  except OSError as e:
    sock.close()
    raise schemas.UserError(f'Cannot listen on {host}:{port}: {e}') from None
  sock.listen(2048)
  sock.set_inheritable(True)
  return sock


API_KEY_ENV = 'NATRON_API_KEY'
_SECRET_QUERY = re.compile(r'((?:api_key|apikey|key|token)=)[^&\s"\']*', re.IGNORECASE)


def redact(text: str) -> str:
  """A URL or log line with the value of every api_key=/key=/token= query parameter replaced by ***."""
  return _SECRET_QUERY.sub(r'\1***', text)


class RedactSecrets(logging_std.Filter):
  """Logging filter for uvicorn's loggers: its access and WebSocket lines carry the full path with the query
  string, where a WebSocket client may have put ?api_key=KEY."""

  def filter(self, record) -> bool:
    if record.args:
      args = record.args if isinstance(record.args, tuple) else (record.args,)
      record.args = tuple(redact(a) if isinstance(a, str) else a for a in args)
    if isinstance(record.msg, str):
      record.msg = redact(record.msg)
    return True


_REDACT = RedactSecrets()


def resolve_api_key(config: Mapping[str, Any], environ: Optional[Mapping[str, str]] = None) -> str:
  """The API key from, in order: --config.api_key (works, but warns: it is visible in the process list),
  --config.api_key_file=PATH (must be mode 0600 or stricter; surrounding whitespace stripped), or the
  NATRON_API_KEY environment variable. '' when none is set. Never logs the key."""
  environ = os.environ if environ is None else environ
  given = config.get('api_key') or ''
  path = config.get('api_key_file') or ''
  if given and path:
    raise UserError('serve config: set api_key or api_key_file, not both.')
  if given:
    logging.warning('natron serve: --config.api_key puts the key in the process list (ps) and shell history; '
                    'prefer %s=... or --config.api_key_file=PATH (mode 0600).', API_KEY_ENV)
    return str(given)
  if path:
    try:
      mode = os.stat(path).st_mode
    except OSError as e:
      raise UserError(f'serve config: cannot read api_key_file {path}: {e.strerror}') from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
      raise UserError(f'serve config: api_key_file {path} has mode {stat.S_IMODE(mode):04o}; other users can read '
                      f'it. Run: chmod 600 {path}')
    with open(path, encoding='utf-8') as f:
      key = f.read().strip()
    if not key:
      raise UserError(f'serve config: api_key_file {path} is empty.')
    return key
  return environ.get(API_KEY_ENV, '').strip()


def make_server(app: FastAPI, *, host: str = '127.0.0.1', log_level: str = 'warning',
                access_log: bool = False):
  import uvicorn   # pylint: disable=g-import-not-at-top
  service = getattr(getattr(app, 'state', None), 'service', None)
  # A WebSocket message carries at most one request: the same bound as a /predict body.
  ws_max = service.settings.body_limits()['/predict'] if service is not None else 16 << 20
  config = uvicorn.Config(app, host=host, log_level=log_level, access_log=access_log, ws_max_size=ws_max,
                          ws_per_message_deflate=False, timeout_graceful_shutdown=5)
  # After uvicorn.Config, which (re)configures these loggers.
  for name in ('uvicorn', 'uvicorn.error', 'uvicorn.access'):
    if _REDACT not in logging_std.getLogger(name).filters:
      logging_std.getLogger(name).addFilter(_REDACT)
  return uvicorn.Server(config)


def compilation_cache_dir(setting: str, workdir: str) -> str:
  """'auto' -> workdir/serve/jax_cache; '' -> none; else the path given."""
  if setting == 'auto':
    return os.path.join(os.path.abspath(workdir), 'serve', 'jax_cache')
  return setting or ''


def run_phase(config, workdir: str) -> dict:
  """Loads the bundle (config.bundle or workdir/finetune/bundle), compiles, and serves until interrupted."""
  from natron.predictor import optional_threshold   # pylint: disable=g-import-not-at-top
  from natron.serve.engine import ServingPredictor   # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  # The key and the exposure check first: a refusal should not wait for the model to compile.
  host = config.get('host', '127.0.0.1')
  settings = dict(config.to_dict() if hasattr(config, 'to_dict') else config)
  settings['api_key'] = resolve_api_key(config)
  check_exposure(host, settings['api_key'])
  cache = compilation_cache_dir(config.get('compilation_cache_dir', 'auto'), workdir)
  if cache:
    import jax   # pylint: disable=g-import-not-at-top
    # Restarts load the compiled buckets from disk instead of recompiling the feature graph (minutes on a
    # small CPU). Entries are keyed by the exact computation, so a changed model or code never hits.
    jax.config.update('jax_compilation_cache_dir', cache)
  predictor = ServingPredictor.load(config.get('bundle') or workdir,
                                    buckets=tuple(config.get('buckets', (1, 8, 32, 128))),
                                    threshold=optional_threshold(config.get('threshold', -1.0)),
                                    exported=config.get('exported', ''))
  app = create_app(predictor, settings)
  sockets = [bind(host, int(config.port))]
  ws_port = int(config.get('ws_port', 0) or 0)
  if ws_port and ws_port != int(config.port):
    sockets.append(bind(host, ws_port))
  ready = time.perf_counter() - start
  logging.info('natron serve: model %s, required_candles %d, compiled buckets %s in %.1f s; ready in %.1f s on '
               'http://%s:%d%s', predictor.model_version, predictor.required_candles, predictor.buckets,
               predictor.compile_seconds, ready, host, int(config.port),
               f' and ws://{host}:{ws_port}/' if len(sockets) > 1 else '')
  print(f'natron serve: ready on http://{host}:{int(config.port)}' +
        (f' and ws://{host}:{ws_port}/' if len(sockets) > 1 else ''), flush=True)
  server = make_server(app, host=host, log_level=config.get('log_level', 'warning'),
                       access_log=bool(config.get('access_log', False)))
  server.run(sockets=sockets)
  return {'startup_s': round(ready, 2), 'compile_s': round(predictor.compile_seconds, 2),
          'model_version': predictor.model_version}
