"""Natron's serving API: FastAPI REST + WebSocket over one `Predictor`.

Routes (an API key, when configured, protects all but /health: header `X-API-Key: KEY` or
`Authorization: Bearer KEY`; WebSockets may also pass `?api_key=KEY`; /docs and /openapi.json are then not
served at all):
  GET  /health          readiness: 200 {"status": "ok", model version, uptime} once the model is loaded, else 503
                        (never needs the key; see Start-up)
  GET  /model_info      model version, required_candles, features, thresholds, label definitions, limits
  POST /predict         {"candles": [{time, open, high, low, close, volume}, ...]} -> one prediction
  POST /batch_predict   {"windows": [[...], ...]} -> one prediction per window, or
                        {"candles": [...long series...]} -> one prediction per bar from bar required_candles-1
  WS   /ws  (and /)     JSON commands: predict, subscribe, bar, unsubscribe, ping, model_info (see ws.WsSession)

Bad input is HTTP 422 (WebSocket: an error message, connection kept) naming the rule, window and candle index
(natron/serve/schemas.py); a missing key is 401, a wrong one 403, an oversized body 413, a server that cannot
answer (starting, failed, overloaded) 503 with the rule and, when retrying can help, Retry-After. Never a
silent fix. Values the client sent are echoed in messages clipped to 100 characters ('…'), however large or
deeply nested. Every successful reply is validated against the route's declared response model (FastAPI's
response_model; measured on this 2-core CPU: ~40 µs per /predict reply, next to ~60 µs for encode_json and
milliseconds for the model; ~19 ms per 1,000 predictions of /batch_predict) and written by `NatronJSON`
(schemas.encode_json: orjson, floats never in exponent form), the one JSON writer of REST and WebSocket.

Shape (FastAPI's "Bigger Applications"): module-level routers (`public`: /health; `models`: the model routes,
behind the `require_key` dependency; `sockets`: the WebSocket routes, behind `require_ws_key`), and the
`get_service` dependency, which reads the `Service` from `app.state` (tests may replace it through
`app.dependency_overrides[get_service]`; WebSocket commands honour a zero-argument override too).

Start-up. `create_app(predictor)` serves a ready predictor; `create_app(loader)` (a zero-argument callable
returning one) serves at once and runs the loader in a thread started with the server (lifespan). Until the
model is ready, /health answers 503 {"status": "starting"} with Retry-After, the model routes 503 (rule
'starting', Retry-After) and WebSocket commands an error message (rule 'starting', "retry_after"; the
connection is kept, ping answers). 503 rather than 200-with-"starting" because readiness probes (Kubernetes,
load balancers) and the EA's checks read the status code: 2xx means "ready to predict". If loading
fails, /health answers 503 {"status": "failed", "reason": ...} and the model routes 503 (rule 'failed');
`run_phase` then stops after `failed_exit_s` (so probes and people can read the reason) and exits non-zero
with the error (`natron: error: ...` for a UserError). A missing bundle is found before anything is bound.

Hardening (`Guard`, the first middleware): a Host header outside `allowed_hosts` is 400 and a browser Origin
outside `allowed_origins` 403 (WebSocket handshakes: refused, 403), both loopback-only by default (DNS rebinding,
cross-site WebSocket hijacking); bodies over the route's limit are 413 before they are decoded (declared
Content-Length: before a byte is read), defaults derived from max_candles (`body_bytes_for`). The key comes
from NATRON_API_KEY or a mode-0600 api_key_file (`resolve_api_key`; --config.api_key works but warns), is never
written to config.json (launch.py) and is redacted from uvicorn's access/WebSocket log lines; `run_phase`
refuses a non-loopback host without a key.

WebSocket. At most `max_connections` open connections per server (both sockets together): the next one is
closed at once with code 1013 (try again later) and the reason; the count drops on every way a connection ends
(close, reset, a failed send, shutdown). A session holds at most `max_symbols` histories of required_candles
bars (48 bytes a bar): `ws.session_bytes_bound` bounds its memory (tested; 3.05 MB at 64 x 1016 bars; a real
server holds ~3.4 MB per such connection, tracemalloc, 4-6 MB resident), and a message is at most the /predict body
limit. A bar must follow the previous one by one timeframe (inferred from the subscribed
history), or by whole timeframes within `max_gap_hours` for a closed market (stated as "gap_bars"); otherwise it
is refused ('time_order', 'timeframe', 'stale') with the expected time, and the state is unchanged. Any
failing command, a model error or a 503 included, answers an error message and keeps the connection and its
subscriptions.

Concurrency and overload (service.py, batcher.py, guard.py). Bodies over 2 MB and every /predict and
/batch_predict parse run on one parse thread, not the event loop, so /health stays responsive; before decoding,
a body's JSON values are counted (`{`, `,`, `[`) and far more than a valid request holds is a 422 'json'. The
model call goes to `MicroBatcher`, a single worker thread that owns the model: whatever requests are queued when
it becomes free (waiting at most `batch_wait_ms` for company) are stacked into one call of the bucketed
predictor. Every request has a deadline from its arrival (`request_timeout_ms`, 1.5 s: inside the EA's 2 s;
`batch_timeout_ms` for /batch_predict): admission control refuses at once (503 'overloaded' + Retry-After)
when the measured model time of the work queued ahead would pass it or more than `max_queue` windows wait, a
job still queued past its deadline is dropped with a 503, the backlog of requests waiting to be parsed is shed
the same way, and a client that disconnects has its handler cancelled and its queued job skipped. Bodies read
at once are capped all together (`max_inflight_body_bytes`, 503 past it) and freed heap is returned to the OS
after large bodies (malloc_trim). If the worker thread dies, queued and later requests get 503 'unavailable'
at once and /health answers 503 'failed' with the reason (the worker is not restarted: restart the server).
WebSocket commands parse on the event loop (a message is bounded by the /predict body limit) and are not part
of the parse-backlog shedding; their model calls have the same deadlines.

`run_phase(config, workdir)` (configs/serve.py) binds config.host:config.port and, when config.ws_port is set,
the same app on config.ws_port as well (the seed's standalone `ws://localhost:8765` WebSocket server is that
second socket: `ws://HOST:8765/` or `/ws`), then serves while the model loads (Start-up).

Modules: guard.py (settings, Guard, API key), batcher.py (MicroBatcher), service.py (Service: validation,
prediction, replies), ws.py (WsSession, ConnectionSlots), app.py (routers, dependencies, start-up,
server, run_phase; re-exports the names tests import).
"""
from __future__ import annotations

import contextlib
import functools
import logging as logging_std
import os
import socket
import threading
import time
from typing import Any, Callable, Mapping, Optional

from absl import logging
from fastapi import APIRouter, Depends, FastAPI, Request, Response, Security, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError, WebSocketException
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import HTTPConnection

from natron.serve import schemas
from natron.serve.batcher import MicroBatcher
from natron.serve.guard import (API_KEY_ENV, BODY_OVERHEAD, BYTES_PER_CANDLE, Guard, HttpError, RedactSecrets,
                                ServeSettings, _REDACT, body_bytes_for, check_exposure, host_name, is_loopback,
                                redact, resolve_api_key)
from natron.serve.schemas import InvalidRequest
from natron.serve.service import Service, check_grid, elapsed_ms
from natron.serve.ws import ConnectionSlots, WsSession, session_bytes_bound

STARTING_RETRY_AFTER_S = 5     # Retry-After while the model loads
CONNECTIONS_RETRY_AFTER_S = 5  # the wait a connection over max_connections is told (its close reason)


class NatronJSON(JSONResponse):
  """The server's one JSON response class: schemas.encode_json (orjson; floats never in exponent form, which
  the EA's StringToDouble could not read). Routes name it explicitly: with FastAPI's default class, a route
  with a response model would be written by pydantic instead, exponents and all. (A JSONResponse subclass,
  so the OpenAPI document shows the response models.)"""

  def render(self, content: Any) -> bytes:
    return schemas.encode_json(content)


# ---------------------------------------------------------------------------------------------------------
# Start-up: the model loads in a thread while the server already answers.


class Startup:
  """Where the model stands: 'starting' (the loader runs), 'ok' (app.state.service is set) or 'failed'."""

  def __init__(self, loader: Optional[Callable[[], Any]] = None):
    self.loader = loader
    self.status = 'starting' if loader is not None else 'ok'
    self.reason = ''
    self.error: Optional[BaseException] = None
    self.began = time.time()
    self.ready_s: Optional[float] = None     # seconds from begin() to a loaded, compiled model
    self.predictor = None
    self.on_failure: Optional[Callable[[], None]] = None   # run_phase: stop the server after failed_exit_s
    self.on_ready: Optional[Callable[[Any], None]] = None
    self._thread: Optional[threading.Thread] = None

  def begin(self, app: FastAPI) -> None:
    """Starts the loader thread (once; nothing to do for an app built on a ready predictor)."""
    if self.loader is None or self._thread is not None:
      return
    self._thread = threading.Thread(target=self._load, args=(app,), name='natron-load', daemon=True)
    self._thread.start()

  def wait(self, timeout: Optional[float] = None) -> str:
    if self._thread is not None:
      self._thread.join(timeout)
    return self.status

  def _load(self, app: FastAPI) -> None:
    start = time.perf_counter()
    try:
      predictor = self.loader()
      service = Service(predictor, app.state.settings)
    except Exception as e:   # pylint: disable=broad-except
      self.error, self.reason = e, schemas.clip(f'{type(e).__name__}: {e}', schemas.MAX_DETAIL)
      self.status = 'failed'
      log = logging.error if isinstance(e, schemas.UserError) else logging.exception
      log('natron serve: the model failed to load: %s', e)
      if self.on_failure is not None:
        self.on_failure()
      return
    app.version, app.openapi_schema = predictor.model_version, None
    self.predictor, self.ready_s = predictor, time.perf_counter() - start
    app.state.service = service      # before the status: whoever sees 'ok' finds the service
    self.status = 'ok'
    if self.on_ready is not None:
      self.on_ready(predictor)

  def health(self) -> dict:
    out = {'status': self.status, 'uptime_s': round(time.time() - self.began, 3)}
    if self.reason:
      out['reason'] = self.reason
    return out

  def refusal(self) -> HttpError:
    """The 503 a model route answers while the model is not there."""
    if self.status == 'failed':
      return HttpError(503, 'failed', f'The model failed to load, so this server cannot predict: {self.reason}')
    return HttpError(503, 'starting', 'The model is still loading; retry after the Retry-After seconds '
                     '(GET /health answers 200 "ok" once it is ready).',
                     headers={'Retry-After': str(STARTING_RETRY_AFTER_S)})


# ---------------------------------------------------------------------------------------------------------
# Dependencies.


def get_service(connection: HTTPConnection) -> Service:
  """The app's Service (app.state.service); 503 'starting' / 'failed' while there is none."""
  service = connection.app.state.service
  if service is None:
    raise connection.app.state.startup.refusal()
  return service


def _service_of(connection: HTTPConnection) -> Service:
  """get_service for code outside FastAPI's injection (WebSocket commands), honouring a test's override."""
  override = connection.app.dependency_overrides.get(get_service)
  return override() if override is not None else get_service(connection)


_API_KEY_HEADER = APIKeyHeader(name='X-API-Key', auto_error=False,
                               description='The server\'s API key (when it is configured with one).')
_BEARER = HTTPBearer(auto_error=False, description='Alternatively: Authorization: Bearer <API key>.')


async def require_key(request: Request, key: Optional[str] = Security(_API_KEY_HEADER),
                      bearer: Optional[HTTPAuthorizationCredentials] = Security(_BEARER)) -> None:
  """401 without a key, 403 with a wrong one (when the server has a key)."""
  settings = request.app.state.settings
  if not settings.api_key:
    return
  supplied = key if key is not None else (bearer.credentials if bearer is not None else None)
  if supplied is None:
    raise HttpError(401, 'auth', 'API key required: send the X-API-Key header or Authorization: Bearer <key>.')
  if not settings.authorised(supplied):
    raise HttpError(403, 'auth', 'API key rejected.')


async def require_ws_key(websocket: WebSocket) -> None:
  """The handshake is refused (HTTP 403) without the right key: header, Bearer, or ?api_key=."""
  settings = websocket.app.state.settings
  if not settings.api_key:
    return
  supplied = websocket.headers.get('x-api-key') or websocket.query_params.get('api_key')
  auth = websocket.headers.get('authorization', '')
  if supplied is None and auth.lower().startswith('bearer '):
    supplied = auth[7:].strip()
  if not settings.authorised(supplied):
    raise WebSocketException(code=1008, reason='API key missing or wrong')


async def _read_body(request: Request) -> bytes:
  """The body (Guard has already buffered it within the route's limit; this re-checks the same limit)."""
  limits = request.app.state.body_limits
  limit = limits.get(request.url.path, request.app.state.settings.max_body_bytes)
  body = await request.body()
  if len(body) > limit:
    raise HttpError(413, 'size', f'Request body is larger than the limit of {limit} bytes.')
  return body


# ---------------------------------------------------------------------------------------------------------
# Routers.

def _documented(*statuses: int) -> dict:
  errors = {422: 'Invalid request: the rule, window, candle index and field that failed.',
            401: 'API key missing.', 403: 'API key wrong.',
            413: 'Body larger than the route\'s limit (predict_body_bytes / batch_body_bytes).',
            503: 'Cannot answer now: rule starting (the model is loading), failed (it did not load) or '
                 'overloaded; Retry-After when retrying can help.'}
  return {s: {'model': schemas.ErrorResponse, 'description': errors[s]} for s in statuses}


public = APIRouter(default_response_class=NatronJSON)
models = APIRouter(default_response_class=NatronJSON, dependencies=[Depends(require_key)],
                   responses=_documented(401, 403, 503))
sockets = APIRouter()


@public.get('/health', response_model=schemas.HealthResponse, response_class=NatronJSON,
            response_model_exclude_none=True,
            responses={503: {'model': schemas.HealthResponse, 'description': 'Not serving: starting (with '
                             'Retry-After) or failed (with the reason).'}})
async def health(request: Request, response: Response) -> dict:
  service = request.app.state.service
  body = service.health() if service is not None else request.app.state.startup.health()
  if body.get('status') != 'ok':
    response.status_code = 503
    if body.get('status') == 'starting':
      response.headers['Retry-After'] = str(STARTING_RETRY_AFTER_S)
  return body


@models.get('/model_info', response_model=schemas.ModelInfoResponse, response_class=NatronJSON)
async def model_info(service: Service = Depends(get_service)) -> dict:
  return service.info()


@models.post('/predict', response_model=schemas.PredictResponse, response_class=NatronJSON,
             openapi_extra=schemas.openapi_body(schemas.PredictRequest), responses=_documented(413, 422))
async def predict(request: Request, service: Service = Depends(get_service)) -> dict:
  start = time.perf_counter()
  body = schemas.body_object(await service.decode(await _read_body(request)), ('candles',))
  if 'candles' not in body:
    raise InvalidRequest("Body needs 'candles': a list of candle objects.", rule='fields', field='candles')
  record = await service.predict_one(body['candles'])
  record['processing_time_ms'] = elapsed_ms(start)
  return record


@models.post('/batch_predict', response_model=schemas.BatchPredictResponse, response_class=NatronJSON,
             openapi_extra=schemas.openapi_body(schemas.BatchPredictRequest), responses=_documented(413, 422))
async def batch_predict(request: Request, service: Service = Depends(get_service)) -> dict:
  start = time.perf_counter()
  reply = await service.batch(await service.decode(await _read_body(request)))
  reply['count'] = len(reply['predictions'])
  reply['processing_time_ms'] = elapsed_ms(start)
  return reply


@sockets.websocket('/ws')
@sockets.websocket('/')   # the seed's ws://localhost:8765 (path '/')
async def websocket_endpoint(websocket: WebSocket, _: None = Depends(require_ws_key)) -> None:
  slots: ConnectionSlots = websocket.app.state.ws_slots
  if not slots.acquire():
    # Accepted, then closed with 1013 "try again later" and the reason: uvicorn's denial response (HTTP 503 on
    # the handshake) works for the client but logs an error on every refusal, which a flood would multiply.
    logging.warning('natron serve: WebSocket refused: %d connections open (max_connections)', slots.limit)
    await websocket.accept()
    await websocket.close(code=1013, reason=f'max_connections ({slots.limit}) reached; retry in '
                                            f'{CONNECTIONS_RETRY_AFTER_S} s')
    return
  try:   # every way out releases the slot: close, reset, a failed send, cancellation at shutdown
    await websocket.accept()
    session = WsSession(functools.partial(_service_of, websocket), websocket.app.state.settings)
    while True:
      message = await websocket.receive()
      if message['type'] == 'websocket.disconnect':
        return
      raw = message.get('text')
      raw = raw if raw is not None else message.get('bytes', b'')
      reply = await session.handle(raw)
      await websocket.send_text(schemas.encode_json(reply).decode())
  except (WebSocketDisconnect, OSError):   # the client went away mid-reply
    return
  finally:
    slots.release()


# ---------------------------------------------------------------------------------------------------------
# The app.


async def _invalid(request, exc: InvalidRequest):
  del request
  return NatronJSON(exc.to_dict(), status_code=422)


async def _http_error(request, exc: HttpError):
  del request
  headers = dict(exc.headers, **({'WWW-Authenticate': 'Bearer'} if exc.status == 401 else {}))
  return NatronJSON({'detail': str(exc), 'rule': exc.rule}, status_code=exc.status, headers=headers)


async def _request_validation(request, exc: RequestValidationError):
  del request
  first = exc.errors()[0] if exc.errors() else {}
  where = '.'.join(str(p) for p in first.get('loc', ()))
  return NatronJSON({'detail': f'{where}: {first.get("msg", "invalid request")}', 'rule': 'request'},
                    status_code=422)


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
  app.state.startup.begin(app)
  yield
  if app.state.service is not None:
    app.state.service.batcher.close()


def _openapi(app: FastAPI) -> dict:
  if app.openapi_schema is None:
    spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = spec.setdefault('components', {}).setdefault('schemas', {})
    components.update(schemas.component_schemas(schemas.PredictRequest, schemas.BatchPredictRequest))
    app.openapi_schema = spec
  return app.openapi_schema


def _is_loader(obj) -> bool:
  return callable(obj) and not hasattr(obj, 'required_candles')


def create_app(predictor, serve_config: Optional[Mapping[str, Any]] = None) -> FastAPI:
  """The FastAPI app serving `predictor` with the limits and key of `serve_config` (ServeSettings).

  predictor: a ready Predictor, or a zero-argument loader returning one, run in a thread once the server
  starts (module docstring, Start-up).
  """
  settings = ServeSettings.from_config(serve_config)
  loader = predictor if _is_loader(predictor) else None
  # With an API key, the schema and docs pages are not served either (they would be unauthenticated routes).
  public_docs = not settings.api_key
  app = FastAPI(title='Natron', version='loading' if loader else predictor.model_version, lifespan=_lifespan,
                description='Multi-task market model: buy/sell probabilities, direction, regime.',
                docs_url='/docs' if public_docs else None, redoc_url='/redoc' if public_docs else None,
                openapi_url='/openapi.json' if public_docs else None,
                exception_handlers={InvalidRequest: _invalid, HttpError: _http_error,
                                    RequestValidationError: _request_validation})
  app.state.settings = settings
  app.state.body_limits = settings.body_limits()
  app.state.ws_slots = ConnectionSlots(settings.max_connections)
  app.state.startup = Startup(loader)
  app.state.service = None if loader else Service(predictor, settings)
  app.add_middleware(Guard, settings=settings)
  for router in (public, models, sockets):
    app.include_router(router)
  app.openapi = functools.partial(_openapi, app)
  return app


# ---------------------------------------------------------------------------------------------------------
# Phase entry point: python launch.py --config=configs/serve.py --workdir=DIR


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


def make_server(app: FastAPI, *, host: str = '127.0.0.1', log_level: str = 'warning',
                access_log: bool = False):
  import uvicorn   # pylint: disable=g-import-not-at-top
  settings = getattr(getattr(app, 'state', None), 'settings', None)
  # A WebSocket message carries at most one request: the same bound as a /predict body.
  ws_max = settings.body_limits()['/predict'] if settings is not None else 16 << 20
  config = uvicorn.Config(app, host=host, log_level=log_level, access_log=access_log, ws_max_size=ws_max,
                          ws_per_message_deflate=False, timeout_graceful_shutdown=5)
  # After uvicorn.Config, which (re)configures these loggers.
  for name in ('uvicorn', 'uvicorn.error', 'uvicorn.access'):
    if _REDACT not in logging_std.getLogger(name).filters:
      logging_std.getLogger(name).addFilter(_REDACT)
  return uvicorn.Server(config)


def serve(app: FastAPI, listening: list[socket.socket], *, failed_exit_s: float = 10.0, **server_options) -> Startup:
  """Serves `app` on the bound sockets until interrupted (make_server's options). When its loader fails, the
  server keeps answering /health 'failed' for failed_exit_s seconds, stops, and the loader's error is raised."""
  server = make_server(app, **server_options)
  startup: Startup = app.state.startup

  def stop_later():
    timer = threading.Timer(max(float(failed_exit_s), 0.0), lambda: setattr(server, 'should_exit', True))
    timer.daemon = True
    timer.start()

  startup.on_failure = stop_later
  server.run(sockets=listening)
  if startup.status == 'failed':
    raise startup.error
  return startup


def compilation_cache_dir(setting: str, workdir: str) -> str:
  """'auto' -> workdir/serve/jax_cache; '' -> none; else the path given."""
  if setting == 'auto':
    return os.path.join(os.path.abspath(workdir), 'serve', 'jax_cache')
  return setting or ''


def run_phase(config, workdir: str) -> dict:
  """Binds, serves at once, and loads + compiles the bundle (config.bundle or workdir/finetune/bundle) in the
  background (module docstring, Start-up); serves until interrupted."""
  from natron.predictor import optional_threshold, resolve_bundle   # pylint: disable=g-import-not-at-top
  from natron.serve.engine import ServingPredictor   # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  # The key, the exposure check and the bundle's presence first: a refusal should not wait, nor bind.
  host = config.get('host', '127.0.0.1')
  settings = dict(config.to_dict() if hasattr(config, 'to_dict') else config)
  settings['api_key'] = resolve_api_key(config)
  check_exposure(host, settings['api_key'])
  bundle = resolve_bundle(config.get('bundle') or workdir)
  cache = compilation_cache_dir(config.get('compilation_cache_dir', 'auto'), workdir)
  if cache:
    import jax   # pylint: disable=g-import-not-at-top
    # Restarts load the compiled buckets from disk instead of recompiling the feature graph (minutes on a
    # small CPU). Entries are keyed by the exact computation, so a changed model or code never hits.
    jax.config.update('jax_compilation_cache_dir', cache)
  loader = functools.partial(ServingPredictor.load, bundle, buckets=tuple(config.get('buckets', (1, 8, 32, 128))),
                             threshold=optional_threshold(config.get('threshold', -1.0)),
                             exported=config.get('exported', ''))
  app = create_app(loader, settings)
  listening = [bind(host, int(config.port))]
  ws_port = int(config.get('ws_port', 0) or 0)
  if ws_port and ws_port != int(config.port):
    listening.append(bind(host, ws_port))
  where = f'http://{host}:{int(config.port)}' + (f' and ws://{host}:{ws_port}/' if len(listening) > 1 else '')
  print(f'natron serve: listening on {where}; loading the model (/health: 503 "starting" until ready)', flush=True)

  ready_after = {}

  def ready(predictor):
    ready_after['s'] = time.perf_counter() - start
    logging.info('natron serve: model %s, required_candles %d, compiled buckets %s in %.1f s; ready %.1f s after '
                 'start on %s', predictor.model_version, predictor.required_candles, predictor.buckets,
                 predictor.compile_seconds, time.perf_counter() - start, where)
    print(f'natron serve: ready on {where}', flush=True)

  app.state.startup.on_ready = ready
  startup = serve(app, listening, failed_exit_s=float(config.get('failed_exit_s', 10.0)), host=host,
                  log_level=config.get('log_level', 'warning'), access_log=bool(config.get('access_log', False)))
  predictor = startup.predictor
  return {'startup_s': round(ready_after['s'], 2) if ready_after else None,
          'compile_s': None if predictor is None else round(predictor.compile_seconds, 2),
          'model_version': None if predictor is None else predictor.model_version}
