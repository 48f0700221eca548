"""Serve-time settings and the first line of defence: Host/Origin allow-lists, per-route body limits before
decoding (`Guard`), refusal of a keyless non-loopback bind, and the API key's sources and redaction.

See natron/serve/app.py's module docstring for the whole picture.
"""
from __future__ import annotations

import asyncio
import contextvars
import ctypes
import ctypes.util
import dataclasses
import ipaddress
import logging as logging_std
import math
import os
import re
import secrets
import stat
import time
from typing import Any, Mapping, Optional

from absl import logging

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
  max_body_bytes: int = 16 << 20  # ceiling of the derived body limits (and the limit of routes not named below)
  predict_body_bytes: int = 0     # /predict body limit; 0 -> body_bytes_for(max_candles), capped by max_body_bytes
  batch_body_bytes: int = 0       # /batch_predict; 0 -> body_bytes_for(batch_candles()), capped by max_body_bytes
  max_batch_candles: int = 50_000  # candles in one /batch_predict request, all its windows together
  max_inflight_body_bytes: int = 32 << 20  # request bodies being read at once, all requests together (503 past it)
  request_timeout_ms: float = 1500.0  # deadline of /predict and WebSocket requests (the EA gives up at 2 s)
  batch_timeout_ms: float = 30_000.0  # deadline of a /batch_predict request
  max_queue: int = 1024           # windows (series bars) waiting for the model; more -> 503 at once
  max_connections: int = 256      # open WebSocket connections per server (both sockets); more: closed with 1013
  max_gap_hours: float = 96.0     # longest closed-market gap a WebSocket `bar` may follow its predecessor by
  # Host header names and WebSocket/browser Origin hosts accepted (any port); '*' accepts any.
  allowed_hosts: str = 'localhost,127.0.0.1,[::1]'
  allowed_origins: str = 'localhost,127.0.0.1,[::1]'

  def authorised(self, supplied: Optional[str]) -> bool:
    """Whether `supplied` is the API key (constant-time comparison; any key when none is configured)."""
    return secrets.compare_digest((supplied or '').encode(), self.api_key.encode())

  def batch_candles(self) -> int:
    """The most candles one valid /batch_predict request carries (a series, or max_batch windows)."""
    return min(self.max_batch_candles, max(self.max_series, self.max_batch * self.max_candles))

  def body_limits(self) -> dict[str, int]:
    """{path: body limit in bytes} of the routes that take a body (others: max_body_bytes). A limit set
    explicitly is used as given; a derived one is capped by max_body_bytes."""
    predict = self.predict_body_bytes or min(body_bytes_for(self.max_candles), self.max_body_bytes)
    batch = self.batch_body_bytes or min(body_bytes_for(self.batch_candles()), self.max_body_bytes)
    return {'/predict': predict, '/batch_predict': batch}

  def json_allowances(self) -> dict[str, 'JsonAllowance']:
    """{path: what a body (or a WebSocket message, path 'ws') may hold}, for `check_json_size`."""
    one = JsonAllowance(self.max_candles, 1)
    return {'/predict': one, 'ws': one, '/batch_predict': JsonAllowance(self.batch_candles(), self.max_batch)}

  def inflight_body_bytes(self) -> int:
    """The in-flight body budget: at least the largest route limit, so a maximal request is always readable."""
    return max([self.max_inflight_body_bytes, self.max_body_bytes, *self.body_limits().values()])

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
                 'predict_body_bytes', 'batch_body_bytes', 'max_batch_candles', 'max_inflight_body_bytes',
                 'max_queue', 'max_connections'):
      if getattr(out, name) < (0 if name.endswith('body_bytes') and name.startswith(('predict', 'batch')) else 1):
        raise UserError(f'serve config: {name} must be >= 1, got {getattr(out, name)}.')
    for name in ('request_timeout_ms', 'batch_timeout_ms'):
      if not 0 < getattr(out, name) <= 600_000:
        raise UserError(f'serve config: {name} must be in (0, 600000] ms, got {getattr(out, name)}.')
    if not out.max_gap_hours > 0:
      raise UserError(f'serve config: max_gap_hours must be > 0, got {out.max_gap_hours}.')
    if out.max_series > out.max_batch_candles:
      raise UserError(f'serve config: max_series {out.max_series} is above max_batch_candles {out.max_batch_candles}'
                      f' (the candles of one /batch_predict request): raise max_batch_candles or lower max_series.')
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


async def _send_json(send, status: int, payload: dict, headers=()) -> None:
  body = schemas.encode_json(payload)
  await send({'type': 'http.response.start', 'status': status,
              'headers': [(b'content-type', b'application/json'), (b'content-length', str(len(body)).encode()),
                          (b'connection', b'close'), *headers]})
  await send({'type': 'http.response.body', 'body': body})


@dataclasses.dataclass(frozen=True)
class JsonAllowance:
  """What one valid request may hold: `candles` candle objects in at most `windows` candle lists."""
  candles: int
  windows: int

  def bounds(self) -> dict[str, int]:
    """Upper bounds on the structural characters of a JSON text of such a request, with room to spare (a
    request up to twice a limit still gets its precise 422): each candle is one object of six fields (6
    commas with the one after it), each window a list. Lists also get room for one value nested to orjson's
    depth limit, so a deeply nested field is the 422 naming its candle, not a refusal here."""
    return {'{': 2 * self.candles + 64, ',': 12 * self.candles + 2 * self.windows + 64,
            '[': 2 * self.windows + _MAX_JSON_DEPTH + 64}


_MAX_JSON_DEPTH = 1024   # orjson refuses deeper nesting itself (422 'json')
_COUNT_CHUNK = 1 << 18   # count in slices: between them another thread (the event loop) can take the GIL
# The allowance of the request (or WebSocket connection) being handled; set by `Guard`, read by
# `Service.decode`. Unset (a caller outside the app): the largest allowance of any route.
JSON_ALLOWANCE: contextvars.ContextVar[Optional[JsonAllowance]] = contextvars.ContextVar('natron_json_allowance',
                                                                                         default=None)


def check_json_size(raw, allowance: JsonAllowance) -> None:
  """Refuses (InvalidRequest, rule 'json': 422) a body or message that would decode to far more JSON values
  than any valid request holds, before it is decoded: the byte limit alone does not bound decoding (a 50 MB
  body of `{},` is 1.5 GB of Python dicts; 12 MB of `[],` or `1,` hundreds of MB). Counts '{', ',' and '['
  (in strings too: a valid request has none there), so decoding costs O(limits), not O(bytes)."""
  for char, bound in allowance.bounds().items():
    needle = char if isinstance(raw, str) else char.encode()
    count = 0
    for start in range(0, len(raw), _COUNT_CHUNK):
      count += raw.count(needle, start, start + _COUNT_CHUNK)
      if count > bound:
        raise InvalidRequest(f'Not decoded: the JSON holds more than {bound} {char!r} characters, far more values '
                             f'than a valid request ({allowance.candles} candles in at most {allowance.windows} '
                             'windows) holds.', rule='json')


# glibc keeps freed heap memory and, after a large block is freed, raises its mmap threshold so that later
# large bodies land in the heap too: without a trim, resident memory after a burst of large bodies stays
# at the burst's peak. malloc_trim(0) hands free pages back (all arenas, also inside the heap).
try:
  _MALLOC_TRIM = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6').malloc_trim
except (OSError, AttributeError):   # not glibc (macOS, musl): nothing to do
  _MALLOC_TRIM = None
TRIM_AFTER_BYTES = 1 << 20   # a request whose body was at least this large trims the heap when it is done


def trim_heap() -> None:
  if _MALLOC_TRIM is not None:
    _MALLOC_TRIM(0)


class Ticket:
  """One request: when it arrived, and its place in the `LoopBacklog` (`enter`) until its CPU stage (parse
  and validate, on Service's parse thread) is done (`parsed`). Set by `Guard` in REQUEST for `Service`."""
  __slots__ = ('arrival', 'size', '_backlog')

  def __init__(self):
    self.arrival = time.monotonic()
    self.size = 0                          # work units: body bytes + REQUEST_OVERHEAD
    self._backlog: Optional[LoopBacklog] = None

  def parsed(self, seconds: Optional[float] = None) -> None:
    """The request's CPU stage is done (it took `seconds`: a cost sample), or it was answered otherwise."""
    if self._backlog is not None:
      self._backlog.done(self, seconds)
      self._backlog = None


REQUEST_OVERHEAD = 4096   # a request's fixed cost (HTTP, routing, reply) in body-byte equivalents


class LoopBacklog:
  """Requests whose bodies are read and whose CPU stage (parse, validate) is not done, in work units, and
  what a unit of that stage costs (EWMA seconds). The stages run one at a time (one parse thread; Python
  holds one GIL anyway), so a burst of N requests answers its last after N stages: that wait, not the
  model, made 200 concurrent /predict take 1.7-3 s."""

  def __init__(self):
    self.waiting = 0        # requests
    self.units = 0          # their sizes
    self.s_per_unit = 0.0   # 0 until a request was measured: the first burst is admitted

  def expected_s(self, size: int) -> float:
    """Seconds until a request of `size` units whose body is read now has done its CPU stage."""
    return (self.units + size) * self.s_per_unit

  def enter(self, ticket: Ticket, size: int) -> None:
    self.waiting += 1
    self.units += size
    ticket.size, ticket._backlog = size, self   # pylint: disable=protected-access

  def done(self, ticket: Ticket, seconds: Optional[float]) -> None:
    self.waiting -= 1
    self.units -= ticket.size
    if seconds is not None:
      sample = seconds / ticket.size
      self.s_per_unit = sample if self.s_per_unit == 0.0 else 0.8 * self.s_per_unit + 0.2 * sample


REQUEST: contextvars.ContextVar[Optional[Ticket]] = contextvars.ContextVar('natron_request', default=None)


class Guard:
  """ASGI middleware, first on every request: Host and Origin allow-lists, then the body limits.

  Host (DNS rebinding): a Host header whose name is not in `allowed_hosts` -> 400 (WebSocket: refused, 403).
  Origin (cross-site WebSocket hijacking; browsers send it, the EA and scripts do not): present and not in
  `allowed_origins` -> 403. Body: a declared Content-Length over the route's limit -> 413 before anything is
  read; otherwise the body is read here, counting bytes, and 413 as soon as it passes the limit; the app
  then gets the buffered body. So an oversized body never reaches JSON decoding, and at most `limit` bytes
  of a request are ever held. All requests together hold at most `inflight_body_bytes()` of bodies being
  read: past it, 503 (Retry-After: 1) at once. The route's `JsonAllowance` is set for `Service.decode`.
  Load: each request gets a `Ticket` (arrival time, for its deadline); once its body is read it joins the
  `LoopBacklog`, or is 503 + Retry-After at once when the requests ahead of it would take past its route's
  timeout to parse. After the body, a client that disconnects cancels its handler (so queued model work for
  it is skipped).
  """

  def __init__(self, app, settings: ServeSettings):
    self.app = app
    self.limits = settings.body_limits()
    self.allowances = settings.json_allowances()
    self.default_limit = settings.max_body_bytes
    self.budget = settings.inflight_body_bytes()
    self.inflight = 0     # body bytes held by requests being read (event-loop thread only)
    self.backlog = LoopBacklog()
    self.timeouts = {'/batch_predict': settings.batch_timeout_ms / 1000.0}
    self.default_timeout = settings.request_timeout_ms / 1000.0
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
    JSON_ALLOWANCE.set(self.allowances.get(scope['path'], self.allowances['ws']))
    if scope['type'] != 'http' or scope['method'] in ('GET', 'HEAD', 'OPTIONS'):
      return await self.app(scope, receive, send)
    ticket = Ticket()   # its arrival: the deadline counts from here
    REQUEST.set(ticket)
    try:
      return await self._read_and_serve(scope, receive, send, ticket)
    finally:
      ticket.parsed()

  async def _read_and_serve(self, scope, receive, send, ticket: Ticket):
    limit = self.limits.get(scope['path'], self.default_limit)
    declared = dict(scope.get('headers') or ()).get(b'content-length')
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
      return await _send_json(send, 413, {'detail': f'Request body of {schemas.show(declared.decode("latin-1"))} '
                                                    f'bytes is larger than the limit of {limit} for {scope["path"]}.',
                                          'rule': 'size'})
    # Reserve the declared length up front (refused before a byte is read), else each chunk as it comes.
    reserved = int(declared) if declared is not None else 0
    if await self._shed(scope, send, reserved):   # before reading the body, and again once it is read
      return None
    if self.inflight + reserved > self.budget:
      return await self._budget_refusal(send)
    self.inflight += reserved
    try:
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
        if size > reserved:
          if self.inflight + size - reserved > self.budget:
            return await self._budget_refusal(send)
          self.inflight += size - reserved
          reserved = size
        chunks.append(chunk)
        more = message.get('more_body', False)
      body = b''.join(chunks)
      del chunks
      # Joins the backlog once its body is here (a client trickling a body holds no place in it).
      if await self._shed(scope, send, len(body)):
        return None
      self.backlog.enter(ticket, len(body) + REQUEST_OVERHEAD)
      return await self._serve(scope, body, receive, send)
    finally:
      self.inflight -= reserved
      if reserved >= TRIM_AFTER_BYTES:
        body = chunks = None   # pylint: disable=unused-variable
        await asyncio.get_running_loop().run_in_executor(None, trim_heap)

  async def _serve(self, scope, body: bytes, receive, send):
    """Runs the app on the buffered `body`; a client disconnect after it cancels the handler."""
    sent, gone = False, asyncio.Event()

    async def replay():
      nonlocal sent
      if not sent:
        sent = True
        return {'type': 'http.request', 'body': body, 'more_body': False}
      await gone.wait()
      return {'type': 'http.disconnect'}

    answering = False

    async def tracked_send(message):
      nonlocal answering
      answering = True
      await send(message)

    handler = asyncio.ensure_future(self.app(scope, replay, tracked_send))

    async def watch():   # the only reader of `receive` from here on: after the body, it reports the end
      while (await receive())['type'] != 'http.disconnect':
        pass
      gone.set()
      if not handler.done() and not answering:   # the client left before its answer: stop working for it
        handler.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
      return await handler
    except asyncio.CancelledError:
      if gone.is_set() and not _cancelling():   # the client left: nobody to answer
        return None
      raise
    finally:
      watcher.cancel()

  async def _shed(self, scope, send, body_bytes: int) -> bool:
    """Answers 503 + Retry-After (and returns True) when the requests ahead of this one in the backlog would
    take past its route's timeout: a refusal now, not a late answer the EA has given up on."""
    expected = self.backlog.expected_s(body_bytes + REQUEST_OVERHEAD)
    if not self.backlog.waiting or expected <= self.timeouts.get(scope['path'], self.default_timeout):
      return False
    await _send_json(send, 503, {'detail': f'{self.backlog.waiting} requests are ahead of this one (about '
                                           f'{expected * 1000:.0f} ms of work); retry shortly.', 'rule': 'overloaded'},
                     headers=[(b'retry-after', str(max(1, math.ceil(expected))).encode())])
    return True

  async def _budget_refusal(self, send) -> None:
    await _send_json(send, 503, {'detail': f'The server is reading {self.inflight} bytes of request bodies (budget '
                                           f'{self.budget}); retry shortly.', 'rule': 'overloaded'},
                     headers=[(b'retry-after', b'1')])


def _cancelling() -> bool:
  """Whether this task itself is being cancelled (server shutdown), not only the handler it awaited."""
  task = asyncio.current_task()
  return bool(task is not None and task.cancelling())


class HttpError(Exception):
  """A refusal that is not a 422 (401/403 auth, 413 size, 503 overloaded): status + rule + message, and
  extra response headers (e.g. Retry-After)."""

  def __init__(self, status: int, rule: str, message: str, headers: Optional[Mapping[str, str]] = None):
    super().__init__(message)
    self.status = status
    self.rule = rule
    self.headers = dict(headers or {})


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
