"""WebSocket sessions: one connection's subscribed symbols and their histories (`WsSession`), the connection
limit (`ConnectionSlots`) and the memory bound of a session (`session_bytes_bound`).

See natron/serve/app.py's module docstring (WebSocket) for the whole picture.
"""
from __future__ import annotations

import dataclasses
import sys
import threading
import time
from typing import Any, Callable, Optional, Union

from absl import logging
import numpy as np

from natron.serve import schemas
from natron.serve.guard import HttpError
from natron.serve.guard import ServeSettings
from natron.serve.schemas import InvalidRequest
from natron.serve.service import Service, check_grid, elapsed_ms

_NS = 10**9


class ConnectionSlots:
  """Counts open WebSocket connections against `limit` (one count per app, shared by its sockets)."""

  def __init__(self, limit: int):
    self.limit = int(limit)
    self.open = 0
    self.peak = 0
    self.refused = 0
    self._lock = threading.Lock()    # one app may be served from several event loops (threads)

  def acquire(self) -> bool:
    with self._lock:
      if self.open >= self.limit:
        self.refused += 1
        return False
      self.open += 1
      self.peak = max(self.peak, self.open)
      return True

  def release(self) -> None:
    with self._lock:
      self.open -= 1


# Memory of one session: each symbol holds exactly required_candles bars (int64 time + float64 OHLCV, 48
# bytes a bar, in arrays that own their memory), plus Python objects: the symbol (<= 64 characters), a
# _History, two array headers and a dict slot (measured ~0.5 KB; 1 KB allowed), and the session itself.
BYTES_PER_BAR = 8 + 5 * 8
SYMBOL_OVERHEAD = 1024
SESSION_OVERHEAD = 8192


def session_bytes_bound(max_symbols: int, required_candles: int) -> int:
  """Upper bound of the memory one WebSocket session holds (WsSession.nbytes) with max_symbols subscribed."""
  return max_symbols * (required_candles * BYTES_PER_BAR + SYMBOL_OVERHEAD) + SESSION_OVERHEAD


def infer_timeframe(time_ns: np.ndarray) -> Optional[int]:
  """The bar timeframe (ns) of strictly increasing times: the most common difference between neighbours;
  None when it is not clear (no difference occurs twice, or two tie for most common)."""
  values, counts = np.unique(np.diff(np.asarray(time_ns, np.int64)), return_counts=True)
  if not len(counts):
    return None
  order = np.argsort(counts, kind='stable')[::-1]
  if counts[order[0]] < 2 or (len(order) > 1 and counts[order[1]] == counts[order[0]]):
    return None
  return int(values[order[0]])


def _seconds(ns: int) -> Union[int, float]:
  return ns // _NS if ns % _NS == 0 else ns / _NS


def _span(ns: int) -> str:
  s = ns / _NS
  if s >= 86400:
    return f'{s / 86400:g} days'
  return f'{s / 3600:g} h' if s >= 3600 else f'{s:g} s'


@dataclasses.dataclass
class _History:
  time: np.ndarray    # int64 [R] ns
  ohlcv: np.ndarray   # float64 [R, 5] (prices exact: converted to points by the Predictor)
  timeframe: int      # ns between bars, inferred at subscribe (infer_timeframe)


class BarRejected(InvalidRequest):
  """A `bar` whose time does not follow the last bar by a whole number of timeframes within max_gap_hours;
  the reply says which time was expected."""

  def __init__(self, message: str, *, rule: str, expected_ns: int, timeframe_ns: int):
    super().__init__(message, rule=rule, field='time')
    self.extra = {'expected_time': schemas.iso_time(expected_ns), 'expected_timestamp': expected_ns // _NS,
                  'timeframe_s': _seconds(timeframe_ns)}

  def to_dict(self) -> dict:
    return {**super().to_dict(), **self.extra}


class WsSession:
  """One connection's state: subscribed symbols, each with the last required_candles bars and its timeframe.

  Commands (JSON objects; any message may carry an "id", echoed in the reply):
    {"command": "ping"}                                   -> {"type": "pong", ...}
    {"command": "model_info"}                             -> {"type": "model_info", ...}
    {"command": "predict", "candles": [...]}              -> the /predict reply + "type": "prediction"
    {"command": "subscribe", "symbol": S, "candles": [history >= required_candles]}
                                                          -> the prediction for the last history bar, with
                                                             "timeframe_s" (inferred from the history)
    {"command": "bar", "symbol": S, "candle": {...}}      -> the prediction for that bar ("gap_bars": k when
                                                             k bar times were skipped: a closed market)
    {"command": "unsubscribe", "symbol": S}               -> {"type": "unsubscribed", ...}
  Bar times: the timeframe is the history's most common spacing (subscribe refuses a history without a clear
  one, rule 'timeframe'). A bar must come exactly one timeframe after the previous one, or a whole number of
  timeframes later when the market was closed, at most `max_gap_hours` after it (then the reply states
  "gap_bars"). Otherwise it is refused: earlier or the same time 'time_order'; off the timeframe's grid
  'timeframe'; a longer gap 'stale' (re-subscribe with fresh history), each naming the expected time.
  Errors: {"type": "error", "command": ..., "detail": ..., "rule": ..., [index, field, retry_after, ...]}; the
  connection stays open and its state is unchanged by the failed command: a refused request, an overloaded
  or starting server ('overloaded' / 'starting' with "retry_after" seconds) and a failing model call alike.
  """
  COMMANDS = ('ping', 'model_info', 'predict', 'subscribe', 'bar', 'unsubscribe')

  def __init__(self, service: Union[Service, Callable[[], Service]], settings: ServeSettings = ServeSettings()):
    # A callable (app.py) is asked for the Service at every command: it raises HttpError 'starting' until
    # the model is loaded, so a connection opened during start-up works once it is.
    self._service = service if callable(service) else (lambda: service)
    self.settings = settings
    self.histories: dict[str, _History] = {}

  @property
  def service(self) -> Service:
    return self._service()

  def nbytes(self) -> int:
    """Memory this session holds: its arrays plus the Python objects around them (session_bytes_bound)."""
    total = sys.getsizeof(self) + sys.getsizeof(self.__dict__) + sys.getsizeof(self.histories)
    for symbol, h in self.histories.items():
      total += (sys.getsizeof(symbol) + sys.getsizeof(h) + sys.getsizeof(h.__dict__) + sys.getsizeof(h.time) +
                sys.getsizeof(h.ohlcv) + sys.getsizeof(h.timeframe))
    return total

  async def _decode(self, raw) -> Any:
    try:
      service = self.service
    except HttpError:      # starting: a ping is still answered (messages are bounded by ws_max_size)
      return schemas.decode_json(raw)
    return await service.decode(raw)

  async def handle(self, raw) -> dict:
    start = time.perf_counter()
    command, request_id = None, None
    try:
      msg = await self._decode(raw)
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
        reply['processing_time_ms'] = elapsed_ms(start)
    except InvalidRequest as e:
      reply = {'type': 'error', 'command': command if command in self.COMMANDS else None, **e.to_dict()}
    except HttpError as e:   # 503 starting / failed / overloaded: the REST status's rule and Retry-After
      reply = {'type': 'error', 'command': command if command in self.COMMANDS else None, 'detail': str(e),
               'rule': e.rule}
      if 'Retry-After' in e.headers:
        reply['retry_after'] = float(e.headers['Retry-After'])
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
    service = self.service
    if symbol not in self.histories and len(self.histories) >= service.settings.max_symbols:
      raise InvalidRequest(f'At most {service.settings.max_symbols} symbols per connection.',
                           rule='too_many_symbols')
    parsed = service.candles(msg.get('candles'))
    timeframe = infer_timeframe(parsed.time)
    if timeframe is None:
      raise InvalidRequest('Cannot infer the bar timeframe of this history: the most common time difference '
                           'between consecutive candles must occur at least twice and be the only most common '
                           'one. Send consecutive bars of one timeframe.', rule='timeframe', field='candles')
    r = service.predictor.required_candles
    # Copies that own their memory: views would keep the whole decoded request alive (session_bytes_bound).
    history = _History(parsed.time[-r:].copy(), parsed.ohlcv[-r:].copy(), timeframe)
    record = await self._predict_history(history)
    self.histories[symbol] = history
    return {'type': 'prediction', 'symbol': symbol, 'subscribed': True, 'timeframe_s': _seconds(timeframe),
            **record}

  def _check_bar_time(self, symbol: str, history: _History, bar_ns: int) -> int:
    """The number of bar times skipped before `bar_ns` (0: the very next bar); raises when it cannot follow."""
    last, timeframe = int(history.time[-1]), history.timeframe
    step = bar_ns - last
    if step <= 0:
      kind = 'duplicates' if step == 0 else 'is earlier than'
      raise BarRejected(f'candle.time {schemas.iso_time(bar_ns)} {kind} the last bar of {symbol} '
                        f'({schemas.iso_time(last)}); send each closed bar once, in order.', rule='time_order',
                        expected_ns=last + timeframe, timeframe_ns=timeframe)
    if step % timeframe:
      raise BarRejected(f'candle.time {schemas.iso_time(bar_ns)} is {_span(step)} after the last bar of {symbol} '
                        f'({schemas.iso_time(last)}): not a whole number of its {_span(timeframe)} timeframe; '
                        f'expected {schemas.iso_time(last + timeframe)} (or a later bar time after a closed '
                        'market). Is this bar from another symbol or timeframe?', rule='timeframe',
                        expected_ns=last + timeframe, timeframe_ns=timeframe)
    skipped = step // timeframe - 1
    max_gap = int(self.settings.max_gap_hours * 3600 * _NS)
    if skipped and step > max_gap:
      raise BarRejected(f'candle.time {schemas.iso_time(bar_ns)} is {_span(step)} after the last bar of {symbol} '
                        f'({schemas.iso_time(last)}), longer than a closed market (max_gap_hours '
                        f'{self.settings.max_gap_hours:g}): bars are missing. Expected '
                        f'{schemas.iso_time(last + timeframe)}; send "subscribe" with fresh history to resume.',
                        rule='stale', expected_ns=last + timeframe, timeframe_ns=timeframe)
    return int(skipped)

  async def _bar(self, msg):
    self._fields(msg, ('symbol', 'candle'))
    symbol = self._symbol(msg)
    history = self.histories.get(symbol)
    if history is None:
      raise InvalidRequest(f'Symbol {symbol!r} is not subscribed on this connection: send "subscribe" with '
                           'its history first.', rule='not_subscribed', field='symbol')
    bar = schemas.parse_candle(msg.get('candle'))
    skipped = self._check_bar_time(symbol, history, int(bar.time[0]))
    updated = _History(np.concatenate([history.time[1:], bar.time]),
                       np.concatenate([history.ohlcv[1:], bar.ohlcv]), history.timeframe)
    check_grid(updated.ohlcv, field='candle')
    record = await self._predict_history(updated)
    self.histories[symbol] = updated     # only after success: a failed bar leaves the history as it was
    reply = {'type': 'prediction', 'symbol': symbol, **record}
    if skipped:
      reply['gap_bars'] = skipped
    return reply

  async def _unsubscribe(self, msg):
    self._fields(msg, ('symbol',))
    symbol = self._symbol(msg)
    existed = self.histories.pop(symbol, None) is not None
    return {'type': 'unsubscribed', 'symbol': symbol, 'was_subscribed': existed}

  async def _predict_history(self, history: _History) -> dict:
    return (await self.service.predict_windows(history.ohlcv[None], history.time[-1:]))[0]
