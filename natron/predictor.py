"""The pure predict function of a fine-tuned bundle, and per-bar predictions over whole series.

One function from raw candles to probabilities (DESIGN.md "Contracts"), consumed by serving
(natron.serve.engine compiles it per batch bucket), by `jax.export` and by the ONNX export (natron.export):

    predict_fn(params, meta)(candles float32 [B, R, 5]) -> {buy_prob [B], sell_prob [B],
                                                            direction_probs [B, 3], regime_probs [B, 6]}

    candles [B, R, 5] -> compute_features_jax per window [B, R, F] -> last `window` rows -> scaler -> model
    (train=False) -> softmax probabilities,

where R = `required_candles` = window + feature warm-up and the columns are COLUMNS (open, high, low, close,
volume), oldest bar first. The four prices are IN POINTS (price / point as exact float32 integers,
natron.data.grid): `candles_in_points` converts raw prices in float64 before the float32 graph, and the EA's
ONNX engine sends MathRound(price / _Point) computed in double. `make_apply(meta)` is the same function
with the parameters as an argument (so a jit does not bake them in as constants).

`Predictor` (built with `Predictor.load(path)`) is the per-series path of batch inference (natron.infer),
RL and backtests: features once over the whole series with the training code (`compute_features`, then
`apply_scaler`), then the same model and heads over every window ending at bar t >= R - 1, in fixed-size
jitted batches; bars before R - 1 have no prediction (NaN probabilities, signal HOLD, valid False). It
compiles nothing when built. Decoding (signal rule, records, tables) is natron.signals; bucketed,
ahead-of-time compiled serving is natron.serve.engine.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from natron import checkpoint
from natron import signals
from natron.data import grid
from natron.errors import UserError
from natron.model import NatronModel
from natron.signals import SIGNALS, signal_rule   # noqa: F401  (re-exported for existing callers)

COLUMNS = ('open', 'high', 'low', 'close', 'volume')   # the candles' last axis, in this order
OHLCV = COLUMNS


class TooFewCandles(UserError):
  """A window shorter than `required_candles`."""


def resolve_bundle(path: str) -> str:
  """A bundle directory, or a workdir holding one at finetune/bundle."""
  for candidate in (os.path.join(path, 'finetune', 'bundle'), path):
    if checkpoint.is_bundle(candidate):
      return candidate
  raise checkpoint.CheckpointError(
      f'No Natron bundle at {path!r} nor at {os.path.join(path, "finetune", "bundle")!r}: pass a bundle '
      'directory or the workdir of a finished finetune phase.')


def load_bundle(path: str, *, check_schema: bool = True) -> tuple[Any, dict, str]:
  """(params, meta, bundle_dir) of the bundle at `path` (a bundle dir, or a workdir with finetune/bundle)."""
  bundle = resolve_bundle(path)
  params, meta = checkpoint.load_bundle(bundle)
  if check_schema:
    checkpoint.check_feature_schema(meta)
  check_meta(meta)
  return params, meta, bundle


def check_meta(meta: Mapping) -> None:
  if int(meta['required_candles']) != int(meta['window']) + int(meta['warmup']):
    raise checkpoint.CheckpointError(
        f'Bundle meta is inconsistent: required_candles {meta["required_candles"]} != window {meta["window"]} '
        f'+ warmup {meta["warmup"]}.')


# ---------------------------------------------------------------------------------------------------------
# The pure function.
# ---------------------------------------------------------------------------------------------------------
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


def features_jax(candles: jax.Array) -> jax.Array:
  """candles float32 [R, 5] (open, high, low, close in POINTS, volume) -> features float32 [R, F]."""
  from natron.features import compute_features_jax   # pylint: disable=g-import-not-at-top
  return compute_features_jax(*(candles[:, i] for i in range(5)))


def scaler_arrays(meta: Mapping) -> dict:
  return dict(meta['scaler'], center=np.asarray(meta['scaler']['center'], np.float32),
              scale=np.asarray(meta['scaler']['scale'], np.float32))


def model_of(meta: Mapping, dtype: Optional[str] = None) -> NatronModel:
  """The bundle's model for inference; `dtype` overrides its matmul input dtype ('float32' / 'bfloat16'),
  None keeps the one it was trained with. Parameters stay float32 either way (natron.model)."""
  model_config = dict(meta['config']['model'])
  model_config['dropout'] = 0.0      # inference: dropout is off anyway (train=False); keep it explicit
  if dtype:
    model_config['dtype'] = str(dtype)
  return NatronModel(model_config)


def heads(model: NatronModel, params, x: jax.Array, *, with_encoded: bool = False) -> dict:
  """Scaled feature windows float32 [B, W, F] -> probabilities (float32) [+ the pooled embedding]."""
  out = model.apply({'params': params}, x, train=False)
  probs = {
      'buy_prob': jax.nn.softmax(out['buy'], axis=-1)[:, 1],
      'sell_prob': jax.nn.softmax(out['sell'], axis=-1)[:, 1],
      'direction_probs': jax.nn.softmax(out['direction'], axis=-1),
      'regime_probs': jax.nn.softmax(out['regime'], axis=-1),
  }
  if with_encoded:
    probs['encoded'] = out['encoded']
  return probs


def scale(features, scaler: Mapping):
  from natron.dataset import apply_scaler   # pylint: disable=g-import-not-at-top
  return apply_scaler(features, scaler)


def make_apply(meta: Mapping, *, with_encoded: bool = False) -> Callable[[Any, jax.Array], dict]:
  """apply(params, candles float32 [B, R, 5] in points) -> the probabilities dict (module docstring).

  Pure and jittable; B and R are static. A batch of one skips the vmap: the same arithmetic, and a graph
  without batching rules for the exporters (jax2onnx cannot vmap every primitive of the feature graph).
  """
  window, required = int(meta['window']), int(meta['required_candles'])
  model, scaler = model_of(meta), scaler_arrays(meta)

  def apply(params, candles):
    candles = jnp.asarray(candles, jnp.float32)
    if candles.ndim != 3 or candles.shape[1:] != (required, len(COLUMNS)):
      raise UserError(f'predict_fn takes candles [batch, {required}, {len(COLUMNS)}], got {candles.shape}.')
    if candles.shape[0] == 1:
      features = features_jax(candles[0])[None, -window:]                 # [1, W, F]
    else:
      features = jax.vmap(features_jax)(candles)[:, -window:]            # [B, W, F]
    x = scale(features, scaler).astype(jnp.float32)
    return heads(model, params, x, with_encoded=with_encoded)

  return apply


def predict_fn(params, meta: Mapping, *, with_encoded: bool = False) -> Callable[[jax.Array], dict]:
  """f(candles float32 [B, required_candles, 5], prices in points) -> probabilities; `params` closed over."""
  apply = make_apply(meta, with_encoded=with_encoded)
  return lambda candles: apply(params, candles)


# ---------------------------------------------------------------------------------------------------------
# Per-bar predictions over whole series (batch inference, RL, backtests).
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Predictor:
  """A bundle's model over whole series: see the module docstring. Build with `Predictor.load(path)`."""
  params: Any
  meta: dict
  threshold: Optional[float] = None
  series_batch: int = 128
  dtype: Optional[str] = None     # matmul input dtype of the series path; None: the bundle's (model_of)

  def __post_init__(self):
    meta = self.meta
    check_meta(meta)
    self.window = int(meta['window'])
    self.warmup = int(meta['warmup'])
    self.required_candles = int(meta['required_candles'])
    self.feature_names = list(meta['feature_names'])
    self.decoder = signals.Decoder.from_meta(meta, self.threshold)
    self.threshold = self.decoder.threshold
    self.model_version = self.decoder.model_version
    self.directions, self.regimes = self.decoder.directions, self.decoder.regimes
    self._model = model_of(meta, self.dtype)
    self._scaler = scaler_arrays(meta)
    self._device_params = jax.device_put(self.params)
    self._series_fn = jax.jit(self._series_forward)
    self.bundle_dir = ''

  @classmethod
  def load(cls, path: str, *, threshold: Optional[float] = None, check_schema: bool = True,
           series_batch: int = 128, buckets: Sequence[int] = (), series_chunk: int = 0,
           dtype: Optional[str] = None) -> 'Predictor':
    """Restores the bundle at `path` (a bundle dir, or a workdir with finetune/bundle); compiles nothing.

    `buckets` and `series_chunk` are accepted for older callers and ignored: the serving buckets live in
    natron.serve.engine.ServingPredictor.
    """
    del buckets, series_chunk
    params, meta, bundle = load_bundle(path, check_schema=check_schema)
    predictor = cls(params, meta, threshold=threshold, series_batch=series_batch, dtype=dtype)
    predictor.bundle_dir = bundle
    return predictor

  # --- Decoding (natron.signals) --------------------------------------------------------------------------
  def finish(self, raw: Mapping[str, np.ndarray], times=None, valid=None) -> dict:
    return self.decoder.finish(raw, times=times, valid=valid)

  def records(self, pred: Mapping[str, np.ndarray], rows=None) -> list[dict]:
    return self.decoder.records(pred, rows)

  def table(self, pred: Mapping[str, np.ndarray]):
    return self.decoder.table(pred)

  # --- Series path --------------------------------------------------------------------------------------
  def _series_forward(self, params, scaled, ends):
    """scaled float32 [T, F], ends int32 [S] (window-end rows) -> probabilities for those S windows."""
    windows = jax.vmap(lambda e: jax.lax.dynamic_slice_in_dim(scaled, e - self.window + 1, self.window))(ends)
    return heads(self._model, params, windows, with_encoded=True)

  def series_features(self, frame, point: Optional[float] = None) -> np.ndarray:
    """Scaled features float32 [T, F] of a whole series, exactly as natron.dataset computes them.

    point: the price increment; None: the frame's attrs['point'] (set by natron.data), else inferred.
    """
    from natron.features import compute_features   # pylint: disable=g-import-not-at-top
    if point is None and hasattr(frame, 'attrs'):
      point = frame.attrs.get('point')
    features, names = compute_features({k: np.asarray(_column(frame, k), np.float64) for k in COLUMNS},
                                       point=point)
    if list(names) != self.feature_names:
      raise checkpoint.CheckpointError('The feature names computed now differ from the bundle\'s; the '
                                       'feature schema changed since training.')
    return np.asarray(scale(np.asarray(features, np.float32), self._scaler), np.float32)

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

  # --- Description --------------------------------------------------------------------------------------
  def info(self) -> dict:
    """What /model_info and the WebSocket 'model_info' command report (and natron.json repeats)."""
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
        'signal_rule': signals.SIGNAL_RULE,
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
    }


def _has(frame, key: str) -> bool:
  return key in frame if isinstance(frame, Mapping) else key in getattr(frame, 'columns', ())


def _column(frame, key: str) -> np.ndarray:
  if not _has(frame, key):
    raise UserError(f'The series has no {key!r} column; expected {list(COLUMNS)} (+ time).')
  return np.asarray(frame[key])


def optional_threshold(value) -> Optional[float]:
  """Config convention: a negative threshold means 'use the bundle's'."""
  return None if value is None or float(value) < 0 else float(value)


_optional_threshold = optional_threshold   # the name natron.serve.app imported before the split
