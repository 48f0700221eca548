"""WebSocket sessions: one connection's subscribed symbols and their histories (`WsSession`)."""
from __future__ import annotations

import dataclasses
import time

from absl import logging
import numpy as np

from natron.serve import schemas
from natron.serve.schemas import InvalidRequest
from natron.serve.service import Service, check_grid, elapsed_ms


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
      msg = await self.service.decode(raw)
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
