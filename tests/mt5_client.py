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
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

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


def json_get_double(text: str, key: str) -> Optional[float]:
  i = json_value_start(text, key)
  if i < 0:
    return None
  j = i
  while j < len(text) and text[j] not in ',}]' and not _is_space(text[j]):
    j += 1
  token = text[i:j]
  if j == i or token == 'null' or token.startswith('"'):
    return None
  return float(token)


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
               forming_bar_now: Optional[Callable[[], int]] = None):
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
    """OnInit: required_candles from GET /model_info unless given; act only on bars closing from now on."""
    if self.required <= 0:
      status, reply = self.http('GET', self.base_url() + '/model_info')
      required = json_get_double(reply, 'required_candles') if status == 200 else None
      self.required = int(round(required)) if required is not None else 0
    if self.required <= 0:
      return False
    self.bar_open = _unix(bars['time'].iloc[-1])
    return True

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
    buy = json_get_double(reply, 'buy_prob')
    sell = json_get_double(reply, 'sell_prob')
    signal = json_get_string(reply, 'signal')
    if stamp is None or buy is None or sell is None or signal is None:
      return Decision(closed_bar, 'REFUSED', 'unreadable reply', body=body)
    if int(round(stamp)) + offset != closed_bar:
      return Decision(closed_bar, 'REFUSED', f'stale reply for {int(stamp)}', buy, sell, signal, body)
    if self._forming_bar_now is not None and self._forming_bar_now() != forming:
      return Decision(closed_bar, 'REFUSED', 'a new bar opened while waiting', buy, sell, signal, body)
    return Decision(closed_bar, decide(buy, sell, self.threshold), '', buy, sell, signal, body)


def _unix(t) -> int:
  return int(pd.Timestamp(t).timestamp())


def _unix_array(times) -> np.ndarray:
  return (pd.DatetimeIndex(times).as_unit('ns').asi8 // 1_000_000_000).tolist()
