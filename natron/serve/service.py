"""`Service`: validation + prediction + reply formatting shared by the REST routes and WebSocket sessions."""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import time
from typing import Any, Mapping, Optional

import numpy as np

from natron.data import grid
from natron.errors import UserError
from natron.serve import guard, schemas
from natron.serve.batcher import STALLED_S, MicroBatcher, overloaded
from natron.serve.guard import ServeSettings
from natron.serve.schemas import InvalidRequest


class Service:
  """Validation + prediction + reply formatting; the routes and WebSocket sessions are thin wrappers."""

  def __init__(self, predictor, settings: ServeSettings):
    if not predictor.buckets:
      raise UserError('The server needs a Predictor compiled with batch buckets (e.g. buckets=(1, 8, 32, 128)).')
    self.predictor = predictor
    self.settings = settings
    self.batcher = MicroBatcher(predictor, max_wait_s=settings.batch_wait_ms / 1000.0,
                                timeout_s=settings.request_timeout_ms / 1000.0, max_queue=settings.max_queue)
    # One thread decodes large bodies and parses requests, one at a time (see _off_loop).
    self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix='natron-parse')
    self._largest = guard.JsonAllowance(settings.batch_candles(), max(settings.max_batch, 1))
    self.started = time.time()
    if settings.max_candles < predictor.required_candles:
      raise UserError(f'serve config: max_candles {settings.max_candles} is below the model\'s '
                      f'required_candles {predictor.required_candles}: no request could succeed.')

  async def decode(self, raw, allowance: Optional[guard.JsonAllowance] = None) -> Any:
    """A request body or WebSocket message -> JSON value (InvalidRequest when it is not valid JSON, or holds far
    more JSON values than `allowance` (default: the route's, set by Guard) allows: checked before decoding).
    Bodies over DECODE_INLINE_BYTES are counted and decoded on the decode thread, not the event loop."""
    allowance = allowance or guard.JSON_ALLOWANCE.get() or self._largest
    if len(raw) <= DECODE_INLINE_BYTES:
      guard.check_json_size(raw, allowance)
      return schemas.decode_json(raw)
    return await self._off_loop(_checked_decode, raw, allowance, stage_done=False)

  def candles(self, items, *, window: Optional[int] = None, max_count: Optional[int] = None):
    parsed = schemas.parse_candles(items, min_count=self.predictor.required_candles,
                                   max_count=max_count or self.settings.max_candles, window=window)
    check_grid(parsed.ohlcv, window=window)
    return parsed

  def deadline(self, *, batch: bool = False) -> float:
    """time.monotonic() by which this request must be answered (else 503 + Retry-After): its arrival (when
    Guard saw it; now for WebSocket messages) + request_timeout_ms (batch_timeout_ms for /batch_predict).
    A request already past it is refused here, before it is parsed."""
    timeout_ms = self.settings.batch_timeout_ms if batch else self.settings.request_timeout_ms
    ticket = guard.REQUEST.get()
    deadline = (ticket.arrival if ticket is not None else time.monotonic()) + timeout_ms / 1000.0
    if time.monotonic() > deadline:
      self.batcher.refused += 1
      raise overloaded('This request waited past its deadline before it could be parsed; retry shortly.',
                       self.batcher.expected_wait_s())
    return deadline

  async def predict_windows(self, ohlcv: np.ndarray, times: np.ndarray, *,
                            deadline: Optional[float] = None) -> list[dict]:
    """[B, N >= R, 5] windows -> one record per window; submitted in bucket-sized jobs so a large batch
    does not hold the model while other clients' single requests wait. All by `deadline` (default: now +
    request_timeout_ms), else HttpError 503."""
    deadline = self.deadline() if deadline is None else deadline
    _cpu_stage_done()
    r = self.predictor.required_candles
    step = self.predictor.buckets[-1]
    records = []
    for start in range(0, len(ohlcv), step):
      chunk = np.ascontiguousarray(ohlcv[start:start + step, -r:], dtype=np.float64)
      pred = await self.batcher.predict(chunk, times[start:start + step], deadline=deadline)
      records.extend(self._records(pred, start))
    return records

  async def predict_series(self, ohlcv: np.ndarray, times: np.ndarray, *,
                           deadline: Optional[float] = None) -> list[dict]:
    """One series [N >= R, 5] -> a record per bar from R - 1 on (the /predict answer for each), computed
    with the predictor's compiled series chunks, one chunk per job so other requests interleave."""
    deadline = self.deadline(batch=True) if deadline is None else deadline
    predictor = self.predictor
    if predictor.series_chunk <= 0:   # no chunk executable: every window through the window path
      windows = np.lib.stride_tricks.sliding_window_view(ohlcv, (predictor.required_candles, 5))[:, 0]
      return await self.predict_windows(windows, times[predictor.required_candles - 1:], deadline=deadline)
    r, c = predictor.required_candles, predictor.series_chunk
    _cpu_stage_done()
    records = []
    for start in range(0, len(ohlcv) - r + 1, c):
      part = ohlcv[start:start + r + c - 1]
      pred = await self.batcher.run(predictor.predict_recent, part, times[start:start + r + c - 1],
                                    deadline=deadline)
      records.extend(self._records(pred, start))
    return records

  def _records(self, pred: dict, offset: int) -> list[dict]:
    if not pred['valid'].all():
      bad = offset + int(np.argmin(pred['valid']))
      raise InvalidRequest(f'window {bad}: the features or the model output are not finite for these '
                           'candles (extreme or degenerate values)', rule='not_finite', window=bad)
    return self.predictor.records(pred)

  async def predict_one(self, items) -> dict:
    deadline = self.deadline()
    parsed = await self._off_loop(self.candles, items)
    del items
    return (await self.predict_windows(parsed.ohlcv[None], parsed.time[-1:], deadline=deadline))[0]

  async def batch(self, body: Mapping[str, Any]) -> dict:
    deadline = self.deadline(batch=True)
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
      total = sum(len(w) if isinstance(w, list) else 0 for w in windows)
      if total > self.settings.max_batch_candles:
        raise InvalidRequest(f'{total} candles in all windows is more than the limit of '
                             f'{self.settings.max_batch_candles} per request (send only the last required_candles '
                             'of each window, or split the request).', rule='too_many_candles')
      ohlcv, times = await self._off_loop(self._parse_windows, windows)
      del body, windows   # the decoded JSON is no longer needed while the model works
      return {'mode': 'windows', 'predictions': await self.predict_windows(ohlcv, times, deadline=deadline)}
    series = await self._off_loop(functools.partial(self.candles, max_count=self.settings.max_series),
                                  body['candles'])
    del body
    return {'mode': 'series', 'predictions': await self.predict_series(series.ohlcv, series.time,
                                                                       deadline=deadline)}

  def _parse_windows(self, windows: list) -> tuple[np.ndarray, np.ndarray]:
    r = self.predictor.required_candles
    parsed = [self.candles(w, window=i) for i, w in enumerate(windows)]
    return (np.stack([p.ohlcv[-r:] for p in parsed]), np.array([p.time[-1] for p in parsed], np.int64))

  async def _off_loop(self, function, *args, stage_done: bool = True):
    """function(*args) on the parse thread. Parsing 1,000 candles takes tens of ms and a batch seconds; in a
    thread the event loop still gets the GIL every switch interval (5 ms), so /health, reading other bodies
    and answering are not held up. One request's CPU stage at a time, in arrival order (guard.LoopBacklog);
    what the queued stages hold in memory is bounded by that admission."""
    ticket = guard.REQUEST.get()
    seconds = []

    def timed():
      start = time.perf_counter()
      try:
        return function(*args)
      finally:
        seconds.append(time.perf_counter() - start)

    try:
      return await asyncio.get_running_loop().run_in_executor(self._worker, timed)
    finally:
      if ticket is not None and stage_done:   # its CPU stage is done: what it cost is the backlog's sample
        ticket.parsed(seconds[0] if seconds else None)

  def info(self) -> dict:
    s = self.settings
    return dict(self.predictor.info(), limits={
        'max_candles': s.max_candles, 'max_batch': s.max_batch, 'max_series': s.max_series,
        'max_symbols': s.max_symbols, 'batch_wait_ms': s.batch_wait_ms}, auth=bool(s.api_key))

  def health(self) -> dict:
    """{'status': 'ok', ...} or {'status': 'failed', 'reason': ..., ...} when the model worker has stopped or
    one model call has run for more than batcher.STALLED_S (queue and counters: `batcher.state()`)."""
    state = self.batcher.state()
    reply = {'status': 'ok', 'model_version': self.predictor.model_version,
             'uptime_s': round(time.time() - self.started, 3)}
    if not state['alive']:
      reply.update(status='failed', reason=f'model worker stopped: {state["failure"] or "thread gone"}; every '
                                           'prediction is refused (503) until the server is restarted')
    elif state['busy_s'] > STALLED_S:
      reply.update(status='failed', reason=f'one model call has been running for {state["busy_s"]:.0f} s')
    return reply

DECODE_INLINE_BYTES = 2 << 20   # smaller bodies and messages (all /predict ones) are decoded on the event loop
                                # (a few ms); larger ones on the parse thread


def _cpu_stage_done() -> None:
  """This request has parsed and validated (it waits for the model now): it leaves the loop's backlog."""
  ticket = guard.REQUEST.get()
  if ticket is not None:
    ticket.parsed()


def _checked_decode(raw, allowance: guard.JsonAllowance) -> Any:
  guard.check_json_size(raw, allowance)
  return schemas.decode_json(raw)


def elapsed_ms(start: float) -> float:
  return round((time.perf_counter() - start) * 1000.0, 3)


def check_grid(ohlcv: np.ndarray, *, window: Optional[int] = None, field: Optional[str] = None) -> None:
  """Features run on prices in points (natron.data.grid): one window's prices must lie on one quote grid."""
  try:
    grid.infer_point(ohlcv[:, :4])
  except grid.GridError as e:
    raise InvalidRequest(str(e), rule='quote_grid', window=window, field=field) from None
