"""A Python stand-in for mt5/NatronEA.mq5 that talks to the server exactly as the Expert Advisor does.

Same request (POST /predict, headers Content-Type + optional X-API-Key, body built by the same string
concatenation: time in unix seconds UTC (the bar's server time minus the server's UTC offset, the EA's
ServerUtcOffset()), prices with `digits` decimals as DoubleToString writes them, volume as
an integer), same cadence (one request when a new bar opens, for the bars closed before it, never retried
within a bar), the same string-search JSON extraction (JsonValueStart / JsonGetDouble / JsonGetString), and
the same refusals: no trade on a timeout or connection error, an HTTP status other than 200, an unreadable
reply, a reply whose `timestamp` (UTC) plus the offset is not the last closed bar's server time (stale), or a new bar having opened while
waiting. The decision rule is the EA's: BUY iff buy_prob >= threshold and buy_prob > sell_prob, SELL
mirrored, else HOLD.

Usage (tests/test_serve.py): feed it bars with `on_tick(bars)`, where `bars` holds every bar up to and
including the one forming now (like the terminal's history); it returns a Decision when a bar has closed.

The EA's trading rules, shared by its HTTP and ONNX engines, are mirrored below as pure functions with the
MQL5 function each copies (tests pin them, since MQL5 cannot be compiled here):
  bar_is_fresh        IsFreshBar       act only on a bar that closed within one period of the server time
  read_probability    ReadProbability  a probability must parse and lie in [0, 1] (else no trade)
  onnx_outputs_ok     OnnxOutputsOk    the ONNX engine's outputs: in [0, 1], class probabilities summing to 1
  normalize_lots      NormalizeLots    floor to SYMBOL_VOLUME_STEP, refuse below SYMBOL_VOLUME_MIN, cap at MAX
  stop_prices         StopPrices       SL/TP from ATR, then pushed beyond stops/freeze level from Bid (buy) or
                                       Ask (sell), the side the broker checks them against
  can_close           CanClose         a position whose SL/TP lies within the freeze level cannot be closed
  plan_actions        PlanActions      closes first (never depend on ATR), netting-account handling
  classify_retcode    RetcodeOutcome   done / partial (logged as a partial fill, not a failure) / failed
  points_input        PointsInput      the ONNX input: MathRound(price / _Point) in double, oldest bar first
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence

import httpx
import numpy as np
import pandas as pd


# --- The EA's JSON helpers (first occurrence of "key" followed by a colon) ---------------------------------
def _is_space(ch: str) -> bool:
  return ch in ' \t\r\n'


def json_value_start(text: str, key: str) -> int:
  needle = f'"{key}"'
  n = len(text)
  pos = text.find(needle)
  while pos >= 0:
    i = pos + len(needle)
    while i < n and _is_space(text[i]):
      i += 1
    if i < n and text[i] == ':':
      i += 1
      while i < n and _is_space(text[i]):
        i += 1
      return i if i < n else -1
    pos = text.find(needle, pos + 1)
  return -1


def json_get_token(text: str, key: str) -> Optional[str]:
  """JsonGetToken: the raw text of a scalar value (up to , } ] or space), None if absent/null/a string."""
  i = json_value_start(text, key)
  if i < 0:
    return None
  j = i
  while j < len(text) and text[j] not in ',}]' and not _is_space(text[j]):
    j += 1
  token = text[i:j]
  if j == i or token == 'null' or token.startswith('"'):
    return None
  return token


def json_get_double(text: str, key: str) -> Optional[float]:
  token = json_get_token(text, key)
  try:
    return None if token is None else float(token)
  except ValueError:
    return None


def json_get_string(text: str, key: str) -> Optional[str]:
  i = json_value_start(text, key)
  if i < 0 or text[i] != '"':
    return None
  j = text.find('"', i + 1)
  return None if j < 0 else text[i + 1:j]


# --- The EA ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Decision:
  bar_time: int                  # unix seconds of the closed bar the request was for
  action: str                    # BUY / SELL / HOLD, or REFUSED
  reason: str = ''               # why it refused
  buy_prob: float = float('nan')
  sell_prob: float = float('nan')
  server_signal: str = ''
  body: str = ''                 # the exact request body sent


# --- The EA's trading rules (both engines) ---------------------------------------------------------------
def bar_is_fresh(closed_bar_open: int, period_s: int, server_now: int) -> bool:
  """IsFreshBar: the bar that opened at `closed_bar_open` closed at + period_s; act only while server time is
  within one period of that close (not on the first tick after attaching to a long-closed bar, a weekend or
  an outage)."""
  closed_at = closed_bar_open + period_s
  return closed_at <= server_now < closed_at + period_s


def read_probability(token: Optional[str]) -> Optional[float]:
  """ReadProbability: the number in `token` if it is a plain decimal in [0, 1], else None (no trade).

  StringToDouble returns 0 for text it cannot read, which would look like a valid probability; the EA
  therefore accepts only the characters of a plain decimal ([0-9.]; the server never writes exponents,
  natron.serve.schemas.encode_json) and then range-checks."""
  if token is None or not token or any(ch not in '0123456789.' for ch in token) or token.count('.') > 1:
    return None
  value = float(token)
  return value if 0.0 <= value <= 1.0 else None


def onnx_outputs_ok(buy: float, sell: float, direction: Sequence[float], regime: Sequence[float],
                    tol: float = 1e-3) -> bool:
  """OnnxOutputsOk: every probability finite and in [0, 1]; each softmax sums to 1 within `tol`."""
  values = [buy, sell, *direction, *regime]
  if any(not math.isfinite(v) or v < 0.0 or v > 1.0 for v in values):
    return False
  return abs(sum(direction) - 1.0) <= tol and abs(sum(regime) - 1.0) <= tol


def normalize_lots(lots: float, step: float, vmin: float, vmax: float) -> float:
  """NormalizeLots: floor to the volume step (never up), 0 (refuse) below the minimum, capped at the max."""
  if step > 0:
    lots = math.floor(lots / step + 1e-9) * step
    lots = round(lots, max(0, -int(math.floor(math.log10(step))) + 2))
  if lots < vmin - 1e-12 or lots <= 0:
    return 0.0
  return min(lots, vmax)


def margin_ok(required_margin: Optional[float], free_margin: float) -> bool:
  """OrderCalcMargin succeeded and the free margin covers it."""
  return required_margin is not None and 0 <= required_margin <= free_margin


def stop_prices(is_buy: bool, bid: float, ask: float, atr: float, stop_atr: float, target_atr: float,
                stops_level: int, freeze_level: int, point: float, digits: int) -> tuple[float, float]:
  """StopPrices -> (sl, tp), 0 for none. Distances are stop_atr / target_atr ATRs from the entry (Ask for a
  buy, Bid for a sell); a buy's SL/TP are then kept at least max(stops, freeze) level points (+1) away from
  the Bid, a sell's from the Ask, the prices brokers check them against, and rounded AWAY from the market."""
  entry = ask if is_buy else bid
  check = bid if is_buy else ask
  gap = (max(stops_level, freeze_level) + 1) * point if max(stops_level, freeze_level) > 0 else 0.0
  sl = tp = 0.0
  if stop_atr > 0:
    if is_buy:
      sl = _round_down(min(entry - stop_atr * atr, check - gap), point, digits)
    else:
      sl = _round_up(max(entry + stop_atr * atr, check + gap), point, digits)
  if target_atr > 0:
    if is_buy:
      tp = _round_up(max(entry + target_atr * atr, check + gap), point, digits)
    else:
      tp = _round_down(min(entry - target_atr * atr, check - gap), point, digits)
  return sl, tp


def _round_down(price: float, point: float, digits: int) -> float:
  return round(math.floor(price / point + 1e-9) * point, digits)


def _round_up(price: float, point: float, digits: int) -> float:
  return round(math.ceil(price / point - 1e-9) * point, digits)


def can_close(is_buy: bool, bid: float, ask: float, sl: float, tp: float, freeze_level: int,
              point: float) -> bool:
  """CanClose: the broker refuses to close (or modify) a position whose SL or TP lies within the freeze level
  of the price it would trigger at (Bid for a long, Ask for a short)."""
  if freeze_level <= 0:
    return True
  price, freeze = (bid if is_buy else ask), freeze_level * point
  return all(level == 0 or abs(price - level) > freeze for level in (sl, tp))


def plan_actions(decision: str, *, own_long: int, own_short: int, netting: bool, foreign: int = 0,
                 close_on_opposite: bool = True, close_on_hold: bool = False) -> list[str]:
  """PlanActions: what the EA does on a decision, closes first (exits never depend on ATR or a price check).

  On a netting account (ACCOUNT_MARGIN_MODE_RETAIL_NETTING / EXCHANGE) one position per symbol exists: a buy
  while short would reduce the short instead of opening a long, so the EA closes its short first and opens
  only when flat; without close_on_opposite it does nothing ('skip: ...'); with a position of another EA or a
  manual one on the symbol (`foreign`) it never opens (it would net against it)."""
  actions = []
  if decision in ('BUY', 'SELL'):
    mine, theirs = ('long', 'short') if decision == 'BUY' else ('short', 'long')
    have_mine = own_long if decision == 'BUY' else own_short
    have_theirs = own_short if decision == 'BUY' else own_long
    if have_theirs and close_on_opposite:
      actions.append(f'close_{theirs}')
    if have_mine:
      return actions
    if netting and foreign:
      return actions + ['skip: another position on this netting symbol']
    if netting and have_theirs and not close_on_opposite:
      return actions + [f'skip: netting would reduce the {theirs}']
    return actions + [f'open_{mine}']
  if close_on_hold:
    actions += ['close_long'] * bool(own_long) + ['close_short'] * bool(own_short)
  return actions


RETCODE_DONE, RETCODE_PLACED, RETCODE_DONE_PARTIAL = 10009, 10008, 10010


def classify_retcode(code: int) -> str:
  """RetcodeOutcome: 'done', 'partial' (a partial fill: logged with the filled volume, not as a failure)
  or 'failed'."""
  if code in (RETCODE_DONE, RETCODE_PLACED):
    return 'done'
  if code == RETCODE_DONE_PARTIAL:
    return 'partial'
  return 'failed'


def points_input(rates: pd.DataFrame, point: float, use_real_volume: bool = False) -> np.ndarray:
  """PointsInput: the ONNX engine's input float32 [1, R, 5]: open, high, low, close as MathRound(price /
  _Point) computed in double (exact), volume as float; oldest bar first."""
  prices = rates[['open', 'high', 'low', 'close']].to_numpy(np.float64)
  volume = rates['real_volume' if use_real_volume else 'volume'].to_numpy(np.float64)
  ticks = np.floor(prices / point + 0.5)          # MathRound: half away from zero (prices are positive)
  return np.concatenate([ticks, volume[:, None]], axis=1).astype(np.float32)[None]


def decide(buy_prob: float, sell_prob: float, threshold: float) -> str:
  if buy_prob >= threshold and buy_prob > sell_prob:
    return 'BUY'
  if sell_prob >= threshold and sell_prob > buy_prob:
    return 'SELL'
  return 'HOLD'


def _double_to_string(x: float, digits: int) -> str:
  return f'{x:.{digits}f}'


class EAClient:
  """NatronEA.mq5's request/decision logic (positions are not simulated; the decision is returned)."""

  def __init__(self, url: str, *, api_key: str = '', timeout_ms: int = 2000, threshold: float = 0.6,
               required_candles: int = 0, digits: int = 5, server_offset_s: int = 0,
               transport: Optional[httpx.BaseTransport] = None,
               forming_bar_now: Optional[Callable[[], int]] = None, period_s: int = 900,
               server_now: Optional[Callable[[], int]] = None):
    self.url = url
    self.api_key = api_key
    self.timeout_ms = timeout_ms
    self.threshold = threshold
    self.required = required_candles
    self.digits = digits
    self.server_offset_s = server_offset_s   # TimeTradeServer() - TimeGMT(), rounded to 15 minutes
    self.bar_open = 0
    self.client = httpx.Client(timeout=timeout_ms / 1000.0, transport=transport)
    self._forming_bar_now = forming_bar_now   # iTime(_Symbol, _Period, 0) after the request returns
    self.period_s = period_s                  # PeriodSeconds(_Period)
    self._server_now = server_now             # TimeCurrent(); default: the forming bar's open (its 1st tick)
    self.timer_retries = 0

  def _headers(self) -> dict:
    headers = {'Content-Type': 'application/json', 'Accept': 'application/json'}
    if self.api_key:
      headers['X-API-Key'] = self.api_key
    return headers

  def http(self, method: str, url: str, body: str = '') -> tuple[int, str]:
    """WebRequest: (status, reply text); status -1 when no reply came (timeout / connection error)."""
    try:
      response = self.client.request(method, url, content=body.encode() if body else None,
                                     headers=self._headers())
    except httpx.HTTPError:
      return -1, ''
    return response.status_code, response.text

  def base_url(self) -> str:
    pos = self.url.find('/predict')
    return self.url[:pos] if pos > 0 else self.url

  def init(self, bars: pd.DataFrame) -> bool:
    """OnInit: never fails for an unreachable server: without required_candles it starts the retry timer
    (on_timer) and trades nothing until the server answers. Returns whether required_candles is known."""
    self.bar_open = _unix(bars['time'].iloc[-1])
    return self.fetch_required()

  def fetch_required(self) -> bool:
    if self.required <= 0:
      status, reply = self.http('GET', self.base_url() + '/model_info')
      required = json_get_double(reply, 'required_candles') if status == 200 else None
      self.required = int(round(required)) if required is not None and required >= 1 else 0
    return self.required > 0

  def on_timer(self) -> bool:
    """OnTimer (every InpRetrySeconds while required_candles is unknown): retries GET /model_info."""
    if self.required > 0:
      return True
    self.timer_retries += 1
    return self.fetch_required()

  def candles_json(self, closed: pd.DataFrame, offset: int = 0) -> str:
    """CandlesJson(): the body the EA sends, built the same way (times converted to UTC with `offset`)."""
    d = self.digits
    parts = [
        '{"time":' + str(t) + ',"open":' + _double_to_string(o, d) + ',"high":' + _double_to_string(h, d) +
        ',"low":' + _double_to_string(l, d) + ',"close":' + _double_to_string(c, d) + ',"volume":' +
        str(int(v)) + '}'
        for t, o, h, l, c, v in zip([u - offset for u in _unix_array(closed['time'])], closed['open'], closed['high'], closed['low'],
                                     closed['close'], closed['volume'])]
    return '{"candles":[' + ','.join(parts) + ']}'

  def on_tick(self, bars: pd.DataFrame) -> Optional[Decision]:
    """OnTick with the terminal's bars (the last row is the forming bar). A Decision when a bar closed."""
    forming = _unix(bars['time'].iloc[-1])
    if forming == 0 or forming == self.bar_open:
      return None
    self.bar_open = forming             # handled: a failed request is not retried within this bar
    return self.on_closed_bar(bars.iloc[:-1], forming)

  def on_closed_bar(self, closed: pd.DataFrame, forming: int) -> Decision:
    """OnClosedBar: CopyRates(..., 1, required) -> POST -> checks -> decision."""
    closed_bar = _unix(closed['time'].iloc[-1]) if len(closed) else 0
    if self.required <= 0:
      return Decision(closed_bar, 'REFUSED', 'required_candles unknown (server not reached yet)')
    now = self._server_now() if self._server_now is not None else forming
    if not bar_is_fresh(closed_bar, self.period_s, now):
      return Decision(closed_bar, 'REFUSED', f'stale bar: closed at {closed_bar + self.period_s}, now {now}')
    if len(closed) < self.required:
      return Decision(closed_bar, 'REFUSED', f'only {len(closed)} of {self.required} closed bars')
    rates = closed.iloc[-self.required:]
    offset = self.server_offset_s          # one offset per request, used both ways
    body = self.candles_json(rates, offset)
    status, reply = self.http('POST', self.url, body)
    if status == -1:
      return Decision(closed_bar, 'REFUSED', 'no reply (timeout or connection error)', body=body)
    if status != 200:
      return Decision(closed_bar, 'REFUSED', f'HTTP {status}: {reply[:200]}', body=body)
    stamp = json_get_double(reply, 'timestamp')
    buy = read_probability(json_get_token(reply, 'buy_prob'))
    sell = read_probability(json_get_token(reply, 'sell_prob'))
    signal = json_get_string(reply, 'signal')
    if stamp is None or signal is None:
      return Decision(closed_bar, 'REFUSED', 'unreadable reply', body=body)
    if buy is None or sell is None:
      return Decision(closed_bar, 'REFUSED', 'probability missing, not a plain decimal or outside [0, 1]',
                      body=body)
    if int(round(stamp)) + offset != closed_bar:
      return Decision(closed_bar, 'REFUSED', f'stale reply for {int(stamp)}', buy, sell, signal, body)
    if self._forming_bar_now is not None and self._forming_bar_now() != forming:
      return Decision(closed_bar, 'REFUSED', 'a new bar opened while waiting', buy, sell, signal, body)
    return Decision(closed_bar, decide(buy, sell, self.threshold), '', buy, sell, signal, body)


def _unix(t) -> int:
  return int(pd.Timestamp(t).timestamp())


def _unix_array(times) -> np.ndarray:
  return (pd.DatetimeIndex(times).as_unit('ns').asi8 // 1_000_000_000).tolist()


class OnnxEA:
  """NatronEA.mq5 with InpEngine=ONNX: the same bar cadence and rules, natron.onnx run in-process
  (onnxruntime standing in for the terminal's ONNX Runtime) on the closed bars converted to points."""

  def __init__(self, onnx_path: str, meta: dict, *, point: float, threshold: Optional[float] = None,
               period_s: int = 900, server_now: Optional[Callable[[], int]] = None):
    import onnxruntime   # pylint: disable=g-import-not-at-top
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3    # not the unused-initializer warnings of every Loop body
    self.session = onnxruntime.InferenceSession(onnx_path, options, providers=['CPUExecutionProvider'])
    self.meta = meta
    self.required = int(meta['required_candles'])
    self.point = point
    self.threshold = float(meta['thresholds']['signal'] if threshold is None else threshold)
    self.period_s = period_s
    self._server_now = server_now
    self.bar_open = 0
    self.check_shapes()

  def check_shapes(self) -> None:
    """OnInit's check: the model's input/output names and shapes are natron.json's (else INIT_FAILED)."""
    (inp,) = self.session.get_inputs()
    if inp.name != self.meta['input']['name'] or list(inp.shape) != self.meta['input']['shape']:
      raise ValueError(f'ONNX input {inp.name} {inp.shape} != natron.json {self.meta["input"]}')
    outs = [(o.name, list(o.shape)) for o in self.session.get_outputs()]
    want = [(o['name'], o['shape']) for o in self.meta['outputs']]
    if outs != want:
      raise ValueError(f'ONNX outputs {outs} != natron.json {want}')

  def init(self, bars: pd.DataFrame) -> None:
    self.bar_open = _unix(bars['time'].iloc[-1])

  def run(self, rates: pd.DataFrame) -> dict:
    x = points_input(rates.iloc[-self.required:], self.point)
    names = [o['name'] for o in self.meta['outputs']]
    return dict(zip(names, self.session.run(names, {self.meta['input']['name']: x})))

  def on_tick(self, bars: pd.DataFrame) -> Optional[Decision]:
    forming = _unix(bars['time'].iloc[-1])
    if forming == 0 or forming == self.bar_open:
      return None
    self.bar_open = forming
    closed = bars.iloc[:-1]
    closed_bar = _unix(closed['time'].iloc[-1]) if len(closed) else 0
    now = self._server_now() if self._server_now is not None else forming
    if not bar_is_fresh(closed_bar, self.period_s, now):
      return Decision(closed_bar, 'REFUSED', 'stale bar')
    if len(closed) < self.required:
      return Decision(closed_bar, 'REFUSED', f'only {len(closed)} of {self.required} closed bars')
    out = self.run(closed)
    buy, sell = float(out['buy_prob'][0]), float(out['sell_prob'][0])
    if not onnx_outputs_ok(buy, sell, out['direction_probs'][0].tolist(), out['regime_probs'][0].tolist()):
      return Decision(closed_bar, 'REFUSED', 'ONNX outputs out of range', buy, sell)
    return Decision(closed_bar, decide(buy, sell, self.threshold), '', buy, sell)
