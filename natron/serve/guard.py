"""Serve-time settings and the first line of defence: Host/Origin allow-lists, per-route body limits before
decoding (`Guard`), refusal of a keyless non-loopback bind, and the API key's sources and redaction.

See natron/serve/app.py's module docstring for the whole picture.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import logging as logging_std
import os
import re
import stat
from typing import Any, Mapping, Optional

from absl import logging

from natron.errors import UserError
from natron.serve import schemas


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
