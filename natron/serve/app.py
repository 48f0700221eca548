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

Modules: guard.py (settings, Guard, API key), batcher.py (MicroBatcher), service.py (Service: validation,
prediction, replies), ws.py (WsSession), app.py (routes, server, run_phase; re-exports the names tests import).
"""
from __future__ import annotations

import contextlib
import logging as logging_std
import os
import socket
import time
from typing import Any, Mapping, Optional

from absl import logging
from fastapi import Depends, FastAPI, Request, Security, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from natron.serve import schemas
from natron.serve.batcher import MicroBatcher
from natron.serve.guard import (API_KEY_ENV, BODY_OVERHEAD, BYTES_PER_CANDLE, Guard, HttpError, RedactSecrets,
                                ServeSettings, _REDACT, body_bytes_for, check_exposure, host_name, is_loopback,
                                redact, resolve_api_key)
from natron.serve.schemas import InvalidRequest
from natron.serve.service import Service, check_grid, elapsed_ms
from natron.serve.ws import WsSession


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
    headers = dict(exc.headers, **({'WWW-Authenticate': 'Bearer'} if exc.status == 401 else {}))
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
    body = schemas.body_object(await service.decode(await _read_body(request, body_limits['/predict'])),
                               ('candles',))
    if 'candles' not in body:
      raise InvalidRequest("Body needs 'candles': a list of candle objects.", rule='fields', field='candles')
    record = await service.predict_one(body['candles'])
    record['processing_time_ms'] = elapsed_ms(start)
    return _json(record)

  @app.post('/batch_predict', dependencies=[Depends(require_key)],
            openapi_extra=schemas.openapi_body(schemas.BatchPredictRequest),
            responses={200: {'model': schemas.BatchPredictResponse}, **_ERRORS})
  async def batch_predict(request: Request):
    start = time.perf_counter()
    raw = await _read_body(request, body_limits['/batch_predict'])
    reply = await service.batch(await service.decode(raw))
    reply['count'] = len(reply['predictions'])
    reply['processing_time_ms'] = elapsed_ms(start)
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
