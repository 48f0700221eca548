"""Request parsing and validation for the serving API, plus the pydantic models that document it.

Two layers, on purpose:
- Parsing is columnar and vectorised: the body is decoded with orjson, the six candle fields are pulled out
  column by column and checked with numpy. Validating 1,100 candles as per-candle pydantic objects costs
  ~7.5 ms p50 / ~40 ms p99 on this CPU (MEASUREMENTS.md), more than the model; the columnar path costs well
  under a millisecond.
- The pydantic models below are only used to publish the OpenAPI schema (/docs, the fuzz test). They state
  the same rules, so the documentation and the validator agree.

Every rejection is an `InvalidRequest` (a `UserError`) carrying the rule broken, the window and candle index
and the field, which the app turns into HTTP 422 (or a WebSocket error message). Nothing is repaired:
unsorted, duplicated or inconsistent candles are refused, never silently fixed.

Time convention (the server, the MT5 EA and every client): times are UTC.
  - Request `time`: unix seconds (UTC by definition; the EA converts its broker server time to UTC before
    sending, mt5/README.md), or text: ISO 8601 / `YYYY-MM-DD HH:MM:SS` / MetaTrader's `YYYY.MM.DD HH:MM:SS`,
    with an explicit offset (`Z`, `+02:00`: converted to UTC) or without one (then read AS UTC; a client
    holding broker server time must convert it or send the offset). natron.data.times.parse_times is the
    parser, the same one ingestion uses.
  - Responses: `time` is ISO 8601 with a `Z`, `timestamp` unix seconds, both UTC: the open time of the last
    candle sent, so a client compares it with what it sent (the EA: converted back to server time).
  The model itself sees no clock (prices and volumes only), so candles older than a client's last DST change
  that it converted with today's offset change no prediction; only the order and the last time matter.

Rules: the candle rules are natron.data.rules.candle_violations (the one definition ingestion and features
use too); the `rule` ids are its ids. Checks, in order:
  fields            every candle is an object with exactly time, open, high, low, close, volume
  type              prices and volume are JSON numbers (not strings, booleans or null)
  time              unix seconds (a number) or a time string (above); one kind per request
  not_finite        every value is finite
  price_positive    open, high, low, close > 0
  high_low          high >= max(open, close) and low <= min(open, close)
  volume_negative   volume >= 0
  off_grid          prices on the quote grid (only when the caller passes a point)
  time_order        times strictly increase (a duplicate or a step back names the candle)
  too_few_candles   at least `required_candles` (window + feature warm-up) candles per window
  too_many_candles  at most `max_candles` per window (`max_series` for one long series)
  too_many_windows  at most `max_batch` windows per /batch_predict request
The first offending candle (lowest index) is reported; at one candle, the rule listed first.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import re
import operator
import reprlib
from typing import Any, Literal, Optional, Union

import numpy as np
import orjson
import pydantic
from pydantic import BaseModel, ConfigDict, Field

from natron.data import grid, rules, times
from natron.errors import UserError

CANDLE_FIELDS = ('time', 'open', 'high', 'low', 'close', 'volume')
PRICE_FIELDS = ('open', 'high', 'low', 'close', 'volume')
_ROW = operator.itemgetter(*CANDLE_FIELDS)
_NUMBER_TYPES = frozenset((int, float))
# Unix seconds after 2262-04-11 overflow datetime64[ns]; values that large are almost always milliseconds.
_MAX_UNIX_SECONDS = times.MAX_EPOCH_SECONDS
_TIME_FORMS = 'YYYY-MM-DD HH:MM:SS or YYYY.MM.DD HH:MM:SS, ISO 8601 with an optional offset (Z, +02:00)'


# Values a client sent are echoed in error messages at most this long (then '…'), and a whole message at
# most MAX_DETAIL characters: a 20 MB string or a 1,000-level nested list in a field costs a short reply.
ECHO_CHARS = 100
MAX_DETAIL = 1000
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, ECHO_CHARS, ECHO_CHARS
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6


def clip(text: str, limit: int = ECHO_CHARS) -> str:
  """text cut to `limit` characters, the cut marked with '…'."""
  return text if len(text) <= limit else text[:limit - 1] + '…'


def show(value: Any) -> str:
  """A client-sent value for an error message: repr, bounded in depth and length (never recursion-deep)."""
  if isinstance(value, str):
    return clip(repr(value[:ECHO_CHARS + 1]))
  try:
    return clip(_REPR.repr(value))
  except (RecursionError, ValueError):   # pragma: no cover - reprlib bounds the depth already
    return f'<{type(value).__name__}>'


def show_keys(keys) -> str:
  """A list of client-sent names (unexpected fields) for an error message: at most 10 names, each clipped."""
  keys = list(keys)
  names = [clip(str(k), 40) for k in keys[:10]]
  return clip(repr(names) + (f' and {len(keys) - 10} more' if len(keys) > 10 else ''), 4 * ECHO_CHARS)


class InvalidRequest(UserError):
  """A request the server refuses (HTTP 422): `rule` names the check, `index`/`window`/`field` the place."""

  def __init__(self, message: str, *, rule: str, index: Optional[int] = None, window: Optional[int] = None,
               field: Optional[str] = None):
    super().__init__(clip(message, MAX_DETAIL))
    self.rule = rule
    self.index = index
    self.window = window
    self.field = field

  def to_dict(self) -> dict:
    out = {'detail': str(self), 'rule': self.rule}
    for key in ('window', 'index', 'field'):
      value = getattr(self, key)
      if value is not None:
        out[key] = value
    return out


@dataclasses.dataclass(frozen=True)
class Candles:
  """One validated window or series: time int64 [N] (ns since the epoch, UTC), ohlcv float64 [N, 5] (prices
  exactly as sent: the Predictor converts them to points on the quote grid, natron.data.grid)."""
  time: np.ndarray
  ohlcv: np.ndarray

  def __len__(self) -> int:
    return int(self.time.shape[0])


def decode_json(body: bytes) -> Any:
  """orjson.loads with the failure turned into an InvalidRequest (rule 'json')."""
  try:
    return orjson.loads(body)
  except orjson.JSONDecodeError as e:
    raise InvalidRequest(f'Body is not valid JSON: {clip(str(e), 200)}', rule='json') from None


def _positional(x: float):
  """A finite float as a JSON number without an exponent (orjson writes 1e-6 for 0.000001; MQL5's
  StringToDouble and many hand-written clients read only plain decimals); NaN/inf unchanged (-> null)."""
  text = repr(x)
  if 'e' not in text or x != x or x in (math.inf, -math.inf):
    return x
  return orjson.Fragment(np.format_float_positional(x, trim='0'))   # shortest digits: the same double


def _plain_floats(obj):
  if isinstance(obj, float):
    return _positional(obj)
  if isinstance(obj, dict):
    return {k: _plain_floats(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_plain_floats(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return _plain_floats(obj.tolist())
  if isinstance(obj, np.floating):
    return _positional(float(obj))
  return obj


def encode_json(payload: Any) -> bytes:
  """The server's one JSON encoder (REST and WebSocket replies): orjson, with every float written as a plain
  decimal (never 1e-06): the EA reads probabilities with StringToDouble and range-checks them."""
  # Fast path (~1 us instead of ~60 us per prediction record): plain orjson, kept when nothing in the output
  # looks like an exponent. Numpy values raise TypeError here (orjson would write a float32 by its own
  # shortest digits) and take the slow path like everything that might carry an exponent.
  try:
    out = orjson.dumps(payload)
  except TypeError:
    out = None
  if out is not None and not _EXPONENT.search(out):
    return out
  return orjson.dumps(_plain_floats(payload), option=orjson.OPT_SERIALIZE_NUMPY)


_EXPONENT = re.compile(rb'[0-9][eE][-+]?[0-9]')


def _where(window: Optional[int], index: Optional[int] = None, field: Optional[str] = None) -> str:
  out = f'windows[{window}].' if window is not None else ''
  out += 'candles' if index is None else f'candles[{index}]'
  return out + (f'.{field}' if field else '')


def _fail(message: str, rule: str, window, index=None, field=None):
  raise InvalidRequest(f'{_where(window, index, field)}: {message}', rule=rule, index=index, window=window,
                       field=field)


def _check_fields(items: list, window) -> list[tuple]:
  """[N] candle objects -> [N] tuples in CANDLE_FIELDS order; names the first malformed candle."""
  try:
    rows = list(map(_ROW, items))
    if set(map(len, items)) <= {len(CANDLE_FIELDS)}:   # C-level loops: this runs on every request
      return rows
  except (KeyError, TypeError):
    pass
  for i, c in enumerate(items):   # slow path, only to name the first bad candle
    if not isinstance(c, dict):
      _fail(f'expected an object with fields {list(CANDLE_FIELDS)}, got {type(c).__name__}', 'fields',
            window, i)
    missing = [k for k in CANDLE_FIELDS if k not in c]
    if missing:
      _fail(f'missing field(s) {missing}', 'fields', window, i)
    extra = sorted(k for k in c if k not in CANDLE_FIELDS)
    if extra:
      _fail(f'unexpected field(s) {show_keys(extra)}; allowed: {list(CANDLE_FIELDS)}', 'fields', window, i)
  raise AssertionError('unreachable: a malformed candle was detected but not located')


def _parse_numbers(columns: list[tuple], window) -> np.ndarray:
  """5 columns of JSON values -> float64 [N, 5]; only ints and floats (no bool, str, null)."""
  if not set(map(type, itertools.chain.from_iterable(columns))) <= _NUMBER_TYPES:
    for j, name in enumerate(PRICE_FIELDS):
      for i, value in enumerate(columns[j]):
        if type(value) not in _NUMBER_TYPES:
          _fail(f'must be a number, got {show(value)}', 'type', window, i, name)
  try:
    return np.array(columns, dtype=np.float64).T
  except OverflowError:
    for j, name in enumerate(PRICE_FIELDS):
      for i, value in enumerate(columns[j]):
        if abs(value) > 1e300:
          _fail(f'{show(value)} is out of range', 'not_finite', window, i, name)
    raise


def _parse_times(values: tuple, window) -> np.ndarray:
  """Unix seconds (numbers) or time strings -> int64 ns since the epoch, UTC (natron.data.times)."""
  kinds = set(map(type, values))
  if not (kinds <= _NUMBER_TYPES or kinds == {str}):
    for i, value in enumerate(values):
      if type(value) not in _NUMBER_TYPES and type(value) is not str:
        _fail(f'must be unix seconds or a time string ({_TIME_FORMS}), got {show(value)}', 'time', window, i,
              'time')
    first_number = next(i for i, v in enumerate(values) if type(v) in _NUMBER_TYPES)
    first_string = next(i for i, v in enumerate(values) if type(v) is str)
    _fail(f'mixes unix seconds (candle {first_number}) and strings (candle {first_string}); use one kind',
          'time', window, max(first_number, first_string), 'time')
  parsed = times.parse_times(np.array(values, dtype=np.float64) if kinds <= _NUMBER_TYPES and values
                             else np.array(values, dtype=object))
  if parsed.bad.any():
    i = int(np.argmax(parsed.bad))
    if type(values[i]) is str:
      _fail(f'{show(values[i])} is not a time ({_TIME_FORMS}, or unix seconds); text without an offset is read '
            'as UTC', 'time', window, i, 'time')
    _fail(f'{show(values[i])} is not unix seconds in [0, {_MAX_UNIX_SECONDS}] (milliseconds? send seconds)',
          'time', window, i, 'time')
  return parsed.ns


def validate_arrays(time_ns: np.ndarray, ohlcv: np.ndarray, *, window: Optional[int] = None,
                    point: Optional[float] = None) -> None:
  """The candle rules (natron.data.rules.candle_violations) on time int64 [N] (ns, UTC) and ohlcv float
  [N, 5]; raises InvalidRequest naming the first offending candle, its field and the rule id.

  `point`: also require prices on that quote grid (rule off_grid).
  """
  ohlcv = np.asarray(ohlcv)
  found = rules.first_violation(rules.candle_violations(time_ns, *ohlcv.T[:5], point=point))
  if found is None:
    return
  v, i = found
  o, h, l, c, vol = (ohlcv[i, j] for j in range(5))
  if v.rule == 'not_finite':
    _fail(f'{ohlcv[i, PRICE_FIELDS.index(v.field)]!r} is not finite', v.rule, window, i, v.field)
  if v.rule == 'price_positive':
    j = int(np.argmax(ohlcv[i, :4] <= 0))
    _fail(f'{PRICE_FIELDS[j]} must be > 0, got {ohlcv[i, j]!r}', v.rule, window, i, PRICE_FIELDS[j])
  if v.text == rules.HIGH:
    _fail(f'high {h!r} is below max(open, close) = {max(o, c)!r}', v.rule, window, i, 'high')
  if v.text == rules.LOW:
    _fail(f'low {l!r} is above min(open, close) = {min(o, c)!r}', v.rule, window, i, 'low')
  if v.rule == 'volume_negative':
    _fail(f'volume must be >= 0, got {vol!r}', v.rule, window, i, 'volume')
  if v.rule == 'off_grid':
    j = int(np.argmax(grid.off_grid(ohlcv[i, :4], point)))
    _fail(f'{PRICE_FIELDS[j]} {ohlcv[i, j]!r} is not a multiple of point={point:g} (the instrument\'s price '
          'increment)', v.rule, window, i, PRICE_FIELDS[j])
  if v.rule == 'time_order':
    kind = 'duplicates' if v.text == rules.TIME_REPEAT else 'is earlier than'
    _fail(f'time {iso_time(time_ns[i])} {kind} the previous candle\'s {iso_time(time_ns[i - 1])}; times must '
          'strictly increase', v.rule, window, i, 'time')
  _fail(f'breaks the rule {v.text!r}', v.rule, window, i, v.field)


iso_time = times.iso_utc   # int64 ns since the epoch -> '2024-01-02T15:00:00Z'


def parse_candles(items: Any, *, min_count: int, max_count: int, window: Optional[int] = None,
                  point: Optional[float] = None) -> Candles:
  """A JSON list of candle objects -> validated Candles. min/max_count bound its length; `point`, when
  given, is the quote grid the prices must lie on."""
  if not isinstance(items, list):
    _fail(f'expected a list of candle objects, got {type(items).__name__}', 'fields', window)
  n = len(items)
  if n > max_count:
    _fail(f'{n} candles is more than the limit of {max_count} per request', 'too_many_candles', window)
  if n < min_count:
    _fail(f'{n} candles is too few: the model needs at least {min_count} (its window plus the feature '
          'warm-up); send the most recent ones', 'too_few_candles', window)
  rows = _check_fields(items, window)
  columns = list(zip(*rows)) if rows else [()] * len(CANDLE_FIELDS)
  ohlcv = _parse_numbers(columns[1:], window)
  time_ns = _parse_times(columns[0], window)
  validate_arrays(time_ns, ohlcv, window=window, point=point)
  return Candles(time=time_ns, ohlcv=ohlcv)


def parse_candle(item: Any) -> Candles:
  """One candle object (a WebSocket 'bar') -> Candles of length 1; messages name it 'candle'."""
  try:
    return parse_candles([item], min_count=1, max_count=1)
  except InvalidRequest as e:
    raise InvalidRequest(str(e).replace('candles[0]', 'candle', 1), rule=e.rule, field=e.field) from None


def body_object(payload: Any, allowed: tuple[str, ...]) -> dict:
  """Checks the top level of a request body: an object with only `allowed` keys."""
  if not isinstance(payload, dict):
    raise InvalidRequest(f'Body must be a JSON object with {list(allowed)}, got {type(payload).__name__}',
                         rule='fields')
  extra = sorted(k for k in payload if k not in allowed)
  if extra:
    raise InvalidRequest(f'Unexpected top-level field(s) {show_keys(extra)}; allowed: {list(allowed)}', rule='fields')
  return payload


# ---------------------------------------------------------------------------------------------------------
# Pydantic models: documentation only (OpenAPI / docs / fuzzing); requests are parsed by the functions above.
# ---------------------------------------------------------------------------------------------------------

class Candle(BaseModel):
  """One OHLCV bar. `time` is UTC: unix seconds, or a time string (read as UTC when it has no offset)."""
  model_config = ConfigDict(extra='forbid')
  time: Union[float, str] = Field(description='Bar open time in UTC: unix seconds, or text such as '
                                              '"2024-01-02T15:00:00Z", "2024-01-02 17:00:00+02:00" (converted), '
                                              '"2024.01.02 15:00:00" or "2024-01-02 15:00:00" (no offset: UTC).')
  open: float = Field(gt=0)
  high: float = Field(gt=0, description='>= max(open, close)')
  low: float = Field(gt=0, description='<= min(open, close)')
  close: float = Field(gt=0)
  volume: float = Field(ge=0)


class PredictRequest(BaseModel):
  """The last `required_candles` (or more; the last ones are used) candles, oldest first."""
  model_config = ConfigDict(extra='forbid')
  candles: list[Candle] = Field(description='Oldest first, strictly increasing times; at least '
                                            'required_candles (GET /model_info), at most max_candles.')


class BatchPredictRequest(BaseModel):
  """Exactly one of `windows` (many independent windows) or `candles` (one long series -> one prediction
  per bar from bar required_candles - 1 on)."""
  model_config = ConfigDict(extra='forbid')
  windows: Optional[list[list[Candle]]] = Field(None, description='At most max_batch windows.')
  candles: Optional[list[Candle]] = Field(None, description='One series, at most max_series candles.')


class Prediction(BaseModel):
  """Every head's output for the window ending at `time` (the last candle's time)."""
  time: str = Field(description='ISO-8601 UTC time (with Z) of the last candle: the bar the prediction is for.')
  timestamp: int = Field(description='The same time in unix seconds, UTC (what the MT5 EA compares, after '
                                     'converting back to server time).')
  buy_prob: float
  sell_prob: float
  direction: Literal['UP', 'DOWN', 'NEUTRAL']
  direction_probs: dict[str, float]
  regime: str
  regime_confidence: float
  regime_probs: dict[str, float]
  signal: Literal['BUY', 'SELL', 'HOLD'] = Field(
      description='BUY iff buy_prob >= threshold and buy_prob > sell_prob; SELL mirrored; else HOLD.')
  confidence: float = Field(description='max(buy_prob, sell_prob): what the signal rule compares with the '
                                        'threshold.')
  threshold: float
  model_version: str


class PredictResponse(Prediction):
  processing_time_ms: float


class BatchPredictResponse(BaseModel):
  mode: Literal['windows', 'series']
  count: int
  predictions: list[Prediction]
  processing_time_ms: float


class ErrorResponse(BaseModel):
  detail: str
  rule: str = Field(description='Which check failed (see natron/serve/schemas.py).')
  window: Optional[int] = None
  index: Optional[int] = Field(None, description='Index of the offending candle.')
  field: Optional[str] = None


class HealthResponse(BaseModel):
  """GET /health: HTTP 200 only with status 'ok'; 503 otherwise (natron/serve/app.py, Start-up)."""
  model_config = ConfigDict(extra='allow')
  status: str = Field(description="'ok' (serving), 'starting' (the model is loading; Retry-After says when to "
                                  "ask again) or 'failed' (with the reason); 503 unless 'ok'.")
  model_version: Optional[str] = Field(None, description='Absent until the model is loaded.')
  uptime_s: float
  reason: Optional[str] = Field(None, description='Why the server is not serving (status failed).')


class ModelInfoResponse(BaseModel):
  model_config = ConfigDict(extra='allow')
  model_version: str
  required_candles: int
  window: int
  warmup: int
  num_features: int
  thresholds: dict[str, float]


def openapi_body(model: type[BaseModel]) -> dict:
  """`openapi_extra` declaring `model` as the JSON request body (the route reads the raw bytes itself)."""
  return {'requestBody': {'required': True, 'content': {'application/json': {
      'schema': {'$ref': f'#/components/schemas/{model.__name__}'}}}}}


def component_schemas(*models: type[BaseModel]) -> dict:
  """JSON schemas of `models` and everything they reference, keyed for #/components/schemas."""
  _, defs = pydantic.json_schema.models_json_schema(
      [(m, 'validation') for m in models], ref_template='#/components/schemas/{model}')
  return defs.get('$defs', {})
