"""The `features` phase: load the market, compute the feature matrix per symbol, write it with a summary.

Writes into `workdir/features/`:
- `features.npz`: features float32 [rows, F] (all symbols stacked in (symbol, time) order; rows < WARMUP of
  each symbol are NaN), names str [F], time datetime64[ns] (UTC) [rows], symbol str [rows];
- `features_summary.json`: F, counts per category, WARMUP, schema hash, rows / NaN-free rows per symbol,
  compute time (the first symbol's includes the jit compile), per-feature mean / std / min / max.

Multi-host (jax.distributed): every process computes the same matrix (so bad bars stop every process alike
and each returns the same summary); process 0 alone writes.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
import pandas as pd
from absl import logging

from natron import features as F
from natron.errors import UserError


def _options(config) -> dict:
  section = config.get('features', None) if hasattr(config, 'get') else None
  get = (lambda k, d: section.get(k, d)) if section is not None else (lambda k, d: d)
  return dict(save_matrix=bool(get('save_matrix', True)), check_finite=bool(get('check_finite', True)))


def feature_stats(x: np.ndarray, names) -> dict:
  """{name: {mean, std, min, max}} over the rows where every feature is finite."""
  valid = x[np.isfinite(x).all(axis=1)]
  if not len(valid):
    return {}
  stats = zip(names, valid.mean(0), valid.std(0), valid.min(0), valid.max(0))
  return {n: dict(mean=float(m), std=float(s), min=float(lo), max=float(hi)) for n, m, s, lo, hi in stats}


def run_phase(config, workdir: str) -> dict:
  """Computes the features of `load_market(config.data)` per symbol into workdir/features/; returns the summary."""
  from natron.data import load_market  # pylint: disable=g-import-not-at-top
  from natron.train import state as train_state  # pylint: disable=g-import-not-at-top
  opts = _options(config)
  out_dir = os.path.join(workdir, 'features')
  write = train_state.is_main_process()   # multi-host: process 0 alone writes
  if write:
    os.makedirs(out_dir, exist_ok=True)
  market = load_market(config.data)
  blocks, times, symbols, per_symbol = [], [], [], {}
  total_seconds = 0.0
  points = market.attrs.get('points') or {}    # {symbol: point} recorded by the loader; None: inferred
  for symbol, frame in market.groupby('symbol', sort=False):
    start = time.perf_counter()
    x, names = F.compute_features(frame, point=points.get(symbol))
    seconds = time.perf_counter() - start
    total_seconds += seconds
    finite_rows = np.isfinite(x).all(axis=1)
    after = finite_rows[F.WARMUP:]
    bad = int((~after).sum())
    if opts['check_finite'] and bad:
      first = F.WARMUP + int(np.flatnonzero(~after)[0])
      cols = [names[i] for i in np.flatnonzero(~np.isfinite(x[first]))]
      raise UserError(f'features of {symbol}: {bad} row(s) after the warm-up are not finite, first at row '
                      f'{first} ({frame["time"].iloc[first]}) in {cols[:5]}; check the input bars')
    if len(frame) <= F.WARMUP:
      logging.warning('features %s: %d bars <= WARMUP=%d, every row is NaN', symbol, len(frame), F.WARMUP)
    per_symbol[str(symbol)] = dict(rows=int(len(frame)), nan_free_rows=int(finite_rows.sum()),
                                   non_finite_after_warmup=bad, seconds=round(seconds, 3))
    logging.info('features %s: %d bars x %d features in %.2f s (%.0f bars/s, first call includes compile)',
                 symbol, len(frame), len(names), seconds, len(frame) / max(seconds, 1e-9))
    blocks.append(x)
    times.append(pd.to_datetime(frame['time'], utc=True).dt.tz_localize(None).to_numpy('datetime64[ns]'))
    symbols.append(np.full(len(frame), str(symbol)))
  x = np.concatenate(blocks) if blocks else np.zeros((0, F.NUM_FEATURES), np.float32)
  summary = dict(
      num_features=F.NUM_FEATURES, categories=dict(F.CATEGORY_COUNTS), warmup=F.WARMUP, lookback=F.LOOKBACK,
      features_version=F.FEATURES_VERSION, schema_hash=F.feature_schema_hash(), rows=int(len(x)),
      nan_free_rows=int(np.isfinite(x).all(axis=1).sum()), compute_seconds=round(total_seconds, 3),
      symbols=per_symbol)
  if opts['save_matrix']:
    path = os.path.join(out_dir, 'features.npz')
    if write:
      np.savez(path, features=x, names=np.array(F.FEATURE_NAMES), time=np.concatenate(times),
               symbol=np.concatenate(symbols))
    summary['path'] = path
  if write:
    with open(os.path.join(out_dir, 'features_summary.json'), 'w') as f:
      json.dump(dict(summary, feature_stats=feature_stats(x, F.FEATURE_NAMES)), f, indent=2)
  logging.info('features: %d rows x %d features (%s), WARMUP %d, %d NaN-free rows, %.2f s',
               summary['rows'], F.NUM_FEATURES,
               ', '.join(f'{k} {v}' for k, v in F.CATEGORY_COUNTS.items()), F.WARMUP, summary['nan_free_rows'],
               total_seconds)
  return summary
