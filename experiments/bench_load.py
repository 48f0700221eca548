r"""Load and soak benchmark: many EA-like clients against a real server on 127.0.0.1; prints one JSON document.

  python experiments/bench_load.py                                   # quick bundle; ~17 min (see below)
  python experiments/bench_load.py --soak_s=20 --scenario_s=5        # a short run (~2.5 min after start-up)
  python experiments/bench_load.py --workdir=runs/demo --clients=16,64 --modes=burst --soak_s=0

Starts `launch.py --config=configs/serve.py` itself (127.0.0.1 only, a free port, NATRON_API_KEY set in its
environment, --config.ws_port=0) on `--bundle` / the finished run in `--workdir`, or on a quick bundle built
here (experiments/bench_serve.make_bundle: random parameters at the quick size), waits until /health says
'ok' (it may say 'starting' first) and always stops it at the end (Ctrl-C, SIGTERM and errors included; the
server also gets SIGTERM if this process dies).

Clients are the MT5 Expert Advisor's two ways in, on a 5-digit FX series of 1-minute bars (natron.data
synthetic_market: a quote grid of 1e-5, integer tick volumes, UTC minutes from a Monday), the timeframe
compressed to one bar every --bar_s seconds per client:
  REST  POST /predict with the last required_candles closed bars when a bar closes (the EA's cadence); a 503
        is retried after its Retry-After while that still leaves time before the EA's deadline (--retries)
  WS    connect, `subscribe` with required_candles bars of history, then one `bar` per closed bar, each
        following the previous by exactly one timeframe; after an error, a timeout or a skipped bar it
        re-subscribes with fresh history (the server keeps no state from a failed command)
--ws_fraction of the clients use the WebSocket (floor(clients * fraction)), the rest REST.
Scenarios: each client count of --clients in each mode of --modes for --scenario_s seconds:
  cadence  each client's bars close at its own phase within the bar (symbols and timeframes spread out)
  burst    every client's bar closes at the same instant (MT5 EAs at the top of the minute)
then one soak of --soak_s seconds with --soak_clients in --soak_mode. Throughout each, a stream of bad
requests (--bad_per_s: malformed JSON, an off-grid price, too few candles, an oversized body, a wrong API key,
a malformed WebSocket message), GET /health every 1/--health_hz s, and the server's resident memory every
1/--rss_hz s (psutil on its PID).

Reported per scenario:
  latency_ms        per request: p50 / p99 / max of answers (any status), REST and WS bars apart, and of the
                    load-shedding answers alone ('shed': REST 503, WS 'overloaded')
  outcomes          per request: HTTP status ('200', '422', '503', ...) or WS reply ('prediction' to a bar
                    or a subscribe, 'error:<rule>', 'refused:<HTTP status>', 'closed:<code>'), 'timeout' (no
                    answer in --hard_timeout_s), 'error:<exception>'
  ea                per bar, as the EA sees it: on_time (a prediction within --deadline_s = 2 s of the bar
                    closing, retries included), over_deadline, failed, answers_over_deadline (REST and WS `bar`
                    requests answered after more than 2 s), retries_503 (REST 503s and WS errors carrying
                    "retry_after", retried), skipped_bars (closed while the previous request was still running),
                    subscribes / resubscribes, cancelled_in_flight (still unanswered at the end's hard timeout),
                    bar_ms (bar close -> final answer)
  bad               per kind: outcomes, rules, and `unexpected` (neither the expected status nor a 503 / 429)
  health_ms         /health p50 / p99 / max and its answers ('200:ok', '503:starting', ...)
  rss_mb            server resident memory: first, last, max, samples [[seconds, MB], ...]
  cpu               CPU seconds of the server, of this benchmark and of everything else on the machine (shared
                    machines), machine busy %, load average at the end
and for the soak rss_growth: mean RSS over the first minute against the last minute (a quarter of the soak
each when it is shorter than 4 minutes).

Bounds: at most 512 clients, 1 hour per scenario, 50 bad requests per second, bars no faster than one per
0.05 s per client, and each client's bars within one gap-free week of 1-minute bars (~5,600 bars: a soak of
~90 minutes at --bar_s=1); a scenario stops early (marked 'aborted') when the server's RSS exceeds
--max_rss_mb or this process's exceeds --max_bench_rss_mb. Loopback only: any other --host is refused, and
--server_arg may not set the server's host, port or bundle.

Full default run (measured on 2 shared CPUs): quick bundle 20-60 s, server start-up 40 s with the compilation
cache of --cache_dir filled (5 min cold), 8 scenarios of 30 s plus ~8 s each of set-up, drain and pause
(~5 min), the 10-minute soak: about 17 minutes (21 cold). The clients run on the same CPUs as the server, and
so may other people's work: `cpu` says how the CPU time was shared; compare figures within one run.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import json
import math
import os
import platform
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Optional

import httpx
import numpy as np
import orjson
import psutil

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from bench_serve import candle_dicts, free_port, make_bundle  # noqa: E402  pylint: disable=wrong-import-position
from machine import cpu_model, load_average  # noqa: E402  pylint: disable=wrong-import-position
from natron.serve.guard import body_bytes_for, is_loopback  # noqa: E402  pylint: disable=wrong-import-position

MAX_CLIENTS = 512
MAX_SCENARIO_S = 3600
MAX_SOAK_S = 4 * 3600
MAX_BAD_PER_S = 50
MIN_BAR_S = 0.05
MAX_OVERSIZED_BYTES = 16 << 20
CLIENT_SPREAD = 500            # clients start up to this many bars apart (distinct inputs, like other symbols)
WEEK_BARS = 5 * 1440           # 1-minute bars from Monday 00:00 to the weekend: the longest gap-free series
TYPICAL_REQUIRED = 1096        # required_candles of the default window (96) + feature warm-up (1000)
SHED = ('503', '429')          # load shedding: counted, never 'unexpected'


# ------------------------------------------------------------------------------------------------ settings
@dataclasses.dataclass(frozen=True)
class Load:
  """What every scenario shares."""
  bar_s: float = 1.0              # seconds between one client's bars (a compressed timeframe)
  ws_fraction: float = 0.5        # floor(clients * ws_fraction) clients use the WebSocket, the rest REST
  deadline_s: float = 2.0         # the EA gives up after this (WebRequest timeout)
  hard_timeout_s: float = 10.0    # a request unanswered after this is a 'timeout' (its latency is unknown)
  retries: int = 1                # 503 retries per bar (after Retry-After, only if the deadline still allows)
  bad_per_s: float = 2.0          # bad requests per second (0: none)
  health_hz: float = 5.0
  rss_hz: float = 1.0
  max_rss_mb: float = 8192.0      # server RSS cap: the scenario is aborted above it
  max_bench_rss_mb: float = 4096.0

  def __post_init__(self):
    if not MIN_BAR_S <= self.bar_s <= 3600:
      raise ValueError(f'bar_s must be in [{MIN_BAR_S}, 3600], got {self.bar_s}')
    if not 0.0 <= self.ws_fraction <= 1.0:
      raise ValueError(f'ws_fraction must be in [0, 1], got {self.ws_fraction}')
    if not 0.0 <= self.bad_per_s <= MAX_BAD_PER_S:
      raise ValueError(f'bad_per_s must be in [0, {MAX_BAD_PER_S}], got {self.bad_per_s}')
    if not (0 < self.deadline_s <= self.hard_timeout_s <= 120):
      raise ValueError('need 0 < deadline_s <= hard_timeout_s <= 120')
    if not 0 <= self.retries <= 5:
      raise ValueError(f'retries must be in [0, 5], got {self.retries}')
    if not (0 < self.health_hz <= 50 and 0 < self.rss_hz <= 50):
      raise ValueError('health_hz and rss_hz must be in (0, 50]')


@dataclasses.dataclass(frozen=True)
class Scenario:
  name: str
  clients: int
  mode: str                       # 'cadence' or 'burst'
  duration_s: float
  soak: bool = False

  def __post_init__(self):
    if not 1 <= self.clients <= MAX_CLIENTS:
      raise ValueError(f'clients must be in [1, {MAX_CLIENTS}], got {self.clients}')
    if self.mode not in ('cadence', 'burst'):
      raise ValueError(f"mode must be 'cadence' or 'burst', got {self.mode!r}")
    if not 0 < self.duration_s <= (MAX_SOAK_S if self.soak else MAX_SCENARIO_S):
      raise ValueError(f'{self.name}: duration {self.duration_s} s is outside (0, '
                       f'{MAX_SOAK_S if self.soak else MAX_SCENARIO_S}]')


@dataclasses.dataclass(frozen=True)
class Target:
  """A running server on this machine: its HTTP base URL, API key and process id (for RSS and CPU)."""
  host: str
  port: int
  api_key: str
  pid: int

  def __post_init__(self):
    if not is_loopback(self.host):
      raise ValueError(f'bench_load only targets this machine (loopback); refusing host {self.host!r}')

  @property
  def url(self) -> str:
    return f'http://{self.host}:{self.port}'

  @property
  def ws_url(self) -> str:
    return f'ws://{self.host}:{self.port}/ws'

  def headers(self, key: Optional[str] = None) -> dict:
    key = self.api_key if key is None else key
    return {'Content-Type': 'application/json', **({'X-API-Key': key} if key else {})}


# ------------------------------------------------------------------------------------------------ bar series
class Series:
  """Closed bars as pre-encoded JSON objects (the EA's fields: unix-second UTC time, 5-decimal prices,
  integer volume), so building a request is a join, not an encode."""

  def __init__(self, frame):
    self.candles = candle_dicts(frame)
    self.bar_json = [orjson.dumps(c) for c in self.candles]
    times = np.asarray([c['time'] for c in self.candles], np.int64)
    steps = np.diff(times)
    self.period_s = int(np.min(steps)) if steps.size else 60
    if steps.size and (steps != self.period_s).any():
      raise ValueError('the bar series must be gap-free: every bar one timeframe after the previous')

  def __len__(self) -> int:
    return len(self.bar_json)

  def candles_json(self, end: int, n: int) -> bytes:
    """The JSON list of the n bars ending at bar `end` (inclusive)."""
    return b'[' + b','.join(self.bar_json[end - n + 1:end + 1]) + b']'

  def predict_body(self, end: int, n: int) -> bytes:
    return b'{"candles":' + self.candles_json(end, n) + b'}'


def bar_series(n_bars: int, seed: int = 1) -> Series:
  """n_bars 1-minute bars of a 5-digit FX pair from Monday 00:00 UTC; gap-free up to 7,200 bars (5 days)."""
  from natron.data import synthetic_market   # pylint: disable=g-import-not-at-top
  if n_bars > WEEK_BARS:
    raise ValueError(f'{n_bars} bars of 1 minute would cross a weekend; shorten the run or raise bar_s')
  return Series(synthetic_market(n_bars, seed=seed, timeframe='1min')[0])


def bars_needed(required: int, load: Load, longest_s: float) -> int:
  return required + CLIENT_SPREAD + int(math.ceil(longest_s / load.bar_s)) + 4


# ------------------------------------------------------------------------------------------------ recording
def summary(values) -> dict:
  if not values:
    return {'n': 0}
  a = np.asarray(values, np.float64)
  return {'p50': round(float(np.percentile(a, 50)), 2), 'p99': round(float(np.percentile(a, 99)), 2),
          'max': round(float(a.max()), 2), 'n': int(a.size)}


class Recorder:
  """One scenario's observations."""

  def __init__(self):
    self.latency = {'rest': [], 'ws_bar': [], 'ws_subscribe': [], 'shed': []}
    self.outcomes = {'rest': collections.Counter(), 'ws': collections.Counter()}
    self.ea = collections.Counter()
    self.bar_ms = []                      # bar close -> final answer, retries included
    self.retry_after_s = []               # Retry-After / "retry_after" of every 503 / overloaded reply
    self.bad = collections.defaultdict(lambda: {'outcomes': collections.Counter(),
                                                'rules': collections.Counter(), 'unexpected': 0})
    self.bad_ms = []
    self.health_ms = []
    self.health = collections.Counter()
    self.rss = []                         # [(seconds since start, MB)]
    self.aborted = ''
    self.ready = 0                        # clients set up (counted whether or not that succeeded)

  def answered(self, flow: str, key: str, outcome: str, ms: float, deadline_s: float) -> None:
    self.outcomes[flow][outcome] += 1
    self.latency[key].append(ms)
    if outcome in ('503', 'error:overloaded'):   # load shedding should answer at once, not after the wait
      self.latency['shed'].append(ms)
    if key != 'ws_subscribe' and ms > deadline_s * 1e3:   # a request for a bar the EA would have given up on
      self.ea['answers_over_deadline'] += 1


def retry_after_s(headers) -> float:
  """Seconds to wait from a Retry-After header (or a WS "retry_after"), clipped to [0, 30]; 1 if unreadable."""
  try:
    seconds = float(headers.get('retry-after', '1'))
  except ValueError:
    return 1.0
  return min(max(seconds, 0.0), 30.0) if math.isfinite(seconds) else 1.0


# ------------------------------------------------------------------------------------------------ clients
class Clock:
  """When client i's bar k closes: start + phase_i + k * bar_s (phase 0 for all in 'burst'); the scenario's
  start and end are in the shared `timeline`, set when every client is ready."""

  def __init__(self, timeline: dict, phase: float, bar_s: float):
    self.timeline, self.phase, self.bar_s = timeline, phase, bar_s

  @property
  def start(self) -> float:
    return self.timeline['start']

  @property
  def end(self) -> float:
    return self.timeline['end']

  def due(self, k: int) -> float:
    return self.start + self.phase + k * self.bar_s

  def latest(self, now: float) -> int:
    return max(0, int(math.floor((now - self.start - self.phase) / self.bar_s)))


async def sleep_until(t: float) -> None:
  delay = t - asyncio.get_running_loop().time()
  if delay > 0:
    await asyncio.sleep(delay)


async def rest_client(http: httpx.AsyncClient, target: Target, series: Series, required: int, base: int,
                      clock: Clock, load: Load, rec: Recorder, stop: asyncio.Event, go: asyncio.Event) -> None:
  """POST /predict when each bar closes; a 503 is retried after Retry-After if the deadline still allows."""
  loop = asyncio.get_running_loop()
  rec.ready += 1
  await go.wait()
  async for k, due in ea_bars(clock, rec, stop):
    body = series.predict_body(base + k, required)
    final, attempt = 'none', 0
    while True:
      t0 = loop.time()
      try:
        reply = await http.post('/predict', content=body, headers=target.headers())
        outcome = str(reply.status_code)
        rec.answered('rest', 'rest', outcome, (loop.time() - t0) * 1e3, load.deadline_s)
      except httpx.TimeoutException:
        outcome, reply = 'timeout', None
        rec.outcomes['rest']['timeout'] += 1
      except httpx.HTTPError as e:
        outcome, reply = f'error:{type(e).__name__}', None
        rec.outcomes['rest'][outcome] += 1
      final = outcome
      if outcome != '503' or attempt >= load.retries:
        break
      wait = retry_after_s(reply.headers)
      rec.retry_after_s.append(wait)
      if loop.time() + wait >= due + load.deadline_s or stop.is_set():
        break
      attempt += 1
      rec.ea['retries_503'] += 1
      await asyncio.sleep(wait)
    finish_bar(rec, final == '200', (loop.time() - due) * 1e3, load)


async def ea_bars(clock: Clock, rec: Recorder, stop: asyncio.Event):
  """(k, due) of each bar the EA handles: waits until bar k closes and counts it; once the caller has handled
  it, moves to the newest bar (`next_bar`), so bars that closed meanwhile are skipped."""
  k = 0
  while not stop.is_set() and clock.due(k) < clock.end:
    due = clock.due(k)
    await sleep_until(due)
    rec.ea['bars'] += 1
    yield k, due
    k = next_bar(k, clock, asyncio.get_running_loop().time(), rec)


def finish_bar(rec: Recorder, ok: bool, ms: float, load: Load) -> None:
  rec.bar_ms.append(ms)
  if not ok:
    rec.ea['failed'] += 1
  elif ms <= load.deadline_s * 1e3:
    rec.ea['on_time'] += 1
  else:
    rec.ea['over_deadline'] += 1


def next_bar(k: int, clock: Clock, now: float, rec: Recorder) -> int:
  """The EA handles the newest bar only: bars that closed while it waited are skipped."""
  latest = clock.latest(now)
  if latest > k + 1:
    rec.ea['skipped_bars'] += latest - k - 1
    return latest
  return k + 1


class WsLink:
  """One WebSocket connection with request ids, so a reply that arrives after its timeout is discarded."""

  def __init__(self, target: Target, load: Load, rec: Recorder, quiet: bool = False):
    self.target, self.load, self.rec = target, load, rec
    self.quiet = quiet                    # the bad-request link: its outcomes are counted by its caller
    self.ws = None
    self.next_id = 0
    self.retry_at = 0.0

  async def ensure(self) -> bool:
    from websockets.asyncio.client import connect   # pylint: disable=g-import-not-at-top
    from websockets.exceptions import InvalidStatus   # pylint: disable=g-import-not-at-top
    loop = asyncio.get_running_loop()
    if self.ws is not None:
      return True
    if loop.time() < self.retry_at:
      return False
    try:
      self.ws = await connect(self.target.ws_url, additional_headers=self.target.headers(), max_size=None,
                              open_timeout=self.load.hard_timeout_s, ping_interval=None, compression=None,
                              close_timeout=1)
      return True
    except InvalidStatus as e:
      self.count(f'refused:{e.response.status_code}')
      self.retry_at = loop.time() + retry_after_s(e.response.headers)
    except Exception as e:   # pylint: disable=broad-except
      self.count(f'connect_error:{type(e).__name__}')
      self.retry_at = loop.time() + 1.0
    return False

  def count(self, outcome: str) -> None:
    if not self.quiet:
      self.rec.outcomes['ws'][outcome] += 1

  async def request(self, payload: bytes, key: str) -> Optional[dict]:
    """Sends one command (payload: the JSON object's fields after '{'); its reply, or None."""
    from websockets.exceptions import ConnectionClosed   # pylint: disable=g-import-not-at-top
    loop = asyncio.get_running_loop()
    self.next_id += 1
    rid = self.next_id
    t0 = loop.time()
    try:
      await self.ws.send(b'{"id":' + str(rid).encode() + b',' + payload)
      while True:
        left = t0 + self.load.hard_timeout_s - loop.time()
        reply = orjson.loads(await asyncio.wait_for(self.ws.recv(decode=False), max(left, 0.001)))
        if reply.get('id') == rid:
          break
    except asyncio.TimeoutError:
      self.count('timeout')
      return None
    except ConnectionClosed as e:
      self.count(f'closed:{e.rcvd.code if e.rcvd is not None else "none"}')
      self.ws = None
      return None
    if not self.quiet:
      outcome = f'error:{reply.get("rule")}' if reply.get('type') == 'error' else str(reply.get('type'))
      self.rec.answered('ws', key, outcome, (loop.time() - t0) * 1e3, self.load.deadline_s)
    return reply

  async def close(self) -> None:
    if self.ws is not None:
      with contextlib.suppress(Exception):
        await self.ws.close()
      self.ws = None


async def ws_client(target: Target, series: Series, required: int, base: int, symbol: str, clock: Clock,
                    load: Load, rec: Recorder, stop: asyncio.Event, go: asyncio.Event) -> None:
  """Subscribes with history, then sends each closed bar; re-subscribes whenever the chain is broken."""
  loop = asyncio.get_running_loop()
  link = WsLink(target, load, rec)
  subscribed = False
  sym = orjson.dumps(symbol)

  async def retrying(request, due: float) -> Optional[dict]:
    """An error with "retry_after" (overloaded, starting) is retried like a REST 503, if the deadline allows."""
    for attempt in range(load.retries + 1):
      reply = await request()
      if reply is None or reply.get('type') != 'error' or 'retry_after' not in reply or attempt == load.retries:
        return reply
      wait = retry_after_s({'retry-after': str(reply['retry_after'])})
      rec.retry_after_s.append(wait)
      if loop.time() + wait >= due + load.deadline_s or stop.is_set():
        return reply
      rec.ea['retries_503'] += 1
      await asyncio.sleep(wait)
    return reply

  async def subscribe(end: int, due: Optional[float] = None) -> bool:
    message = (b'"command":"subscribe","symbol":' + sym + b',"candles":' + series.candles_json(end, required) +
               b'}')
    rec.ea['subscribes'] += 1
    reply = await retrying(lambda: link.request(message, 'ws_subscribe'), loop.time() if due is None else due)
    return reply is not None and reply.get('type') == 'prediction'

  try:
    if await link.ensure():           # set-up before the clock starts: history up to the bar before bar 0
      subscribed = await subscribe(base - 1)
    rec.ready += 1
    await go.wait()
    previous = -1
    async for k, due in ea_bars(clock, rec, stop):
      if k != previous + 1:
        subscribed = False              # a skipped bar breaks the one-timeframe chain
      previous = k
      ok = False
      if await link.ensure():
        if subscribed:
          bar = b'"command":"bar","symbol":' + sym + b',"candle":' + series.bar_json[base + k] + b'}'
          reply = await retrying(lambda: link.request(bar, 'ws_bar'), due)   # pylint: disable=cell-var-from-loop
          ok = reply is not None and reply.get('type') == 'prediction'
        else:
          rec.ea['resubscribes'] += 1
          ok = await subscribe(base + k, due)
      subscribed = ok and link.ws is not None
      finish_bar(rec, ok, (loop.time() - due) * 1e3, load)
  finally:
    await link.close()


# ------------------------------------------------------------------------------------------------ bad requests
BAD_KINDS = ('malformed_json', 'off_grid', 'too_few_candles', 'oversized', 'wrong_key', 'ws_malformed')


def bad_requests(series: Series, required: int, max_candles: int, auth: bool) -> dict:
  """kind -> (body bytes, headers override key or None, expected outcomes)."""
  end = len(series) - 1
  off = dict(series.candles[end])
  off['high'] = off['high'] + 3.3e-9       # 10 decimals: no grid float32 can hold at this price
  off_grid = (b'{"candles":[' + b','.join(series.bar_json[end - required + 1:end]) + b',' + orjson.dumps(off) +
              b']}')
  size = min(body_bytes_for(max_candles) + (64 << 10), MAX_OVERSIZED_BYTES)
  oversized = b'{"candles":[' + b' ' * (size - 14) + b']}'
  return {
      'malformed_json': (b'{"candles":[{"time":1,', None, {'422'}),
      'off_grid': (off_grid, None, {'422'}),
      'too_few_candles': (series.predict_body(end, required - 1), None, {'422'}),
      'oversized': (oversized, None, {'413'}),
      'wrong_key': (series.predict_body(end, required), 'wrong-' + secrets.token_hex(4), {'403'} if auth else {'200'}),
      'ws_malformed': (b'{"command":"bar","symbol":', None, {'error:json', 'error:fields', 'error:request'}),
  }


async def bad_stream(http: httpx.AsyncClient, target: Target, series: Series, required: int, limits: dict,
                     auth: bool, load: Load, rec: Recorder, stop: asyncio.Event) -> None:
  """Fires one bad request every 1/bad_per_s seconds, cycling through BAD_KINDS (at most 16 in flight)."""
  if load.bad_per_s <= 0:
    return
  loop = asyncio.get_running_loop()
  kinds = bad_requests(series, required, int(limits.get('max_candles', 5000)), auth)
  link = WsLink(target, load, rec, quiet=True)
  link_lock = asyncio.Lock()              # one bad WebSocket message at a time on its connection
  gate = asyncio.Semaphore(16)
  tasks = set()

  async def fire(kind: str) -> None:
    body, key, expected = kinds[kind]
    entry = rec.bad[kind]
    async with gate:
      t0 = loop.time()
      if kind == 'ws_malformed':
        async with link_lock:
          try:
            outcome = await ws_malformed(link, body, entry)
          except Exception as e:   # pylint: disable=broad-except
            outcome = f'error:{type(e).__name__}'
            await link.close()
      else:
        try:
          reply = await http.post('/predict', content=body, headers=target.headers(key))
          outcome = str(reply.status_code)
          with contextlib.suppress(Exception):
            rule = reply.json().get('rule') if reply.status_code != 200 else None
            if rule:
              entry['rules'][rule] += 1
        except httpx.TimeoutException:
          outcome = 'timeout'
        except httpx.HTTPError as e:
          outcome = f'error:{type(e).__name__}'
      rec.bad_ms.append((loop.time() - t0) * 1e3)
    entry['outcomes'][outcome] += 1
    if outcome not in expected and outcome not in SHED:
      entry['unexpected'] += 1

  try:
    i = 0
    start = loop.time()
    while not stop.is_set():
      await sleep_until(start + i / load.bad_per_s)
      if stop.is_set():
        break
      task = asyncio.create_task(fire(BAD_KINDS[i % len(BAD_KINDS)]))
      tasks.add(task)
      task.add_done_callback(tasks.discard)
      i += 1
  finally:
    if tasks:
      await asyncio.wait(tasks, timeout=load.hard_timeout_s)
    await link.close()


async def ws_malformed(link: WsLink, body: bytes, entry: dict) -> str:
  """A malformed message on a long-lived connection: an error reply, and the connection still answers."""
  from websockets.exceptions import ConnectionClosed   # pylint: disable=g-import-not-at-top
  if not await link.ensure():
    return 'connect_failed'
  try:
    await link.ws.send(body)
    reply = orjson.loads(await asyncio.wait_for(link.ws.recv(decode=False), link.load.hard_timeout_s))
  except asyncio.TimeoutError:
    await link.close()                    # an unmatched late reply would confuse the next one
    return 'timeout'
  except ConnectionClosed as e:
    link.ws = None
    return f'closed:{e.rcvd.code if e.rcvd is not None else "none"}'
  if reply.get('rule'):
    entry['rules'][reply['rule']] += 1
  outcome = f'{reply.get("type")}:{reply.get("rule")}'
  pong = await link.request(b'"command":"ping"}', '') if link.ws is not None else None
  if pong is None or pong.get('type') != 'pong':
    entry['outcomes']['connection_lost_after'] += 1
  return outcome


# ------------------------------------------------------------------------------------------------ probes
async def health_probe(target: Target, load: Load, rec: Recorder, stop: asyncio.Event) -> None:
  loop = asyncio.get_running_loop()
  async with httpx.AsyncClient(base_url=target.url, timeout=load.hard_timeout_s) as http:
    while not stop.is_set():
      t0 = loop.time()
      try:
        reply = await http.get('/health')
        rec.health_ms.append((loop.time() - t0) * 1e3)
        status = ''
        with contextlib.suppress(Exception):
          status = reply.json().get('status', '')
        rec.health[f'{reply.status_code}:{status}'] += 1
      except httpx.HTTPError as e:
        rec.health[f'error:{type(e).__name__}'] += 1
      await sleep_until(t0 + 1.0 / load.health_hz)


async def rss_probe(target: Target, load: Load, rec: Recorder, stop: asyncio.Event, t_start: float) -> None:
  loop = asyncio.get_running_loop()
  server, me = psutil.Process(target.pid), psutil.Process()
  while not stop.is_set():
    t = loop.time()
    try:
      mb = server.memory_info().rss / 2**20
    except psutil.Error:
      rec.aborted = rec.aborted or 'server process gone'
      stop.set()
      return
    rec.rss.append((round(t - t_start, 2), round(mb, 1)))
    if mb > load.max_rss_mb:
      rec.aborted = f'server RSS {mb:.0f} MB > max_rss_mb {load.max_rss_mb:.0f}'
      stop.set()
    elif me.memory_info().rss / 2**20 > load.max_bench_rss_mb:
      rec.aborted = f'benchmark RSS > max_bench_rss_mb {load.max_bench_rss_mb:.0f}'
      stop.set()
    await sleep_until(t + 1.0 / load.rss_hz)


def rss_growth(samples: list, duration_s: float) -> dict:
  """Mean RSS over the first vs the last window (one minute, or a quarter of a soak shorter than 4 min)."""
  window = 60.0 if duration_s >= 240 else duration_s / 4
  t = np.asarray([s[0] for s in samples], np.float64)
  mb = np.asarray([s[1] for s in samples], np.float64)
  if t.size < 2:
    return {'window_s': window, 'n': int(t.size)}
  first, last = mb[t <= t[0] + window], mb[t >= t[-1] - window]
  growth = float(last.mean() - first.mean())
  out = {'window_s': round(window, 1), 'first_mb': round(float(first.mean()), 1),
         'last_mb': round(float(last.mean()), 1), 'growth_mb': round(growth, 1)}
  if duration_s >= 240:   # a shorter soak's rate would extrapolate start-up noise
    out['growth_mb_per_hour'] = round(growth * 3600 / max(float(t[-1] - t[0]) - window, 1.0), 1)
  return out


# ------------------------------------------------------------------------------------------------ one scenario
async def run_scenario(target: Target, series: Series, info: dict, scenario: Scenario, load: Load) -> dict:
  """Runs one scenario against `target`; returns its report (see the module docstring)."""
  loop = asyncio.get_running_loop()
  required = int(info['required_candles'])
  if len(series) < bars_needed(required, load, scenario.duration_s):
    raise ValueError(f'series of {len(series)} bars is too short for {scenario.name}')
  n_ws = int(math.floor(scenario.clients * load.ws_fraction))
  rec, stop = Recorder(), asyncio.Event()
  server, me = psutil.Process(target.pid), psutil.Process()
  cpu0 = (sum(server.cpu_times()[:2]), sum(me.cpu_times()[:2]), time.perf_counter(), machine_busy_s())
  t_setup = loop.time()
  rng = np.random.default_rng(scenario.clients)
  timeline = {'start': 0.0, 'end': 0.0}
  limits = httpx.Limits(max_connections=scenario.clients + 8, max_keepalive_connections=scenario.clients + 8)
  async with httpx.AsyncClient(base_url=target.url, timeout=load.hard_timeout_s, limits=limits) as http, \
      httpx.AsyncClient(base_url=target.url, timeout=load.hard_timeout_s) as bad_http:
    probes = [asyncio.create_task(health_probe(target, load, rec, stop)),
              asyncio.create_task(rss_probe(target, load, rec, stop, t_setup)),
              asyncio.create_task(bad_stream(bad_http, target, series, required, info.get('limits', {}),
                                             bool(info.get('auth')), load, rec, stop))]
    # Clients set up (WebSocket: connect and subscribe, as EAs attach before the bars they trade), then wait for
    # `go`; the clock starts when all have, or after hard_timeout_s.
    go = asyncio.Event()
    tasks = []
    for i in range(scenario.clients):
      base = required + (i * 7) % CLIENT_SPREAD
      phase = 0.0 if scenario.mode == 'burst' else float(rng.uniform(0, load.bar_s))
      clock = Clock(timeline, phase, load.bar_s)
      if i < n_ws:
        coro = ws_client(target, series, required, base, f'LOAD{i}', clock, load, rec, stop, go)
      else:
        coro = rest_client(http, target, series, required, base, clock, load, rec, stop, go)
      tasks.append(asyncio.create_task(coro))
    setup_deadline = loop.time() + load.hard_timeout_s
    while rec.ready < scenario.clients and loop.time() < setup_deadline and not stop.is_set():
      await asyncio.sleep(0.05)
    timeline['start'] = loop.time() + 0.2
    timeline['end'] = timeline['start'] + scenario.duration_s
    go.set()
    setup_s = timeline['start'] - t_setup
    with contextlib.suppress(asyncio.TimeoutError):      # until the end, or an abort (RSS caps)
      await asyncio.wait_for(stop.wait(), timeout=scenario.duration_s + 0.2)
    done, pending = await asyncio.wait(tasks, timeout=load.hard_timeout_s + load.deadline_s + 2)
    stop.set()
    rec.ea['cancelled_in_flight'] += len(pending)   # still waiting after the hard timeout: not counted above
    for task in pending:
      task.cancel()
    await asyncio.gather(*pending, *probes, return_exceptions=True)
    for task in done:
      if task.exception() is not None:
        rec.ea[f'client_crashed:{type(task.exception()).__name__}'] += 1
  elapsed = time.perf_counter() - cpu0[2]
  server_s, bench_s = sum(server.cpu_times()[:2]) - cpu0[0], sum(me.cpu_times()[:2]) - cpu0[1]
  busy_s = machine_busy_s() - cpu0[3]
  cpu = {'wall_s': round(elapsed, 1), 'server_cpu_s': round(server_s, 1), 'bench_cpu_s': round(bench_s, 1),
         'others_cpu_s': round(max(busy_s - server_s - bench_s, 0.0), 1),
         'machine_busy_pct': round(100.0 * busy_s / (elapsed * (os.cpu_count() or 1)), 1),
         'load_avg_end': load_average()}
  return report(scenario, rec, n_ws, setup_s, cpu)


def machine_busy_s() -> float:
  """CPU seconds the whole machine has been busy (all processes: other people's work on a shared machine)."""
  t = psutil.cpu_times()
  return t.user + t.system + getattr(t, 'nice', 0.0) + getattr(t, 'irq', 0.0) + getattr(t, 'softirq', 0.0)


def report(scenario: Scenario, rec: Recorder, n_ws: int, setup_s: float, cpu: dict) -> dict:
  rss = [mb for _, mb in rec.rss]
  bars = max(rec.ea['bars'], 1)
  out = {
      'name': scenario.name, 'clients': scenario.clients, 'mode': scenario.mode,
      'ws_clients': n_ws, 'rest_clients': scenario.clients - n_ws, 'duration_s': scenario.duration_s,
      'setup_s': round(setup_s, 2), 'aborted': rec.aborted,
      'latency_ms': {'all': summary(rec.latency['rest'] + rec.latency['ws_bar']),
                     'rest': summary(rec.latency['rest']), 'ws_bar': summary(rec.latency['ws_bar']),
                     'ws_subscribe': summary(rec.latency['ws_subscribe']), 'shed': summary(rec.latency['shed'])},
      'outcomes': {flow: dict(sorted(c.items())) for flow, c in rec.outcomes.items()},
      'ea': dict(sorted(rec.ea.items()), on_time_pct=round(100.0 * rec.ea['on_time'] / bars, 2),
                 bar_ms=summary(rec.bar_ms), retry_after_s=summary(rec.retry_after_s)),
      'bars_per_s': round(rec.ea['bars'] / scenario.duration_s, 1),
      'bad': {k: {'outcomes': dict(v['outcomes']), 'rules': dict(v['rules']), 'unexpected': v['unexpected']}
              for k, v in sorted(rec.bad.items())},
      'bad_ms': summary(rec.bad_ms),
      'health_ms': dict(summary(rec.health_ms), answers=dict(rec.health)),
      'rss_mb': {'first': rss[0] if rss else None, 'last': rss[-1] if rss else None,
                 'max': max(rss) if rss else None, 'samples': thin(rec.rss, 120)},
      'cpu': cpu,
  }
  if scenario.soak:
    out['rss_growth'] = rss_growth(rec.rss, scenario.duration_s)
  return out


def thin(samples: list, n: int) -> list:
  """At most about n samples, evenly spaced (a 10-minute soak at 1 Hz keeps every 5th)."""
  step = max(1, int(math.ceil(len(samples) / n)))
  return [list(s) for s in samples[::step]]


async def fetch_info(target: Target) -> dict:
  async with httpx.AsyncClient(base_url=target.url, timeout=30) as http:
    reply = await http.get('/model_info', headers=target.headers())
    reply.raise_for_status()
    return reply.json()


def run_scenarios(target: Target, series: Series, scenarios: list[Scenario], load: Load,
                  log=lambda line: None) -> list[dict]:
  """Runs the scenarios one after the other against a running server; the reports, in order."""
  async def main():
    info = await fetch_info(target)
    out = []
    for i, scenario in enumerate(scenarios):
      if i:
        await asyncio.sleep(1.0)         # let the server drain closed connections between scenarios
      result = await run_scenario(target, series, info, scenario, load)
      log(json.dumps({scenario.name: {k: result[k] for k in ('latency_ms', 'outcomes', 'ea', 'health_ms')}}))
      out.append(result)
    return out
  return asyncio.run(main())


# ------------------------------------------------------------------------------------------------ the server
def quick_bundle(directory: str, cache_dir: str = '') -> str:
  """A bundle at the quick model size with random parameters (experiments/bench_serve.make_bundle)."""
  import jax   # pylint: disable=g-import-not-at-top
  from natron import features   # pylint: disable=g-import-not-at-top
  if cache_dir:   # the feature graph compiles in ~a minute on 2 busy cores: reuse it on later runs
    jax.config.update('jax_compilation_cache_dir', cache_dir)
  from natron.data import synthetic_market   # pylint: disable=g-import-not-at-top
  feats, names = features.compute_features(synthetic_market(features.WARMUP + 2000, seed=1)[0])
  return make_bundle(os.path.join(directory, 'finetune', 'bundle'), 'quick', feats, names)


# Run as `python -c _DIE_WITH_PARENT launch.py ...`: the server gets SIGTERM if this process dies (a SIGKILL
# included), set in the child before exec rather than with preexec_fn, which is unsafe once JAX's threads run.
_DIE_WITH_PARENT = ('import ctypes, os, signal, sys; '
                    'ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM); '   # PR_SET_PDEATHSIG
                    'os.execv(sys.executable, [sys.executable] + sys.argv[1:])')


def start_server(bundle: str, workdir: str, host: str, port: int, api_key: str, cache_dir: str,
                 extra: list[str], timeout_s: float):
  """launch.py serve in a subprocess; returns (process, seconds to ready, /health answers seen on the way)."""
  if not is_loopback(host):
    raise ValueError(f'bench_load serves and loads 127.0.0.1 only; refusing host {host!r}')
  command = [sys.executable, '-c', _DIE_WITH_PARENT, 'launch.py', '--config=configs/serve.py', f'--workdir={workdir}',
             f'--config.bundle={bundle}', f'--config.host={host}', f'--config.port={port}', '--config.ws_port=0',
             f'--config.compilation_cache_dir={cache_dir}', *extra]
  env = dict(os.environ, NATRON_API_KEY=api_key)
  log = open(os.path.join(workdir, 'server.log'), 'wb')   # a file, not a pipe: a full pipe would block the server
  start = time.perf_counter()
  server = subprocess.Popen(command, cwd=_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
  log.close()
  seen = collections.Counter()
  try:
    with httpx.Client(timeout=5) as client:
      while True:
        if server.poll() is not None:
          with open(os.path.join(workdir, 'server.log'), 'rb') as f:
            raise RuntimeError(f'server exited ({server.returncode}): '
                               f'{f.read()[-3000:].decode(errors="replace")}')
        if time.perf_counter() - start > timeout_s:
          raise RuntimeError(f'server not ready after {timeout_s} s; /health answers {dict(seen)}')
        try:
          reply = client.get(f'http://{host}:{port}/health')
          status = ''
          with contextlib.suppress(Exception):
            status = reply.json().get('status', '')
          seen[f'{reply.status_code}:{status}'] += 1
          if reply.status_code == 200 and status == 'ok':
            return server, round(time.perf_counter() - start, 2), dict(seen)
        except httpx.TransportError:
          pass
        time.sleep(0.2)
  except BaseException:   # Ctrl-C included: never leave a server behind
    stop_server(server)
    raise


def stop_server(server) -> None:
  if server.poll() is not None:
    return
  server.terminate()
  try:
    server.wait(timeout=30)
  except subprocess.TimeoutExpired:
    server.kill()
    server.wait(timeout=10)


def _raise_on_sigterm(signum, frame):
  del frame
  raise KeyboardInterrupt(f'signal {signum}')


def raise_fd_limit(clients: int) -> None:
  """Each client holds a socket on both ends (this process and the server, which inherits the limit)."""
  soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
  want = min(hard, max(soft, 4 * clients + 256))
  if want > soft:
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--bundle', default='', help='a bundle directory (default: build a quick bundle)')
  parser.add_argument('--workdir', default='', help='or the workdir of a finished run (its finetune/bundle)')
  parser.add_argument('--host', default='127.0.0.1', help='loopback only')
  parser.add_argument('--clients', default='1,16,64,256', help=f'client counts, each <= {MAX_CLIENTS}')
  parser.add_argument('--modes', default='cadence,burst')
  parser.add_argument('--scenario_s', type=float, default=30.0, help='seconds per (clients, mode) scenario')
  parser.add_argument('--soak_s', type=float, default=600.0, help='soak seconds (0: no soak)')
  parser.add_argument('--soak_clients', type=int, default=64)
  parser.add_argument('--soak_mode', default='burst')
  parser.add_argument('--bar_s', type=float, default=Load.bar_s, help='seconds per bar per client')
  parser.add_argument('--ws_fraction', type=float, default=Load.ws_fraction)
  parser.add_argument('--deadline_s', type=float, default=Load.deadline_s, help="the EA's timeout")
  parser.add_argument('--hard_timeout_s', type=float, default=Load.hard_timeout_s)
  parser.add_argument('--retries', type=int, default=Load.retries, help='503 retries per bar')
  parser.add_argument('--bad_per_s', type=float, default=Load.bad_per_s)
  parser.add_argument('--health_hz', type=float, default=Load.health_hz)
  parser.add_argument('--rss_hz', type=float, default=Load.rss_hz)
  parser.add_argument('--max_rss_mb', type=float, default=Load.max_rss_mb)
  parser.add_argument('--max_bench_rss_mb', type=float, default=Load.max_bench_rss_mb)
  parser.add_argument('--startup_timeout_s', type=float, default=900.0)
  parser.add_argument('--cache_dir', default=os.path.join(_ROOT, '.jax_cache'),
                      help="the server's compilation cache ('' for none: a cold start every time)")
  parser.add_argument('--server_arg', action='append', default=[],
                      help='extra launch.py flag, e.g. --server_arg=--config.max_candles=2000 (repeatable)')
  parser.add_argument('--out', default='')
  args = parser.parse_args(argv)
  if not is_loopback(args.host):
    parser.error(f'--host must be a loopback address (this benchmark never loads another machine), '
                 f'got {args.host!r}')
  if any(a.split('=')[0] in ('--config.host', '--config.bundle', '--config.port') for a in args.server_arg):
    parser.error('--server_arg may not set host, bundle or port (loopback only; use --host / --bundle)')
  if args.bundle and args.workdir:
    parser.error('pass --bundle or --workdir, not both')
  return args


def plan(args) -> tuple[Load, list[Scenario]]:
  load = Load(bar_s=args.bar_s, ws_fraction=args.ws_fraction, deadline_s=args.deadline_s,
              hard_timeout_s=args.hard_timeout_s, retries=args.retries, bad_per_s=args.bad_per_s,
              health_hz=args.health_hz, rss_hz=args.rss_hz, max_rss_mb=args.max_rss_mb,
              max_bench_rss_mb=args.max_bench_rss_mb)
  counts = [int(c) for c in args.clients.split(',') if c.strip()]
  modes = [m.strip() for m in args.modes.split(',') if m.strip()]
  scenarios = [Scenario(f'{mode}_{n}', n, mode, args.scenario_s) for n in counts for mode in modes]
  if args.soak_s > 0:
    scenarios.append(Scenario(f'soak_{args.soak_mode}_{args.soak_clients}', args.soak_clients, args.soak_mode,
                              args.soak_s, soak=True))
  if not scenarios:
    raise ValueError('nothing to run: give --clients and --modes, or --soak_s > 0')
  bars = int(math.ceil(max(s.duration_s for s in scenarios) / load.bar_s))
  if bars > WEEK_BARS - CLIENT_SPREAD - TYPICAL_REQUIRED:
    raise ValueError(f'{bars} bars per client do not fit in one gap-free week of 1-minute bars '
                     f'({WEEK_BARS} less history): shorten the run or raise --bar_s')
  return load, scenarios


def main(argv=None):
  try:
    run(parse_args(argv))
  except KeyboardInterrupt as e:
    print(f'bench_load: interrupted ({e or "Ctrl-C"}); the server was stopped', file=sys.stderr)
    sys.exit(130)


def run(args) -> None:
  try:
    load, scenarios = plan(args)
  except ValueError as e:
    print(f'bench_load: {e}', file=sys.stderr)
    sys.exit(2)
  signal.signal(signal.SIGTERM, _raise_on_sigterm)
  raise_fd_limit(max((s.clients for s in scenarios), default=1))
  t_start = time.perf_counter()
  result = {'benchmark': 'bench_load',
            'machine': {'cpu_model': cpu_model(), 'cpus': os.cpu_count(), 'python': platform.python_version(),
                        'load_avg_start': load_average()},
            'settings': dict(dataclasses.asdict(load), clients=args.clients, modes=args.modes,
                             scenario_s=args.scenario_s, soak_s=args.soak_s, soak_clients=args.soak_clients,
                             soak_mode=args.soak_mode, server_args=args.server_arg)}
  root = tempfile.mkdtemp(prefix='natron-bench-load-')
  server = None
  try:
    from natron.predictor import resolve_bundle   # pylint: disable=g-import-not-at-top
    given = args.bundle or args.workdir
    bundle = resolve_bundle(given) if given else quick_bundle(root, args.cache_dir)
    api_key = secrets.token_urlsafe(24)
    port = free_port()
    print(f'bench_load: starting the server on {args.host}:{port} ({bundle})', file=sys.stderr, flush=True)
    server, startup_s, seen = start_server(bundle, root, args.host, port, api_key, args.cache_dir,
                                           args.server_arg, args.startup_timeout_s)
    target = Target(args.host, port, api_key, server.pid)
    info = asyncio.run(fetch_info(target))
    required = int(info['required_candles'])
    series = bar_series(bars_needed(required, load, max(s.duration_s for s in scenarios)))
    result['server'] = {'bundle': bundle, 'model_version': info.get('model_version'), 'required_candles': required,
                        'limits': info.get('limits'), 'startup_s': startup_s, 'health_while_starting': seen,
                        'rss_mb_ready': round(psutil.Process(server.pid).memory_info().rss / 2**20, 1),
                        'request_bytes': len(series.predict_body(required, required))}
    print(f'bench_load: server ready in {startup_s} s; {len(scenarios)} scenarios', file=sys.stderr, flush=True)
    reports = run_scenarios(target, series, scenarios, load, log=lambda line: print(line, file=sys.stderr,
                                                                                    flush=True))
    result['scenarios'] = [r for r, s in zip(reports, scenarios) if not s.soak]
    result['soak'] = next((r for r, s in zip(reports, scenarios) if s.soak), None)
    result['server']['peak_rss_mb'] = peak_rss_mb(server.pid)
  finally:
    if server is not None:
      stop_server(server)
    shutil.rmtree(root, ignore_errors=True)
  result['machine']['load_avg_end'] = load_average()
  result['total_s'] = round(time.perf_counter() - t_start, 1)
  text = json.dumps(result, indent=1)
  print(text)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text + '\n')


def peak_rss_mb(pid: int) -> Optional[float]:
  with contextlib.suppress(OSError):
    with open(f'/proc/{pid}/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return round(int(line.split()[1]) / 1024, 1)
  return None


if __name__ == '__main__':
  main()
