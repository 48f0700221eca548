"""Decoding a model's probabilities into signals and the rows clients read.

`predict_fn` (natron.predictor) returns probabilities only; everything a person or an EA reads is made here:

- the signal rule: BUY iff buy_prob >= threshold and buy_prob > sell_prob; SELL iff sell_prob >= threshold
  and sell_prob > buy_prob; otherwise HOLD (a tie, or NaN, is HOLD). `confidence` = max(buy_prob, sell_prob),
  the number the rule compares with the threshold;
- the most probable direction and regime class, by name;
- `records` (the REST / WebSocket reply shape) and `table` (one CSV row per bar, the infer phase).

The same rule is written out in mt5/NatronEA.mq5 (`Decide`) and mirrored in tests/mt5_client.py.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping, Optional

import numpy as np
import pandas as pd

from natron.errors import UserError

SIGNALS = ('BUY', 'SELL', 'HOLD')
SIGNAL_RULE = ('BUY iff buy_prob >= threshold and buy_prob > sell_prob; SELL iff sell_prob >= threshold and '
               'sell_prob > buy_prob; else HOLD. confidence = max(buy_prob, sell_prob).')
# What predict_fn returns, in this order (the ONNX model's outputs and natron.json's `outputs`).
PROBABILITIES = ('buy_prob', 'sell_prob', 'direction_probs', 'regime_probs')


def signal_rule(buy_prob, sell_prob, threshold: float) -> np.ndarray:
  """BUY / SELL / HOLD per row (see the module docstring); NaN probabilities give HOLD."""
  buy_prob, sell_prob = np.asarray(buy_prob), np.asarray(sell_prob)
  buy = (buy_prob >= threshold) & (buy_prob > sell_prob)
  sell = (sell_prob >= threshold) & (sell_prob > buy_prob)
  return np.where(buy, 'BUY', np.where(sell, 'SELL', 'HOLD')).astype(object)


@dataclasses.dataclass(frozen=True)
class Decoder:
  """Turns probability arrays into named classes, signals, reply records and tables."""
  threshold: float
  directions: tuple[str, ...]
  regimes: tuple[str, ...]
  model_version: str = 'unknown'

  @classmethod
  def from_meta(cls, meta: Mapping, threshold: Optional[float] = None) -> 'Decoder':
    """The bundle's classes and signal threshold (meta['thresholds']['signal']) unless `threshold` is given."""
    from natron.labels import DIRECTIONS, REGIMES   # pylint: disable=g-import-not-at-top
    classes = meta.get('label_classes', {})
    if threshold is None:
      threshold = float(meta.get('thresholds', {}).get('signal', 0.6))
    return cls(float(threshold), tuple(classes.get('direction', DIRECTIONS)), tuple(classes.get('regime', REGIMES)),
               str(meta.get('model_version', 'unknown')))

  def finish(self, raw: Mapping[str, np.ndarray], times=None, valid=None) -> dict:
    """Adds the decoded outputs (valid, direction, regime, regime_confidence, confidence, signal, time) to the
    probabilities `raw` ({buy_prob [N], sell_prob [N], direction_probs [N, 3], regime_probs [N, 6], ...})."""
    out = {k: np.asarray(v) for k, v in raw.items()}
    n = out['buy_prob'].shape[0]
    finite = (np.isfinite(out['buy_prob']) & np.isfinite(out['sell_prob'])
              & np.isfinite(out['direction_probs']).all(-1) & np.isfinite(out['regime_probs']).all(-1))
    out['valid'] = finite if valid is None else (finite & np.asarray(valid, bool))
    direction = np.argmax(np.nan_to_num(out['direction_probs'], nan=-1.0), axis=-1)
    regime = np.argmax(np.nan_to_num(out['regime_probs'], nan=-1.0), axis=-1)
    out['direction'] = np.asarray(self.directions, object)[direction]
    out['regime'] = np.asarray(self.regimes, object)[regime]
    out['regime_confidence'] = np.max(out['regime_probs'], axis=-1)
    out['confidence'] = np.maximum(out['buy_prob'], out['sell_prob'])
    out['signal'] = signal_rule(out['buy_prob'], out['sell_prob'], self.threshold)
    out['signal'][~out['valid']] = 'HOLD'
    if times is not None:
      out['time'] = as_ns(times)
      if out['time'].shape != (n,):
        raise UserError(f'times has shape {out["time"].shape}, expected ({n},).')
    return out

  def records(self, pred: Mapping[str, np.ndarray], rows: Optional[Iterable[int]] = None) -> list[dict]:
    """JSON-able dicts (the REST/WebSocket reply shape) for `rows` (default all) of a finished prediction."""
    idx = np.arange(len(pred['buy_prob'])) if rows is None else np.asarray(list(rows), np.int64)
    if 'time' in pred:
      ns = pred['time'][idx]
      iso = [s + 'Z' for s in np.datetime_as_string(ns.astype('datetime64[ns]'), unit='s').tolist()]
      stamps = (ns // 1_000_000_000).tolist()
    else:
      iso, stamps = [None] * len(idx), [None] * len(idx)
    dprobs = pred['direction_probs'][idx].tolist()
    rprobs = pred['regime_probs'][idx].tolist()
    columns = zip(iso, stamps, pred['buy_prob'][idx].tolist(), pred['sell_prob'][idx].tolist(),
                  pred['direction'][idx].tolist(), dprobs, pred['regime'][idx].tolist(),
                  pred['regime_confidence'][idx].tolist(), rprobs, pred['signal'][idx].tolist(),
                  pred['confidence'][idx].tolist())
    return [{
        'time': t, 'timestamp': ts, 'buy_prob': bp, 'sell_prob': sp, 'direction': d,
        'direction_probs': dict(zip(self.directions, dp)), 'regime': r, 'regime_confidence': rc,
        'regime_probs': dict(zip(self.regimes, rp)), 'signal': s, 'confidence': c,
        'threshold': self.threshold, 'model_version': self.model_version,
    } for t, ts, bp, sp, d, dp, r, rc, rp, s, c in columns]

  def table(self, pred: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """One row per bar: time, valid, buy/sell probs, direction (+ probs), regime (+ probs), signal..."""
    columns = {}
    if 'time' in pred:
      columns['time'] = pd.to_datetime(pred['time'], utc=True)
    columns['valid'] = pred['valid']
    columns['buy_prob'] = pred['buy_prob']
    columns['sell_prob'] = pred['sell_prob']
    columns['direction'] = np.where(pred['valid'], pred['direction'], '')
    for j, name in enumerate(self.directions):
      columns[f'prob_{name}'] = pred['direction_probs'][:, j]
    columns['regime'] = np.where(pred['valid'], pred['regime'], '')
    columns['regime_confidence'] = pred['regime_confidence']
    for j, name in enumerate(self.regimes):
      columns[f'prob_{name}'] = pred['regime_probs'][:, j]
    columns['signal'] = pred['signal']
    columns['confidence'] = pred['confidence']
    columns['model_version'] = self.model_version
    return pd.DataFrame(columns)


def as_ns(times) -> np.ndarray:
  """Bar times (datetime64 any unit/tz, pandas, or int64 ns) -> int64 ns since the epoch (UTC)."""
  if isinstance(times, pd.Index):
    return pd.to_datetime(times, utc=True).asi8
  if isinstance(times, pd.Series):
    return pd.DatetimeIndex(pd.to_datetime(times, utc=True)).asi8
  times = np.asarray(times)
  if np.issubdtype(times.dtype, np.datetime64):
    return times.astype('datetime64[ns]').astype(np.int64)
  if times.dtype == object:
    return pd.DatetimeIndex(pd.to_datetime(times, utc=True)).asi8
  return times.astype(np.int64)
