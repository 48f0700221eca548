"""Forward-looking training targets (AFML, López de Prado ch. 3-4), vectorised over bars.

All labels of row t describe bars AFTER t; they are the only forward-looking arrays in Natron, and every
statistic fitted from them (dead zone k, regime thresholds, class weights) is fitted on training rows only.
Computation is float64 numpy; loops run over the horizon (<= a few dozen steps), never over bars.

Definitions (T bars of ONE symbol; r_t = log(close_t / close_{t-1}), the one-bar log return):

- sigma_t: causal exponentially weighted std of r over bars <= t (pandas `ewm(span=vol_span).std()`, bias
  corrected, first value once `vol_span` returns exist). sigma_t is the unit of every barrier below.
- buy (triple barrier, long): a long opened at close_t with take-profit TP = close_t * exp(+pt * sigma_t) and
  stop SL = close_t * exp(-sl * sigma_t) (log barriers: sigma_t is a std of LOG returns, so the barriers sit
  pt and sl sigmas away in log price; the linear close*(1 + pt*sigma) differs by O(sigma^2)), and a vertical
  barrier H bars later. Bars t+1..t+H are scanned in order using their high and low: TP is touched when
  high >= TP, SL when low <= SL. buy = 1 iff TP is touched strictly before SL; if one bar touches both, the
  stop counts first (pessimistic: the order inside a bar is unknown); buy = 0 when SL comes first or neither
  barrier is touched by bar t+H.
- sell: the mirror for a short (TP = close_t * exp(-pt * sigma_t) touched when low <= TP, SL =
  close_t * exp(+sl * sigma_t) touched when high >= SL). With pt >= sl buy and sell can never both be 1 (a
  long TP at +pt sigma already stops the short at +sl sigma); for pt < sl the earlier take-profit wins and a
  tie leaves both 0, so buy + sell <= 1 always.
- direction: z = log(close_{t+H} / close_t) / (sigma_t * sqrt(H)); UP (0) if z > k, DOWN (1) if z < -k, else
  NEUTRAL (2). k is the `direction_shares[NEUTRAL]` quantile of |z| on training rows (adaptive balancing: the
  dead zone is symmetric, so the neutral share is matched exactly and UP/DOWN split as the data do).
- regime over the forward window t+1..t+H_r (H_r = regime_horizon):
    m_t, rv_t = mean and std (population) of r_{t+1..t+H_r}, the window's drift and realised one-bar vol,
    trend_t = m_t / rv_t * sqrt(H_r)         the t-statistic of the window's drift (volatility-normalised:
             a strong trend is a large drift per unit of the window's own noise),
    vol_ratio_t = rv_t / median(sigma_{t-L+1..t})   forward vol relative to the TRAILING median of sigma over
             L = regime_vol_lookback bars (causal; never a full-sample percentile).
  Precedence: VOLATILE if vol_ratio > volatile_ratio; else RANGE if |trend| < range_z; else BULL_* (trend > 0)
  or BEAR_* (trend < 0), STRONG if |trend| >= strong_z else WEAK. Thresholds are fixed in the config or, when
  `regime_shares` is set, fitted on training rows to reach those class shares (see `fit_regime_thresholds`).
- t1: the last bar any label of row t reads (t + H with buy/sell/direction, t + H_r with a regime label, the
  later of the two); -1 when row t has no label. The dataset purges on it.
- weight: average uniqueness (AFML 4.4). The event of row t spans bars t+1..e_t, where e_t is the later of the
  long and short exits (first barrier touch or t+H), the bar by which both trade outcomes are known.
  c_s = number of labelled events whose span contains bar s; weight_t = mean over its span of 1/c_s, in (0, 1].
- Masking: a label whose horizon runs past the last bar (or across a `breaks` gap) is -1, never truncated.
  Rows with undefined sigma (the first `vol_span` bars) have no labels either.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np
import pandas as pd

from natron.data import REGIMES
from natron.errors import UserError

DIRECTIONS = ('UP', 'DOWN', 'NEUTRAL')
UP, DOWN, NEUTRAL = 0, 1, 2
(BULL_STRONG, BULL_WEAK, BEAR_STRONG, BEAR_WEAK, RANGE, VOLATILE) = range(6)
TASKS = ('buy', 'sell', 'direction', 'regime')
NUM_CLASSES = {'buy': 2, 'sell': 2, 'direction': 3, 'regime': len(REGIMES)}
CLASS_NAMES = {'buy': ('NO', 'BUY'), 'sell': ('NO', 'SELL'), 'direction': DIRECTIONS, 'regime': REGIMES}

# Keys read with `label_config.get(key, default)`, so configs that predate them keep working.
DEFAULTS = {
    'horizon': 12,
    'pt': 2.0,
    'sl': 1.0,
    'vol_span': 100,
    'direction_shares': (1 / 3, 1 / 3, 1 / 3),
    'regime_horizon': 48,
    'regime_vol_lookback': 2000,   # L: bars of trailing sigma whose median is the "normal" volatility
    'regime_shares': (),           # () -> fixed thresholds below; 6 shares (REGIMES order) -> fitted on train
    'regime_volatile_ratio': 1.6,  # forward realised vol / trailing median sigma above this -> VOLATILE
    'regime_range_z': 2.0,         # |trend t-stat| below this (drift not significant) -> RANGE
    'regime_strong_z': 5.0,        # |trend t-stat| at or above this -> STRONG
}


@dataclasses.dataclass
class Labels:
  """Labels of T rows (one symbol, or several concatenated by the dataset). -1 marks "no label".

  buy, sell: int32 [T] in {0, 1, -1}; direction: int32 [T] in {0, 1, 2, -1} (DIRECTIONS order);
  regime: int32 [T] in {0..5, -1} (REGIMES order); t1: int64 [T] last bar read by row t's labels (-1: none);
  weight: float32 [T] average uniqueness (0 where buy/sell are unlabelled); sigma: float64 [T];
  params: fitted thresholds and their train-span statistics (JSON-able);
  class_weights: task -> list of per-class weights fitted on training rows.
  """
  buy: np.ndarray
  sell: np.ndarray
  direction: np.ndarray
  regime: np.ndarray
  t1: np.ndarray
  weight: np.ndarray
  sigma: np.ndarray
  params: dict = dataclasses.field(default_factory=dict)
  class_weights: dict = dataclasses.field(default_factory=dict)

  def __len__(self) -> int:
    return len(self.buy)

  def task(self, name: str) -> np.ndarray:
    if name not in TASKS:
      raise KeyError(f'unknown task {name!r}; tasks are {TASKS}')
    return getattr(self, name)

  def take(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Per-row arrays (buy, sell, direction, regime, weight, t1) at `rows`."""
    return {name: getattr(self, name)[rows] for name in TASKS + ('weight', 't1')}


def setting(config: Mapping[str, Any] | None, key: str):
  """config[key] for a label setting; DEFAULTS[key] when the config (or the key) is absent."""
  if config is None:
    return DEFAULTS[key]
  value = config.get(key, DEFAULTS[key]) if hasattr(config, 'get') else getattr(config, key, DEFAULTS[key])
  return DEFAULTS[key] if value is None else value


# --------------------------------------------------------------------------------------------------
# Inputs and elementary series.
# --------------------------------------------------------------------------------------------------
def _price_arrays(frame_or_arrays) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(high, low, close) float64 [T] from a DataFrame or a mapping of arrays; validated."""
  try:
    high, low, close = (np.asarray(frame_or_arrays[k], dtype=np.float64) for k in ('high', 'low', 'close'))
  except KeyError as e:
    raise UserError(f'labels need high, low and close columns; missing {e}') from None
  if not (high.ndim == low.ndim == close.ndim == 1 and len(high) == len(low) == len(close)):
    raise UserError(f'high, low, close must be 1-D of equal length, got shapes '
                    f'{high.shape}, {low.shape}, {close.shape}')
  for name, x in (('high', high), ('low', low), ('close', close)):
    bad = ~(np.isfinite(x) & (x > 0))
    if bad.any():
      raise UserError(f'{name} must be finite and > 0; first bad row {int(np.argmax(bad))}')
  bad = (high < close) | (low > close)
  if bad.any():
    raise UserError(f'need low <= close <= high; first bad row {int(np.argmax(bad))}')
  return high, low, close


def ahead(x: np.ndarray, h: int, fill=np.nan) -> np.ndarray:
  """x[t + h] at row t ([T]); `fill` where t + h is past the end."""
  out = np.full(x.shape, fill, dtype=np.result_type(x.dtype, type(fill)))
  if h < len(x):
    out[:len(x) - h] = x[h:]
  return out


def log_returns(close: np.ndarray) -> np.ndarray:
  """r_t = log(close_t / close_{t-1}) float64 [T]; r_0 = NaN."""
  logc = np.log(close)
  return np.concatenate([[np.nan], np.diff(logc)])


def ewm_volatility(close: np.ndarray, span: int) -> np.ndarray:
  """sigma_t float64 [T]: causal EWM std of one-bar log returns over bars <= t; NaN until `span` returns."""
  if span < 2:
    raise UserError(f'labels.vol_span must be >= 2, got {span}')
  r = pd.Series(log_returns(close))
  return r.ewm(span=span, min_periods=span).std().to_numpy()


def trailing_median(x: np.ndarray, lookback: int, min_periods: int) -> np.ndarray:
  """Median of x over rows max(0, t-lookback+1)..t (causal, NaNs skipped); NaN until min_periods values."""
  return pd.Series(x).rolling(lookback, min_periods=min(min_periods, lookback)).median().to_numpy()


def _segment_ok(breaks: np.ndarray | None, t: int, h: int) -> np.ndarray:
  """bool [t]: rows whose span t..t+h stays inside one segment (no `breaks` bar in t+1..t+h) and the data."""
  inside = np.arange(t) + h < t
  if breaks is None:
    return inside
  seg = np.cumsum(np.asarray(breaks, dtype=np.int64))
  return inside & (ahead(seg, h, fill=-1) == seg)


# --------------------------------------------------------------------------------------------------
# buy / sell: triple barrier.
# --------------------------------------------------------------------------------------------------
def triple_barrier(high, low, close, sigma, horizon: int, pt: float, sl: float):
  """Long and short triple-barrier outcomes (see the module docstring for the exact rule).

  Args: high, low, close, sigma float [T]; horizon H >= 1; pt, sl > 0 (in units of sigma, log barriers).
  Returns (buy, sell, exit_long, exit_short): buy/sell int32 [T] in {0, 1, -1}; exits int64 [T], the bar at
  which each trade's outcome is decided (first barrier touch, else t + H), -1 where unlabelled. Rows whose
  t + H is past the end or whose sigma is not a positive number are -1.
  """
  if horizon < 1:
    raise UserError(f'labels.horizon must be >= 1, got {horizon}')
  if not (pt > 0 and sl > 0):
    raise UserError(f'labels.pt and labels.sl must be > 0, got pt={pt}, sl={sl}')
  n = len(close)
  logc, logh, logl = np.log(close), np.log(high), np.log(low)
  valid = (np.arange(n) + horizon < n) & np.isfinite(sigma) & (sigma > 0)
  s = np.where(valid, sigma, 0.0)
  long_tp, long_sl = logc + pt * s, logc - sl * s
  short_tp, short_sl = logc - pt * s, logc + sl * s
  never = horizon + 1
  at = {k: np.full(n, never, np.int64) for k in ('long_tp', 'long_sl', 'short_tp', 'short_sl')}
  for h in range(1, horizon + 1):
    hi, lo = ahead(logh, h, fill=-np.inf), ahead(logl, h, fill=np.inf)
    for key, hit in (('long_tp', hi >= long_tp), ('long_sl', lo <= long_sl),
                     ('short_tp', lo <= short_tp), ('short_sl', hi >= short_sl)):
      at[key] = np.where((at[key] == never) & hit, h, at[key])
  # Strict '<': a bar touching both barriers has the stop first.
  buy = at['long_tp'] < at['long_sl']
  sell = at['short_tp'] < at['short_sl']
  # Only reachable when pt < sl: keep the earlier take-profit, neither on a tie.
  both = buy & sell
  buy, sell = (buy & ~(both & (at['long_tp'] >= at['short_tp'])),
               sell & ~(both & (at['short_tp'] >= at['long_tp'])))
  t = np.arange(n)
  exit_long = t + np.minimum(np.minimum(at['long_tp'], at['long_sl']), horizon)
  exit_short = t + np.minimum(np.minimum(at['short_tp'], at['short_sl']), horizon)
  as_label = lambda b: np.where(valid, b.astype(np.int32), -1).astype(np.int32)
  return (as_label(buy), as_label(sell), np.where(valid, exit_long, -1), np.where(valid, exit_short, -1))


# --------------------------------------------------------------------------------------------------
# direction.
# --------------------------------------------------------------------------------------------------
def direction_score(close, sigma, horizon: int) -> np.ndarray:
  """z_t = log(close_{t+H}/close_t) / (sigma_t sqrt(H)) float64 [T]; NaN past the end or without sigma."""
  logc = np.log(close)
  with np.errstate(invalid='ignore', divide='ignore'):
    z = (ahead(logc, horizon) - logc) / (sigma * np.sqrt(horizon))
  return np.where(np.isfinite(z) & (sigma > 0), z, np.nan)


def fit_dead_zone(z_train: np.ndarray, shares) -> float:
  """k such that a fraction shares[NEUTRAL] of the training |z| lies inside [-k, k] (k >= 0)."""
  shares = _normalised_shares(shares, 3, 'labels.direction_shares')
  z = np.abs(z_train[np.isfinite(z_train)])
  if len(z) == 0:
    raise UserError('no labelled training rows to fit the direction dead zone on; need more training bars')
  return float(np.quantile(z, shares[NEUTRAL])) if shares[NEUTRAL] > 0 else 0.0


def direction_labels(z: np.ndarray, k: float) -> np.ndarray:
  """int32 [T]: UP if z > k, DOWN if z < -k, NEUTRAL otherwise, -1 where z is NaN."""
  out = np.where(z > k, UP, np.where(z < -k, DOWN, NEUTRAL))
  return np.where(np.isfinite(z), out, -1).astype(np.int32)


# --------------------------------------------------------------------------------------------------
# regime.
# --------------------------------------------------------------------------------------------------
def regime_statistics(close, sigma, horizon: int, vol_lookback: int, min_periods: int):
  """(trend, vol_ratio) float64 [T] over the forward window t+1..t+horizon (NaN where undefined).

  With r the window's one-bar log returns, m their mean and rv their std (two-pass, population):
  trend = m / rv * sqrt(horizon), the t-statistic of the window's drift; vol_ratio = rv / the trailing
  median of sigma over `vol_lookback` bars ending at t.
  """
  if horizon < 2:
    raise UserError(f'labels.regime_horizon must be >= 2, got {horizon}')
  r = log_returns(close)
  # Two passes over the horizon (mean, then centred squares): no [T, horizon] matrix, no E[x^2] - E[x]^2.
  mean = sum(ahead(r, h) for h in range(1, horizon + 1)) / horizon
  rv = np.sqrt(sum((ahead(r, h) - mean) ** 2 for h in range(1, horizon + 1)) / horizon)
  with np.errstate(invalid='ignore', divide='ignore'):
    trend = np.where(rv > 0, mean / rv * np.sqrt(horizon), 0.0)
    vol_ratio = rv / trailing_median(sigma, vol_lookback, min_periods)
  ok = np.isfinite(mean) & np.isfinite(vol_ratio)
  return np.where(ok, trend, np.nan), np.where(ok, vol_ratio, np.nan)


def fit_regime_thresholds(trend: np.ndarray, vol_ratio: np.ndarray, shares) -> dict[str, float]:
  """Thresholds reaching `shares` (REGIMES order) on the given (training) rows, in precedence order.

  volatile_ratio: the (1 - s_volatile) quantile of vol_ratio; range_z: among the rest, the quantile of |trend|
  holding s_range of all rows; strong_z: among the trending rest, the |trend| quantile leaving the strong
  share (s_bull_strong + s_bear_strong) above it. Bull/bear split follows the sign of the data.
  """
  s = _normalised_shares(shares, len(REGIMES), 'labels.regime_shares')
  ok = np.isfinite(trend) & np.isfinite(vol_ratio)
  trend, vol_ratio = trend[ok], vol_ratio[ok]
  if len(trend) < 10:
    raise UserError(f'only {len(trend)} labelled training rows to fit regime thresholds on; need more bars')
  volatile_ratio = float(np.quantile(vol_ratio, 1 - s[VOLATILE])) if s[VOLATILE] > 0 else np.inf
  calm = np.abs(trend[vol_ratio <= volatile_ratio])
  rest = 1 - s[VOLATILE]
  range_z = float(np.quantile(calm, min(s[RANGE] / rest, 1.0))) if s[RANGE] > 0 and rest > 0 else 0.0
  trending = calm[calm >= range_z]
  trend_share = s[BULL_STRONG] + s[BULL_WEAK] + s[BEAR_STRONG] + s[BEAR_WEAK]
  strong = (s[BULL_STRONG] + s[BEAR_STRONG]) / trend_share if trend_share > 0 else 0.0
  strong_z = float(np.quantile(trending, 1 - strong)) if len(trending) and strong > 0 else np.inf
  return {'volatile_ratio': volatile_ratio, 'range_z': range_z, 'strong_z': strong_z}


def regime_labels(trend: np.ndarray, vol_ratio: np.ndarray, thresholds: Mapping[str, float]) -> np.ndarray:
  """int32 [T] regime ids (REGIMES order) by precedence VOLATILE > RANGE > BULL/BEAR x STRONG/WEAK; -1 NaN."""
  a = np.abs(trend)
  strong = a >= thresholds['strong_z']
  bull = np.where(strong, BULL_STRONG, BULL_WEAK)
  bear = np.where(strong, BEAR_STRONG, BEAR_WEAK)
  out = np.where(trend > 0, bull, bear)
  out = np.where(a < thresholds['range_z'], RANGE, out)
  out = np.where(vol_ratio > thresholds['volatile_ratio'], VOLATILE, out)
  ok = np.isfinite(trend) & np.isfinite(vol_ratio)
  return np.where(ok, out, -1).astype(np.int32)


def dominant_regime(true_regime: np.ndarray, horizon: int) -> np.ndarray:
  """int32 [T]: the most frequent true regime over bars t+1..t+horizon (ties -> lower id); -1 past the end.

  Counts are differences of integer cumulative sums of one-hot rows (exact).
  """
  true_regime = np.asarray(true_regime)
  n, k = len(true_regime), len(REGIMES)
  onehot = (true_regime[:, None] == np.arange(k)[None, :]).astype(np.int64)
  csum = np.concatenate([np.zeros((1, k), np.int64), np.cumsum(onehot, axis=0)])   # csum[i] = sum rows < i
  t = np.arange(n)
  inside = t + horizon < n
  hi = np.minimum(t + horizon + 1, n)
  counts = csum[hi] - csum[np.minimum(t + 1, n)]
  return np.where(inside, np.argmax(counts, axis=1), -1).astype(np.int32)


def regime_agreement(regime: np.ndarray, true_regime: np.ndarray, horizon: int, rows=None) -> dict:
  """Agreement of regime labels with the generator's dominant true regime over the same forward window.

  `rows` (int indices or bool mask) restricts the comparison (e.g. to held-out rows). Returns
  {'agreement': float, 'rows': int, 'per_class_recall': {name: float}}.
  """
  dom = dominant_regime(true_regime, horizon)
  use = (np.asarray(regime) >= 0) & (dom >= 0)
  if rows is not None:
    sel = np.zeros(len(use), bool)
    sel[rows] = True
    use &= sel
  lab, ref = np.asarray(regime)[use], dom[use]
  recall = {name: float(np.mean(lab[ref == i] == i)) for i, name in enumerate(REGIMES) if np.any(ref == i)}
  return {'agreement': float(np.mean(lab == ref)) if len(lab) else float('nan'), 'rows': int(len(lab)),
          'per_class_recall': recall}


# --------------------------------------------------------------------------------------------------
# Sample weights and class weights.
# --------------------------------------------------------------------------------------------------
def uniqueness_weights(starts: np.ndarray, ends: np.ndarray, n_bars: int) -> np.ndarray:
  """Average uniqueness float32 [N] of events spanning bars starts[i]..ends[i] (inclusive; start > end or a
  negative start marks an unlabelled row, weight 0).

  c_s = number of events whose span contains bar s (integer difference array + cumsum: exact);
  weight_i = mean over s in span_i of 1 / c_s. The loop runs over span offsets (<= max span length).
  """
  starts, ends = np.asarray(starts, np.int64), np.asarray(ends, np.int64)
  live = (starts >= 0) & (ends >= starts)
  if live.any() and (ends[live].max() >= n_bars):
    raise ValueError('event ends past the last bar')
  delta = np.bincount(starts[live], minlength=n_bars + 1) - np.bincount(ends[live] + 1, minlength=n_bars + 1)
  concurrency = np.cumsum(delta)[:n_bars]
  inv = np.where(concurrency > 0, 1.0 / np.maximum(concurrency, 1), 0.0)
  length = np.where(live, ends - starts + 1, 0)
  total = np.zeros(len(starts))
  for offset in range(int(length.max(initial=0))):
    inside = offset < length
    total += np.where(inside, inv[np.where(inside, starts + offset, 0)], 0.0)
  return np.where(live, total / np.maximum(length, 1), 0.0).astype(np.float32)


def class_weights(labels: np.ndarray, num_classes: int) -> list[float]:
  """Inverse class frequency over labelled entries (>= 0), normalised to mean 1 over the classes present.

  A class absent from `labels` gets weight 0 (it contributes no loss term anyway).
  """
  labels = np.asarray(labels)
  counts = np.bincount(labels[labels >= 0], minlength=num_classes)[:num_classes].astype(np.float64)
  inv = np.where(counts > 0, counts.sum() / np.maximum(counts, 1), 0.0)
  present = counts > 0
  if not present.any():
    return [0.0] * num_classes
  return [float(w) for w in inv / inv[present].mean()]


def class_shares(labels: np.ndarray, num_classes: int) -> list[float]:
  """Share of each class among labelled entries (>= 0); zeros when none."""
  labels = np.asarray(labels)
  labels = labels[labels >= 0]
  counts = np.bincount(labels, minlength=num_classes)[:num_classes]
  return [float(c) for c in counts / max(len(labels), 1)]


def _normalised_shares(shares, k: int, name: str) -> np.ndarray:
  s = np.asarray(shares, np.float64)
  if s.shape != (k,) or not np.all(np.isfinite(s)) or np.any(s < 0) or s.sum() <= 0:
    raise UserError(f'{name} must be {k} non-negative numbers with a positive sum, got {tuple(shares)}')
  return s / s.sum()


# --------------------------------------------------------------------------------------------------
# Everything together.
# --------------------------------------------------------------------------------------------------
def make_labels(frame_or_arrays, label_config=None, train_end: int | None = None, *, breaks=None) -> Labels:
  """All labels of one symbol's bars, with thresholds and class weights fitted on rows < train_end.

  Args:
    frame_or_arrays: DataFrame or mapping with high, low, close ([T] each), one symbol, time-ordered.
    label_config: `config.labels` (keys in DEFAULTS; missing keys take the defaults).
    train_end: rows t < train_end are the training span; the dead zone k, fitted regime thresholds and the
      class weights use only their labels (the same rows and forward bars the training loss sees).
      None -> all rows (only for analysis, never for a train/test experiment).
    breaks: optional bool [T], True at a bar that follows a data gap; no label spans a break.
  Returns: Labels with per-row arrays [T], params (fitted values and train shares) and class_weights.
  """
  high, low, close = _price_arrays(frame_or_arrays)
  n = len(close)
  train_end = n if train_end is None else int(train_end)
  if not 0 < train_end <= n:
    raise UserError(f'train_end must be in 1..{n} (number of bars), got {train_end}')
  if breaks is not None and len(breaks) != n:
    raise UserError(f'breaks has length {len(breaks)}, expected {n}')
  horizon, regime_horizon = int(setting(label_config, 'horizon')), int(setting(label_config, 'regime_horizon'))
  vol_span = int(setting(label_config, 'vol_span'))
  sigma = ewm_volatility(close, vol_span)
  train = np.arange(n) < train_end

  # buy / sell.
  buy, sell, exit_long, exit_short = triple_barrier(high, low, close, sigma, horizon,
                                                    float(setting(label_config, 'pt')),
                                                    float(setting(label_config, 'sl')))
  ok_h = _segment_ok(breaks, n, horizon) & (buy >= 0)
  buy, sell = np.where(ok_h, buy, -1).astype(np.int32), np.where(ok_h, sell, -1).astype(np.int32)

  # direction.
  z = np.where(ok_h, direction_score(close, sigma, horizon), np.nan)
  k = fit_dead_zone(z[train], setting(label_config, 'direction_shares'))
  direction = direction_labels(z, k)

  # regime.
  trend, vol_ratio = regime_statistics(close, sigma, regime_horizon,
                                       int(setting(label_config, 'regime_vol_lookback')), vol_span)
  ok_r = _segment_ok(breaks, n, regime_horizon) & np.isfinite(sigma)
  trend, vol_ratio = np.where(ok_r, trend, np.nan), np.where(ok_r, vol_ratio, np.nan)
  shares = tuple(setting(label_config, 'regime_shares'))
  if shares:
    thresholds = fit_regime_thresholds(trend[train], vol_ratio[train], shares)
    mode = 'fitted'
  else:
    thresholds = {'volatile_ratio': float(setting(label_config, 'regime_volatile_ratio')),
                  'range_z': float(setting(label_config, 'regime_range_z')),
                  'strong_z': float(setting(label_config, 'regime_strong_z'))}
    mode = 'fixed'
  regime = regime_labels(trend, vol_ratio, thresholds)

  # End index and uniqueness.
  t = np.arange(n)
  t1 = np.maximum(np.where(buy >= 0, t + horizon, -1), np.where(regime >= 0, t + regime_horizon, -1))
  event_end = np.where(buy >= 0, np.maximum(exit_long, exit_short), -1)
  weight = uniqueness_weights(np.where(buy >= 0, t + 1, -1), event_end, n)

  tasks = {'buy': buy, 'sell': sell, 'direction': direction, 'regime': regime}
  params = {
      'horizon': horizon, 'regime_horizon': regime_horizon, 'vol_span': vol_span, 'train_end': train_end,
      'direction_k': k, 'regime_mode': mode, 'regime_thresholds': thresholds,
      'train_rows': {name: int(np.sum(y[train] >= 0)) for name, y in tasks.items()},
      'train_shares': {name: class_shares(y[train], NUM_CLASSES[name]) for name, y in tasks.items()},
  }
  return Labels(buy=buy, sell=sell, direction=direction, regime=regime, t1=t1.astype(np.int64),
                weight=weight, sigma=sigma, params=_jsonable(params),
                class_weights={name: class_weights(y[train], NUM_CLASSES[name]) for name, y in tasks.items()})


def _jsonable(x):
  """Floats that JSON can carry (inf -> the string 'inf')."""
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, float) and not np.isfinite(x):
    return str(x)
  return x
