"""`Service`: validation + prediction + reply formatting shared by the REST routes and WebSocket sessions."""
from __future__ import annotations

import secrets
import time
from typing import Any, Mapping, Optional

import numpy as np

from natron.data import grid
from natron.errors import UserError
from natron.serve import schemas
from natron.serve.batcher import MicroBatcher
from natron.serve.guard import ServeSettings
from natron.serve.schemas import InvalidRequest


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

  async def decode(self, raw: bytes) -> Any:
    """A request body or WebSocket message -> JSON value (InvalidRequest when it is not valid JSON)."""
    return schemas.decode_json(raw)

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


def elapsed_ms(start: float) -> float:
  return round((time.perf_counter() - start) * 1000.0, 3)


def check_grid(ohlcv: np.ndarray, *, window: Optional[int] = None, field: Optional[str] = None) -> None:
  """Features run on prices in points (natron.data.grid): one window's prices must lie on one quote grid."""
  try:
    grid.infer_point(ohlcv[:, :4])
  except grid.GridError as e:
    raise InvalidRequest(str(e), rule='quote_grid', window=window, field=field) from None
