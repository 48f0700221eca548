"""`MicroBatcher`: one worker thread that owns the model and stacks concurrent requests into one call.

See natron/serve/app.py's module docstring (Concurrency). Backpressure: every job has a deadline. A job
whose expected completion (the model time of the windows queued before it, measured per bucket, plus its
own) is past its deadline while work is ahead of it, or that would put more than `max_queue` windows in
the queue, is refused at once (HttpError 503 'overloaded', Retry-After: the expected drain time); an idle
worker takes any job, so an estimate inflated by one slow call is measured again, not trusted for ever. The worker drops jobs whose deadline
passed while queued (503) and skips jobs nobody waits for any more (the handler was cancelled: the client
disconnected). A waiter never waits past its deadline plus `GRACE_S`. If the worker dies (anything escaping
the loop, BaseException included), queued and later jobs get 503 'unavailable' at once and `failure` says
why; it is not restarted (run the server under a supervisor).
"""
from __future__ import annotations

import asyncio
import dataclasses
import math
import queue
import threading
import time
from typing import Any, Optional

from absl import logging
import numpy as np

from natron.serve.guard import HttpError

GRACE_S = 0.25      # a waiter waits this long past its deadline for a call the worker already started
STALLED_S = 30.0    # one model call running longer than this: health reports the worker as failed
_EWMA = 0.2         # weight of the newest call in the per-bucket service-time estimate
_SERIES = 'series'  # the cost key of `call` jobs (series chunks)


@dataclasses.dataclass
class _Job:
  ohlcv: np.ndarray     # float64 [B, R, 5] windows (merged with other jobs), or [N, 5] for `call`
  times: np.ndarray     # int64 [B] ns
  loop: asyncio.AbstractEventLoop
  future: asyncio.Future
  call: Optional[Any] = None   # a function of (ohlcv, times) run alone on the worker (series chunks)
  deadline: float = math.inf   # time.monotonic() by which the answer is due
  windows: int = 0             # queue accounting: windows, or bars of a `call` job

  def size(self) -> int:
    """Windows this job adds to a merged model call; a `call` job is too big to merge with anything."""
    return len(self.ohlcv) if self.call is None else _NEVER_MERGES


_NEVER_MERGES = 1 << 62


def _resolve(future: asyncio.Future, result=None, error: Optional[BaseException] = None) -> None:
  if future.done():    # the client went away and its handler was cancelled, or the waiter timed out
    return
  if error is not None:
    future.set_exception(error)
  else:
    future.set_result(result)


def overloaded(message: str, retry_after_s: float) -> HttpError:
  return HttpError(503, 'overloaded', message, {'Retry-After': str(max(1, math.ceil(retry_after_s)))})


class MicroBatcher:
  """One worker thread that stacks queued requests into one `predictor.predict` call (see module doc)."""

  def __init__(self, predictor, *, max_wait_s: float = 0.001, timeout_s: float = 1.5, max_queue: int = 1024):
    self.predictor = predictor
    self.max_wait_s = max(float(max_wait_s), 0.0)
    self.timeout_s = float(timeout_s)   # the deadline of a job submitted without one
    self.max_queue = int(max_queue)
    self.max_windows = predictor.buckets[-1]
    self.calls = 0             # model calls made (tests check that concurrent requests were merged)
    self.windows = 0
    self.refused = 0           # jobs refused at submit (queue full or deadline out of reach)
    self.expired = 0           # jobs dropped by the worker: their deadline passed while queued
    self.skipped = 0           # jobs dropped by the worker: nobody waits for them any more
    self.failure: Optional[str] = None   # why the worker stopped (None while it runs)
    self._lock = threading.Lock()        # guards the queue accounting, the cost estimates and `failure`
    self._queued_windows = 0
    self._queued_calls = 0
    self._cost: dict[Any, float] = {}    # bucket (or _SERIES) -> EWMA seconds per model call
    self._busy: Optional[tuple[float, float]] = None   # (start, expected seconds) of the running call
    self._queue: queue.Queue = queue.Queue()
    self._carry: Optional[_Job] = None
    self._thread = threading.Thread(target=self._run, name='natron-batcher', daemon=True)
    self._thread.start()

  async def predict(self, ohlcv: np.ndarray, times: np.ndarray, *, deadline: Optional[float] = None) -> dict:
    """ohlcv float64 [B, R, 5], times int64 [B] -> Predictor.finish dict for those B windows."""
    return await self._submit(ohlcv, times, None, deadline)

  async def run(self, call, ohlcv: np.ndarray, times: np.ndarray, *, deadline: Optional[float] = None) -> dict:
    """Runs call(ohlcv, times) on the worker thread, alone (e.g. Predictor.predict_recent)."""
    return await self._submit(ohlcv, times, call, deadline)

  # --- admission -----------------------------------------------------------------------------------------
  def _call_cost(self, key) -> float:
    """Estimated seconds of one model call of bucket `key` (or a series chunk); 0 before any is measured,
    an unmeasured bucket is costed like the dearest one measured."""
    cost = self._cost.get(key)
    return cost if cost is not None else max(self._cost.values(), default=0.0)

  def _bucket(self, windows: int) -> int:
    return next((b for b in self.predictor.buckets if b >= windows), self.max_windows)

  def _drain_s(self, windows: int, calls: int, now: float) -> float:
    """Expected seconds until `windows` queued windows and `calls` series chunks are done (lock held)."""
    full, rest = divmod(windows, self.max_windows)
    seconds = full * self._call_cost(self.max_windows) + (self._call_cost(self._bucket(rest)) if rest else 0.0)
    seconds += calls * self._call_cost(_SERIES)
    if self._busy is not None:
      seconds += max(0.0, self._busy[0] + self._busy[1] - now)
    return seconds

  def expected_wait_s(self) -> float:
    """Expected seconds until everything queued now is done."""
    with self._lock:
      return self._drain_s(self._queued_windows, self._queued_calls, time.monotonic())

  def state(self) -> dict:
    """Counters and queue for /health and tests."""
    with self._lock:
      busy_s = time.monotonic() - self._busy[0] if self._busy is not None else 0.0
      return {'alive': self._thread.is_alive() and self.failure is None, 'failure': self.failure,
              'busy_s': round(busy_s, 3), 'queued_windows': self._queued_windows, 'queued_calls': self._queued_calls,
              'calls': self.calls, 'windows': self.windows, 'refused': self.refused, 'expired': self.expired,
              'skipped': self.skipped}

  def _admit(self, job: _Job, now: float) -> None:
    """Queues `job` or raises HttpError 503 (lock held)."""
    if self.failure is not None or not self._thread.is_alive():
      raise HttpError(503, 'unavailable', 'The model worker has stopped '
                      f'({self.failure or "thread gone"}); the server needs a restart.')
    calls = 1 if job.call is not None else 0
    windows = 0 if calls else job.windows
    expected = self._drain_s(self._queued_windows + windows, self._queued_calls + calls, now)
    if self._queued_windows + self._queued_calls + job.windows > self.max_queue and (
        self._queued_windows or self._queued_calls):
      self.refused += 1
      raise overloaded(f'{self._queued_windows + self._queued_calls} windows are waiting for the model (max_queue '
                       f'{self.max_queue}); retry shortly.', expected)
    # Only work ahead of it can make a job late; an idle worker always takes it (so an estimate inflated by
    # one slow call is measured again instead of refusing everything for ever).
    ahead = self._queued_windows or self._queued_calls or self._busy is not None
    if ahead and now + expected > job.deadline:
      self.refused += 1
      raise overloaded(f'The model is busy: an answer would take about {expected * 1000:.0f} ms, past this request\'s '
                       f'deadline ({(job.deadline - now) * 1000:.0f} ms left); retry shortly.', expected)
    self._queued_windows += windows
    self._queued_calls += calls
    self._queue.put(job)

  async def _submit(self, ohlcv, times, call, deadline: Optional[float]) -> dict:
    loop = asyncio.get_running_loop()
    now = time.monotonic()
    deadline = now + self.timeout_s if deadline is None else deadline
    windows = len(ohlcv) if call is None else max(1, len(ohlcv) - self.predictor.required_candles + 1)
    job = _Job(ohlcv, times, loop, loop.create_future(), call, deadline, windows)
    with self._lock:
      self._admit(job, now)
    try:
      # Cancelling this (the client disconnected) or timing out cancels the future: the worker skips it.
      return await asyncio.wait_for(job.future, timeout=max(0.0, deadline - time.monotonic()) + GRACE_S)
    except asyncio.TimeoutError:
      raise overloaded('No answer within this request\'s deadline; the model is busy or stalled.',
                       self.expected_wait_s()) from None

  def close(self) -> None:
    self._queue.put(None)
    self._thread.join(timeout=10)
    with self._lock:
      if self.failure is None:
        self.failure = 'closed (the server is shutting down)'
    self._fail_queued()

  # --- worker --------------------------------------------------------------------------------------------
  def _dequeued(self, job: _Job) -> None:
    with self._lock:
      if job.call is None:
        self._queued_windows -= job.windows
      else:
        self._queued_calls -= 1

  def _next_jobs(self) -> Optional[list[_Job]]:
    first = self._carry or self._queue.get()
    self._carry = None
    if first is None:
      return None
    self._dequeued(first)
    jobs, size = [first], first.size()
    deadline = time.monotonic() + self.max_wait_s
    while size < self.max_windows:
      remaining = deadline - time.monotonic()
      try:
        job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
      except queue.Empty:
        break
      if job is None or size + job.size() > self.max_windows:
        self._carry = job     # too big to join (or the stop signal): it goes first next time
        if job is None:
          self._queue.put(None)
          self._carry = None
        break
      self._dequeued(job)
      jobs.append(job)
      size += job.size()
    return jobs

  def _live(self, jobs: list[_Job]) -> list[_Job]:
    """Drops jobs nobody waits for (skipped) and jobs past their deadline (expired: 503 to the waiter)."""
    now, live = time.monotonic(), []
    for job in jobs:
      if job.future.done():   # cancelled: the handler went away (a read of a flag; set on the loop's thread)
        self.skipped += 1
      elif now > job.deadline:
        self.expired += 1
        _call_soon(job, None, overloaded('The request waited past its deadline for the model; retry shortly.',
                                         self.expected_wait_s()))
      else:
        live.append(job)
    return live

  def _timed(self, key, function):
    start = time.monotonic()
    with self._lock:
      self._busy = (start, self._call_cost(key))
    try:
      return function()
    finally:
      seconds = time.monotonic() - start
      with self._lock:
        self._busy = None
        old = self._cost.get(key)
        self._cost[key] = seconds if old is None else (1 - _EWMA) * old + _EWMA * seconds

  def _run(self) -> None:
    jobs: list[_Job] = []
    try:
      while True:
        jobs = self._next_jobs()
        if jobs is None:
          return
        jobs = self._live(jobs)
        if jobs:
          self._call(jobs)
        jobs = []
    except BaseException as e:   # pylint: disable=broad-except
      # Whatever killed the loop (a bug, a BaseException from the model): say so, and answer everyone.
      logging.exception('natron batcher: the worker stopped')
      with self._lock:
        self.failure = f'{type(e).__name__}: {e}'[:200]
      error = HttpError(503, 'unavailable', f'The model worker has stopped ({self.failure}); the server needs a '
                                            'restart.')
      for job in jobs:
        _call_soon(job, None, error)
      self._fail_queued()

  def _fail_queued(self) -> None:
    """Answers every queued job with 503 (after the worker stopped; new jobs are refused under the lock)."""
    error = HttpError(503, 'unavailable', f'The model worker has stopped ({self.failure}).')
    pending = [self._carry] if self._carry is not None else []
    self._carry = None
    with self._lock:
      while True:
        try:
          pending.append(self._queue.get_nowait())
        except queue.Empty:
          break
      self._queued_windows = self._queued_calls = 0
    for job in pending:
      if job is not None:
        _call_soon(job, None, error)

  def _call(self, jobs: list[_Job]) -> None:
    try:
      if jobs[0].call is not None:
        job = jobs[0]
        result = self._timed(_SERIES, lambda: job.call(job.ohlcv, job.times))
        self.calls += 1
        self.windows += len(result['buy_prob'])
        _call_soon(jobs[0], result, None)
        return
      ohlcv = np.concatenate([j.ohlcv for j in jobs])
      times = np.concatenate([j.times for j in jobs])
      pred = self._timed(self._bucket(len(ohlcv)), lambda: self.predictor.predict(ohlcv, times=times))
      self.calls += 1
      self.windows += len(ohlcv)
      start = 0
      for job in jobs:
        stop = start + len(job.ohlcv)
        part = {k: v[start:stop] for k, v in pred.items()}
        start = stop
        _call_soon(job, part, None)
    except Exception as e:   # pylint: disable=broad-except
      logging.exception('natron batcher: model call failed')
      for job in jobs:
        _call_soon(job, None, e)


def _call_soon(job: _Job, result, error) -> None:
  try:
    job.loop.call_soon_threadsafe(_resolve, job.future, result, error)
  except RuntimeError:   # that request's event loop has closed: nobody is waiting any more
    pass
