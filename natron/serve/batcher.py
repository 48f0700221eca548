"""`MicroBatcher`: one worker thread that owns the model and stacks concurrent requests into one call.

See natron/serve/app.py's module docstring (Concurrency).
"""
from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
import time
from typing import Any, Optional

from absl import logging
import numpy as np


@dataclasses.dataclass
class _Job:
  ohlcv: np.ndarray     # float64 [B, R, 5] windows (merged with other jobs), or [N, 5] for `call`
  times: np.ndarray     # int64 [B] ns
  loop: asyncio.AbstractEventLoop
  future: asyncio.Future
  call: Optional[Any] = None   # a function of (ohlcv, times) run alone on the worker (series chunks)

  def size(self) -> int:
    """Windows this job adds to a merged model call; a `call` job is too big to merge with anything."""
    return len(self.ohlcv) if self.call is None else _NEVER_MERGES


_NEVER_MERGES = 1 << 62


def _resolve(future: asyncio.Future, result=None, error: Optional[BaseException] = None) -> None:
  if future.done():    # the client went away and its handler was cancelled
    return
  if error is not None:
    future.set_exception(error)
  else:
    future.set_result(result)


class MicroBatcher:
  """One worker thread that stacks queued requests into one `predictor.predict` call (see module doc)."""

  def __init__(self, predictor, *, max_wait_s: float = 0.001):
    self.predictor = predictor
    self.max_wait_s = max(float(max_wait_s), 0.0)
    self.max_windows = predictor.buckets[-1]
    self.calls = 0             # model calls made (tests check that concurrent requests were merged)
    self.windows = 0
    self._queue: queue.Queue = queue.Queue()
    self._carry: Optional[_Job] = None
    self._thread = threading.Thread(target=self._run, name='natron-batcher', daemon=True)
    self._thread.start()

  async def predict(self, ohlcv: np.ndarray, times: np.ndarray) -> dict:
    """ohlcv float64 [B, R, 5], times int64 [B] -> Predictor.finish dict for those B windows."""
    return await self._submit(ohlcv, times, None)

  async def run(self, call, ohlcv: np.ndarray, times: np.ndarray) -> dict:
    """Runs call(ohlcv, times) on the worker thread, alone (e.g. Predictor.predict_recent)."""
    return await self._submit(ohlcv, times, call)

  async def _submit(self, ohlcv, times, call) -> dict:
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    self._queue.put(_Job(ohlcv, times, loop, future, call))
    return await future

  def close(self) -> None:
    self._queue.put(None)
    self._thread.join(timeout=10)

  def _next_jobs(self) -> Optional[list[_Job]]:
    first = self._carry or self._queue.get()
    self._carry = None
    if first is None:
      return None
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
      jobs.append(job)
      size += job.size()
    return jobs

  def _run(self) -> None:
    while True:
      jobs = self._next_jobs()
      if jobs is None:
        return
      try:
        if jobs[0].call is not None:
          result = jobs[0].call(jobs[0].ohlcv, jobs[0].times)
          self.calls += 1
          self.windows += len(result['buy_prob'])
          _call_soon(jobs[0], result, None)
          continue
        pred = self.predictor.predict(np.concatenate([j.ohlcv for j in jobs]),
                                      times=np.concatenate([j.times for j in jobs]))
        self.calls += 1
        self.windows += sum(len(j.ohlcv) for j in jobs)
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
