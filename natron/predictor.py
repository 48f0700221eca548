"""Predictions from a fine-tuned bundle: raw OHLCV candles in, every head's probabilities out.

Two paths, one set of numbers (DESIGN.md rule 6, train/serve parity):

- `Predictor.predict(candles [B, N, 5])` (serving): ONE jitted function maps raw windows to outputs:
      candles [B, R, 5] -> vmap(compute_features_jax) [B, R, F] -> last `window` rows -> scaler -> model
      (train=False) -> softmax probabilities + pooled embedding,
  where R = `required_candles` = window + feature warm-up. It is compiled ahead of time for a few batch-size
  buckets (default 1, 8, 32, 128) when the Predictor is built; a request is padded up to the smallest bucket
  that holds it (larger ones are split), so no request ever triggers a compile (`trace_count` proves it).
- `Predictor.predict_recent(candles [N, 5])` (the server's /batch_predict series mode): the prediction /predict
  would give at every bar t >= R - 1, computed in compiled chunks of `series_chunk` (default 128) consecutive
  windows that share one feature computation over R + chunk - 1 candles (also compiled at start-up).
- `Predictor.predict_series(frame)` (batch inference, RL, backtests): features once over the whole series with
  the training code (`natron.features.compute_features`, then `natron.dataset.apply_scaler`), then the model
  over every window ending at bar t >= R - 1, in fixed-size jitted batches. Bars before R - 1 have no
  prediction (NaN probabilities, signal HOLD, valid False).

The signal rule (both paths, `signal_rule`): BUY iff buy_prob >= threshold and buy_prob > sell_prob; SELL iff
sell_prob >= threshold and sell_prob > buy_prob; otherwise HOLD (so a tie, or NaN, is HOLD).
`confidence` = max(buy_prob, sell_prob), the number the rule compares with the threshold. The threshold comes
from the bundle (meta['thresholds']['signal']) unless the caller overrides it.

`run_phase(config, workdir)` is the batch-inference CLI (configs/infer.py): one output row per input bar.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import time as time_lib
from typing import Any, Iterable, Mapping, Optional, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from natron import checkpoint
from natron.data import grid
from natron.errors import UserError
from natron.model import NatronModel

DEFAULT_BUCKETS = (1, 8, 32, 128)
DEFAULT_SERIES_CHUNK = 128
OHLCV = ('open', 'high', 'low', 'close', 'volume')
SIGNALS = ('BUY', 'SELL', 'HOLD')


class TooFewCandles(UserError):
  """A window shorter than `required_candles`."""


def signal_rule(buy_prob, sell_prob, threshold: float) -> np.ndarray:
  """BUY / SELL / HOLD per row (see the module docstring); NaN probabilities give HOLD."""
  buy_prob, sell_prob = np.asarray(buy_prob), np.asarray(sell_prob)
  buy = (buy_prob >= threshold) & (buy_prob > sell_prob)
  sell = (sell_prob >= threshold) & (sell_prob > buy_prob)
  return np.where(buy, 'BUY', np.where(sell, 'SELL', 'HOLD')).astype(object)


def resolve_bundle(path: str) -> str:
  """A bundle directory, or a workdir holding one at finetune/bundle."""
  for candidate in (os.path.join(path, 'finetune', 'bundle'), path):
    if checkpoint.is_bundle(candidate):
      return candidate
  raise checkpoint.CheckpointError(
      f'No Natron bundle at {path!r} nor at {os.path.join(path, "finetune", "bundle")!r}: pass a bundle '
      'directory or the workdir of a finished finetune phase.')


def _softmax_heads(out: Mapping[str, jax.Array]) -> dict:
  """Model logits -> probabilities (float32) + the pooled embedding."""
  return {
      'buy_prob': jax.nn.softmax(out['buy'], axis=-1)[:, 1],
      'sell_prob': jax.nn.softmax(out['sell'], axis=-1)[:, 1],
      'direction_probs': jax.nn.softmax(out['direction'], axis=-1),
      'regime_probs': jax.nn.softmax(out['regime'], axis=-1),
      'encoded': out['encoded'],
  }


def candles_in_points(candles: np.ndarray, point: Optional[float] = None) -> np.ndarray:
  """Raw candles [..., N, 5] (prices in price units) -> float32 with the four prices in points (exact integers).

  The feature graph differences and compares price levels, which float32 holds exactly only as grid integers
  (natron.data.grid). `point`: the instrument's price increment; None infers it per series (window) from its
  quotes' decimals, which gives the same features (they are scale-free). Raises GridError off the grid.
  """
  candles = np.asarray(candles)
  if candles.dtype not in (np.float32, np.float64):
    candles = candles.astype(np.float64)
  out = np.empty(candles.shape, np.float32)
  out[..., 4] = candles[..., 4]
  series = candles.reshape((-1,) + candles.shape[-2:])
  target = out.reshape((-1,) + out.shape[-2:])
  for i, one in enumerate(series):
    prices = one[:, :4]
    target[i, :, :4] = grid.to_ticks(prices, grid.infer_point(prices) if point is None else point)
  return out


def _features_jax(candles: jax.Array) -> jax.Array:
  """candles float32 [R, 5] (open, high, low, close in POINTS, volume) -> features float32 [R, F]."""
  from natron.features import compute_features_jax   # pylint: disable=g-import-not-at-top
  return compute_features_jax(*(candles[:, i] for i in range(5)))


def _scale(features, scaler):
  from natron.dataset import apply_scaler   # pylint: disable=g-import-not-at-top
  return apply_scaler(features, scaler)


@dataclasses.dataclass
class Predictor:
  """Serving-time model: see the module docstring. Build with `Predictor.load(path)`."""
  params: Any
  meta: dict
  buckets: tuple[int, ...] = DEFAULT_BUCKETS
  threshold: Optional[float] = None
  series_batch: int = 128
  series_chunk: int = DEFAULT_SERIES_CHUNK

  def __post_init__(self):
    meta = self.meta
    self.window = int(meta['window'])
    self.warmup = int(meta['warmup'])
    self.required_candles = int(meta['required_candles'])
    if self.required_candles != self.window + self.warmup:
      raise checkpoint.CheckpointError(
          f'Bundle meta is inconsistent: required_candles {self.required_candles} != window {self.window} + '
          f'warmup {self.warmup}.')
    self.feature_names = list(meta['feature_names'])
    self.model_version = str(meta.get('model_version', 'unknown'))
    if self.threshold is None:
      self.threshold = float(meta.get('thresholds', {}).get('signal', 0.6))
    self.threshold = float(self.threshold)
    classes = meta.get('label_classes', {})
    from natron.labels import DIRECTIONS, REGIMES   # pylint: disable=g-import-not-at-top
    self.directions = tuple(classes.get('direction', DIRECTIONS))
    self.regimes = tuple(classes.get('regime', REGIMES))
    self.buckets = tuple(sorted({int(b) for b in self.buckets}))
    if self.buckets and self.buckets[0] < 1:
      raise UserError(f'Batch buckets must be positive integers, got {self.buckets}.')
    self.series_chunk = int(self.series_chunk)
    model_config = dict(meta['config']['model'])
    model_config['dropout'] = 0.0      # inference: dropout is off anyway (train=False); keep it explicit
    self._model = NatronModel(model_config)
    self._scaler = dict(meta['scaler'], center=np.asarray(meta['scaler']['center'], np.float32),
                        scale=np.asarray(meta['scaler']['scale'], np.float32))
    self._device_params = jax.device_put(self.params)
    self.trace_count = 0    # Python side effect of tracing: grows only when something compiles
    self.compile_seconds = self._compile_buckets()
    self._series_fn = jax.jit(self._series_forward)

  # --- Construction -------------------------------------------------------------------------------------
  @classmethod
  def load(cls, path: str, *, buckets: Sequence[int] = DEFAULT_BUCKETS, threshold: Optional[float] = None,
           check_schema: bool = True, series_batch: int = 128,
           series_chunk: int = DEFAULT_SERIES_CHUNK) -> 'Predictor':
    """Restores the bundle at `path` (a bundle dir, or a workdir with finetune/bundle) and compiles.

    buckets: batch sizes of the window path compiled now (() compiles none: predict() is then unusable).
    series_chunk: windows per compiled call of `predict_recent` (0: not compiled).
    """
    bundle = resolve_bundle(path)
    params, meta = checkpoint.load_bundle(bundle)
    if check_schema:
      checkpoint.check_feature_schema(meta)
    predictor = cls(params, meta, buckets=tuple(buckets), threshold=threshold, series_batch=series_batch,
                    series_chunk=series_chunk)
    predictor.bundle_dir = bundle
    return predictor

  def _window_forward(self, params, candles):
    """candles float32 [B, R, 5] -> probabilities dict (see _softmax_heads). Traced once per bucket."""
    self.trace_count += 1
    features = jax.vmap(_features_jax)(candles)[:, -self.window:]   # [B, W, F]
    x = _scale(features, self._scaler).astype(jnp.float32)
    return _softmax_heads(self._model.apply({'params': params}, x, train=False))

  def _chunk_forward(self, params, candles):
    """candles float32 [R + C - 1, 5] -> outputs for the C windows ending at rows R - 1 .. R + C - 2.

    Features are computed once over the chunk, so C consecutive bars cost about one window's features; every
    window still sees >= R candles of history, the /predict guarantee (parity to float32 rounding).
    """
    self.trace_count += 1
    x = _scale(_features_jax(candles), self._scaler).astype(jnp.float32)       # [R + C - 1, F]
    starts = jnp.arange(self.series_chunk) + (self.required_candles - self.window)
    windows = jax.vmap(lambda s: jax.lax.dynamic_slice_in_dim(x, s, self.window))(starts)   # [C, W, F]
    return _softmax_heads(self._model.apply({'params': params}, windows, train=False))

  def _compile_buckets(self) -> float:
    """Ahead-of-time compiles every bucket of the window path (and the series chunk), in parallel threads
    (XLA compiles outside the GIL); returns the wall seconds it took."""
    start = time_lib.perf_counter()
    jobs = {('window', b): (jax.jit(self._window_forward),
                            jax.ShapeDtypeStruct((b, self.required_candles, 5), jnp.float32))
            for b in self.buckets}
    if self.series_chunk > 0:
      jobs[('chunk', self.series_chunk)] = (jax.jit(self._chunk_forward), jax.ShapeDtypeStruct(
          (self.required_candles + self.series_chunk - 1, 5), jnp.float32))
    # Lower serially (tracing is Python and bumps trace_count), compile concurrently.
    lowered = {key: fn.lower(self._device_params, spec) for key, (fn, spec) in jobs.items()}
    with concurrent.futures.ThreadPoolExecutor(max(1, min(len(lowered), os.cpu_count() or 1))) as pool:
      compiled = dict(zip(lowered, pool.map(lambda low: low.compile(), lowered.values())))
    self._compiled = {b: compiled[('window', b)] for b in self.buckets}
    self._chunk = compiled.get(('chunk', self.series_chunk))
    return time_lib.perf_counter() - start

  # --- Window path (serving) ----------------------------------------------------------------------------
  def _run_bucketed(self, candles: np.ndarray) -> dict:
    """candles float32 [B, R, 5] -> dict of numpy outputs [B, ...], in bucket-sized compiled calls."""
    largest = self.buckets[-1]
    parts = []
    for start in range(0, candles.shape[0], largest):
      chunk = candles[start:start + largest]
      n = chunk.shape[0]
      bucket = next(b for b in self.buckets if b >= n)
      if bucket > n:
        # Pad with copies of a real window: valid candles keep the padded rows finite and cheap.
        chunk = np.concatenate([chunk, np.broadcast_to(chunk[-1:], (bucket - n,) + chunk.shape[1:])])
      out = self._compiled[bucket](self._device_params, chunk)
      parts.append(jax.tree.map(lambda a, n=n: np.asarray(a)[:n], out))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def predict(self, candles, times=None, point: Optional[float] = None) -> dict:
    """Predictions for windows of raw candles.

    candles: float [B, N, 5] or [N, 5] (open, high, low, close, volume; oldest first; prices in price units on
      the quote grid: float64 keeps any grid exact, float32 only below ~2**22 points), N >= required_candles
      (only the last required_candles are used). times: optional [B] bar times of the last candles (any
      numpy/pandas datetime, or int64 ns). point: the price increment (None: inferred per window).
      Returns `finish(...)`'s dict of numpy arrays, one row per window.
    """
    candles = np.asarray(candles)
    if candles.ndim == 2:
      candles = candles[None]
    if candles.ndim != 3 or candles.shape[-1] != 5:
      raise UserError(f'Expected candles [batch, candles, 5] (open, high, low, close, volume), got shape '
                      f'{candles.shape}.')
    if candles.shape[1] < self.required_candles:
      raise TooFewCandles(
          f'{candles.shape[1]} candles per window is too few: this model needs {self.required_candles} '
          f'(window {self.window} + feature warm-up {self.warmup}).')
    if candles.shape[0] == 0:
      raise UserError('No windows to predict.')
    if not self.buckets:
      raise UserError('This Predictor was built without batch buckets; load it with buckets=(1, ...).')
    raw = self._run_bucketed(candles_in_points(candles[:, -self.required_candles:], point))
    return self.finish(raw, times=times)

  def predict_recent(self, candles, times=None, point: Optional[float] = None) -> dict:
    """Predictions for every bar t >= R - 1 of one series of raw candles [N, 5] -> N - R + 1 rows.

    Row k is the prediction for bar R - 1 + k, from the R candles ending there (what /predict would return,
    to float32 rounding), computed in compiled chunks of `series_chunk` windows: no compile per request.
    times: optional [N] bar times (row k gets times[R - 1 + k]). point: as in `predict` (one per series).
    """
    if self._chunk is None:
      raise UserError('This Predictor was built with series_chunk=0; predict_recent is unavailable.')
    candles = np.asarray(candles)
    r, c = self.required_candles, self.series_chunk
    if candles.ndim != 2 or candles.shape[1] != 5:
      raise UserError(f'Expected one series of candles [N, 5], got shape {candles.shape}.')
    if len(candles) < r:
      raise TooFewCandles(f'{len(candles)} candles is too few: this model needs {r} (window {self.window} + '
                          f'feature warm-up {self.warmup}) for one prediction.')
    n_out = len(candles) - r + 1
    candles = candles_in_points(candles, point)
    parts = []
    for start in range(0, n_out, c):
      chunk = candles[start:start + r + c - 1]
      n = min(c, n_out - start)
      if len(chunk) < r + c - 1:   # pad at the END: features are causal, so real rows are unaffected
        chunk = np.concatenate([chunk, np.broadcast_to(chunk[-1:], (r + c - 1 - len(chunk), 5))])
      out = self._chunk(self._device_params, chunk)
      parts.append(jax.tree.map(lambda a, n=n: np.asarray(a)[:n], out))
    raw = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    if times is not None:
      times = _as_ns(times)[r - 1:]
    return self.finish(raw, times=times)

  def finish(self, raw: Mapping[str, np.ndarray], times=None, valid=None) -> dict:
    """Adds the decoded outputs (direction, regime, signal, confidence, time) to raw probabilities."""
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
      out['time'] = _as_ns(times)
      if out['time'].shape != (n,):
        raise UserError(f'times has shape {out["time"].shape}, expected ({n},).')
    return out

  # --- Series path (batch inference, RL, backtests) -----------------------------------------------------
  def _series_forward(self, params, scaled, ends):
    """scaled float32 [T, F], ends int32 [S] (window-end rows) -> probabilities for those S windows."""
    windows = jax.vmap(lambda e: jax.lax.dynamic_slice_in_dim(scaled, e - self.window + 1, self.window))(ends)
    return _softmax_heads(self._model.apply({'params': params}, windows, train=False))

  def series_features(self, frame, point: Optional[float] = None) -> np.ndarray:
    """Scaled features float32 [T, F] of a whole series, exactly as natron.dataset computes them.

    point: the price increment; None: the frame's attrs['point'] (set by natron.data), else inferred.
    """
    from natron.features import compute_features   # pylint: disable=g-import-not-at-top
    if point is None and hasattr(frame, 'attrs'):
      point = frame.attrs.get('point')
    features, names = compute_features({k: np.asarray(_column(frame, k), np.float64) for k in OHLCV},
                                       point=point)
    if list(names) != self.feature_names:
      raise checkpoint.CheckpointError('The feature names computed now differ from the bundle\'s; the '
                                       'feature schema changed since training.')
    return np.asarray(_scale(np.asarray(features, np.float32), self._scaler), np.float32)

  def predict_series(self, frame, *, with_encoded: bool = True, progress: bool = False,
                     desc: str = 'predict') -> dict:
    """Per-bar predictions for a long series (DataFrame or mapping with open..volume [, time]).

    Returns finish()'s dict with arrays of length T (+ 'encoded' float32 [T, d_model] when asked); rows
    t < required_candles - 1 have NaN probabilities, signal HOLD and valid False.
    """
    n_bars = len(_column(frame, 'close'))
    if n_bars < self.required_candles:
      raise TooFewCandles(f'{n_bars} bars is too few: this model needs at least {self.required_candles} '
                          f'(window {self.window} + feature warm-up {self.warmup}) for one prediction.')
    scaled = jax.device_put(self.series_features(frame))
    ends = np.arange(self.required_candles - 1, n_bars, dtype=np.int32)
    batch = self.series_batch
    chunks = []
    iterator = range(0, len(ends), batch)
    if progress:
      from tqdm.auto import tqdm   # pylint: disable=g-import-not-at-top
      iterator = tqdm(iterator, desc=desc, unit='batch', total=-(-len(ends) // batch))
    for start in iterator:
      chunk = ends[start:start + batch]
      n = len(chunk)
      if n < batch:   # fixed shape: pad with the last end so the jitted batch never recompiles
        chunk = np.concatenate([chunk, np.full(batch - n, chunk[-1], np.int32)])
      out = self._series_fn(self._device_params, scaled, chunk)
      if not with_encoded:
        out = {k: v for k, v in out.items() if k != 'encoded'}
      chunks.append(jax.tree.map(lambda a, n=n: np.asarray(a)[:n], out))
    raw = {}
    for key in chunks[0]:
      body = np.concatenate([c[key] for c in chunks])
      head = np.full((self.required_candles - 1,) + body.shape[1:], np.nan, np.float32)
      raw[key] = np.concatenate([head, body.astype(np.float32)])
    valid = np.arange(n_bars) >= self.required_candles - 1
    times = _column(frame, 'time') if _has(frame, 'time') else None
    return self.finish(raw, times=times, valid=valid)

  # --- Formatting ---------------------------------------------------------------------------------------
  def records(self, pred: Mapping[str, np.ndarray], rows: Optional[Iterable[int]] = None) -> list[dict]:
    """JSON-able dicts (the REST/WebSocket reply shape) for `rows` (default all) of a prediction dict."""
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

  def info(self) -> dict:
    """What /model_info and the WebSocket 'model_info' command report."""
    config = self.meta.get('config', {})
    labels = config.get('labels', {})
    return {
        'model_version': self.model_version,
        'required_candles': self.required_candles,
        'window': self.window,
        'warmup': self.warmup,
        'num_features': len(self.feature_names),
        'feature_names': self.feature_names,
        'feature_schema_hash': self.meta.get('feature_schema_hash'),
        'thresholds': {'signal': self.threshold},
        'signal_rule': 'BUY iff buy_prob >= threshold and buy_prob > sell_prob; SELL iff sell_prob >= '
                       'threshold and sell_prob > buy_prob; else HOLD. confidence = max(buy_prob, sell_prob).',
        'labels': {
            'direction': list(self.directions),
            'regime': list(self.regimes),
            'buy': f'1 if a long opened at the close hits +{labels.get("pt")} sigma before '
                   f'-{labels.get("sl")} sigma within {labels.get("horizon")} bars (triple barrier)',
            'sell': 'the mirror of buy for a short',
            'direction_definition': f'sign of the {labels.get("horizon")}-bar log return in volatility '
                                    'units, NEUTRAL inside a dead zone fitted on the training span',
            'regime_definition': f'trend/volatility class of the next {labels.get("regime_horizon")} bars',
            'horizon': labels.get('horizon'),
            'regime_horizon': labels.get('regime_horizon'),
        },
        'model': dict(config.get('model', {})),
        'training': {k: config.get(k) for k in ('seed', 'data', 'dataset', 'finetune') if k in config},
        'step': self.meta.get('step'),
        'batch_buckets': list(self.buckets),
    }


def _has(frame, key: str) -> bool:
  return key in frame if isinstance(frame, Mapping) else key in getattr(frame, 'columns', ())


def _column(frame, key: str) -> np.ndarray:
  if not _has(frame, key):
    raise UserError(f'The series has no {key!r} column; expected {list(OHLCV)} (+ time).')
  return np.asarray(frame[key])


def _as_ns(times) -> np.ndarray:
  """Bar times (datetime64 any unit/tz, pandas, or int64 ns) -> int64 ns since the epoch (UTC)."""
  times = np.asarray(times) if not isinstance(times, (pd.Series, pd.Index)) else times
  if isinstance(times, (pd.Series, pd.Index)):
    return pd.to_datetime(times, utc=True).asi8 if isinstance(times, pd.Index) else \
        pd.DatetimeIndex(pd.to_datetime(times, utc=True)).asi8
  if np.issubdtype(times.dtype, np.datetime64):
    return times.astype('datetime64[ns]').astype(np.int64)
  if times.dtype == object:
    return pd.DatetimeIndex(pd.to_datetime(times, utc=True)).asi8
  return times.astype(np.int64)


# ---------------------------------------------------------------------------------------------------------
# Batch inference CLI: python launch.py --config=configs/infer.py --workdir=DIR --config.data.path=bars.csv
# ---------------------------------------------------------------------------------------------------------
def _write_table(table: pd.DataFrame, path: str) -> None:
  """CSV via pyarrow (pandas' to_csv needs ~20 s for a million rows); .parquet by extension."""
  import pyarrow as pa   # pylint: disable=g-import-not-at-top
  import pyarrow.csv as pa_csv   # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq   # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  arrow = pa.Table.from_pandas(table, preserve_index=False)
  if path.endswith('.parquet'):
    pq.write_table(arrow, path)
  else:
    pa_csv.write_csv(arrow, path)


def run_phase(config, workdir: str) -> dict:
  """Writes one prediction row per input bar to config.output (default workdir/infer/predictions.csv)."""
  from natron.data import load_market   # pylint: disable=g-import-not-at-top
  start = time_lib.perf_counter()
  # predict_series needs neither the window buckets nor the series chunk: compile neither.
  predictor = Predictor.load(config.get('bundle') or workdir, buckets=(), series_chunk=0,
                             threshold=_optional_threshold(config.get('threshold', -1.0)),
                             series_batch=int(config.get('batch_size', 128)))
  frame = load_market(config.data)
  output = config.get('output') or os.path.join(workdir, 'infer', 'predictions.csv')
  tables = []
  symbols = frame['symbol'].unique() if 'symbol' in frame else [None]
  for symbol in symbols:
    part = frame if symbol is None else frame[frame['symbol'] == symbol].reset_index(drop=True)
    logging.info('infer: %s, %d bars', symbol or 'series', len(part))
    pred = predictor.predict_series(part, with_encoded=bool(config.get('encoded_output', '')),
                                    progress=True, desc=f'predict {symbol or ""}'.strip())
    table = predictor.table(pred)
    if symbol is not None:
      table.insert(1 if 'time' in table else 0, 'symbol', symbol)
    tables.append(table)
    if config.get('encoded_output', ''):
      path = config.encoded_output if len(symbols) == 1 else f'{config.encoded_output}.{symbol}.npy'
      np.save(path, pred['encoded'])
  table = pd.concat(tables, ignore_index=True) if len(tables) > 1 else tables[0]
  _write_table(table, output)
  seconds = time_lib.perf_counter() - start
  counts = table.loc[table['valid'], 'signal'].value_counts().to_dict()
  summary = {'bars': int(len(table)), 'predicted': int(table['valid'].sum()), 'output': os.path.abspath(output),
             'seconds': round(seconds, 2), 'bars_per_s': round(len(table) / seconds, 1),
             'signals': {s: int(counts.get(s, 0)) for s in SIGNALS}, 'model_version': predictor.model_version}
  logging.info('infer: wrote %d rows to %s in %.1f s (%s)', len(table), output, seconds, summary['signals'])
  return summary


def _optional_threshold(value) -> Optional[float]:
  """Config convention: a negative threshold means 'use the bundle's'."""
  return None if value is None or float(value) < 0 else float(value)
