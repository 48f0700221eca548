"""Regime-switching synthetic market: the embedded default data source of every phase.

The generator is a semi-Markov chain over the six REGIMES. Each regime lasts at least `MIN_DURATION` bars
plus a geometric tail (mean ~`MIN_DURATION + MEAN_EXTRA` bars), then switches to a different regime. Per bar,
with base volatility s (log-return std per 15-minute bar, scaled by sqrt(timeframe / 15 min)):

  regime        drift mu / s   vol / s   48-bar normalised move z = mu * 48 / (vol * sqrt(48))
  BULL_STRONG     +1.1          1.0        ~ +7.6
  BULL_WEAK       +0.5          1.0        ~ +3.5
  BEAR_STRONG     -1.1          1.0        ~ -7.6
  BEAR_WEAK       -0.5          1.0        ~ -3.5
  RANGE            0            0.7        ~ 0   (log price mean-reverts to the level where the range began)
  VOLATILE         0            2.5        ~ 0

The drifts are large on purpose: this market exists to prove that the pipeline learns, so a forward 48-bar
window's (trend z, realised vol) pair identifies the regime that generated it (tests/test_data.py checks an
oracle rule reaches >= 80% agreement; it measures ~86-89%), and direction depends on the recent past
(regimes persist, and the return noise is AR(1) with coefficient `AR_COEF`). Realised volatility should be
compared with a robust trailing level (e.g. a trailing median of 48-bar vols): VOLATILE holds ~1/6 of the
bars, so a plain trailing mean is inflated by the last volatile spell.

Bars: each bar simulates `SUBSTEPS` intrabar log-price steps (a bridge pinned to the bar's close), so high and
low come from the path (high >= max(open, close), low <= min(open, close)); open equals the previous close.
About `QUIET_SHARE` of the bars are quiet (no price change: open = high = low = close, a few ticks), as real
feeds have around the daily rollover. Timestamps are UTC, every `timeframe`, Monday to Friday (weekends
skipped), starting Monday 2020-01-06 00:00 (the first Monday of 2020).

The market looks like a broker's feed: prices are quantised to a quote grid of `point` (default 1e-5, a
5-digit FX pair at ~1.1; rounding is monotone, so the OHLC inequalities survive it), so equal closes, equal
highs, doji bars (open = close) and flat bars occur as in real data; `volume` is an integer tick count that
follows the bar's range (lognormal-noised); the spread is a whole number of points, `spread_points` (~10, one
pip, wider in VOLATILE) and `spread` = spread_points x point in price units.

Presets (`preset=`, config `data.synthetic_preset`):
  learnable   the table above: structure strong enough to prove that the pipeline learns (the demo default).
  realistic   the same regime chain at real-FX strength: drifts of +-0.02 / +-0.01 of the bar volatility
              (an oracle that knows the regime calls the next bar's direction ~51% right), return noise with
              a lag-1 autocorrelation of -0.02 (the slight mean reversion of real M15 quotes), no range mean
              reversion, volatility clustering (VOL x 1.8 in VOLATILE, 0.8 in RANGE) and an intraday
              volatility profile (quiet Asian session and rollover, busy London/New York overlap); per-bar
              volatility ~3e-4 on M15 like EURUSD. Regime labels stay defined but are hard to recover, as
              in a real market: use it to check that reports read "no evidence" where there is none.

To keep the price level realistic over millions of bars, the direction of the next trending regime is
tilted against the cumulative drift so far (a bull run makes a bear regime a little more likely); the tilt
uses only the regime sequence, never the noise, and keeps the six classes near-balanced.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd

from natron.errors import UserError

REGIMES = ('BULL_STRONG', 'BULL_WEAK', 'BEAR_STRONG', 'BEAR_WEAK', 'RANGE', 'VOLATILE')
BULL_STRONG, BULL_WEAK, BEAR_STRONG, BEAR_WEAK, RANGE, VOLATILE = range(6)

# Per-regime drift and volatility of the learnable preset, in units of the base per-bar volatility.
DRIFT = np.array([1.1, 0.5, -1.1, -0.5, 0.0, 0.0])
VOL = np.array([1.0, 1.0, 1.0, 1.0, 0.7, 2.5])
BASE_VOL = 2.5e-4           # log-return std of one 15-minute bar (a calm major FX pair)
MIN_DURATION = 100          # bars; regimes persist at least this long ...
MEAN_EXTRA = 200            # ... plus a geometric tail with this mean (mean duration ~300 bars)
AR_COEF = 0.08              # lag-1 autocorrelation of the return noise (short-term momentum)
RANGE_PHI = 0.95            # AR coefficient of the log-price deviation from the range level (half-life ~14)
TILT_SCALE = 600.0          # net drift (in base-vol units, ~15% of price) at which bull/bear odds tilt by e
SUBSTEPS = 8                # intrabar path resolution for high/low
START_PRICE = 1.1
START_TIME = '2020-01-06'   # a Monday
DEFAULT_POINT = 1e-5        # quote grid: a 5-digit FX pair
SPREAD_FRACTION = 0.9e-4    # spread / price in calm regimes (~10 points of 1e-5 at 1.1)
VOLUME_SCALE = 1000.0
QUIET_SHARE = 0.005         # bars without a price change (flat bars)
_CHUNK = 1 << 17            # bars per intrabar-path chunk, bounds memory at ~SUBSTEPS * 1 MiB per array
# Intraday volatility by UTC hour of the realistic preset (relative; normalised to a mean square of 1):
# Asia, London open, London/New York overlap, New York afternoon, rollover.
_HOURLY_VOL = np.array([0.7] * 7 + [1.2] * 5 + [1.4] * 4 + [0.9] * 5 + [0.45] * 3)
_HOURLY_VOL = _HOURLY_VOL / np.sqrt(np.mean(_HOURLY_VOL**2))


@dataclasses.dataclass(frozen=True)
class Preset:
  """How strong the market's structure is (see the module docstring)."""
  drift: tuple         # per regime, in units of the base volatility
  vol: tuple           # per regime, multiple of the base volatility
  base_vol: float      # log-return std of one 15-minute bar
  ar_coef: float       # lag-1 autocorrelation of the return noise
  range_phi: float     # RANGE mean reversion of the log price (1.0: none, a random walk)
  intraday: bool       # intraday volatility profile (_HOURLY_VOL)


PRESETS = {
    'learnable': Preset(tuple(DRIFT), tuple(VOL), BASE_VOL, AR_COEF, RANGE_PHI, False),
    'realistic': Preset((0.02, 0.01, -0.02, -0.01, 0.0, 0.0), (1.0, 1.0, 1.0, 1.0, 0.8, 1.8), 2.6e-4, -0.02,
                        1.0, True),
}


def synthetic_market(n_bars: int, seed=0, timeframe: str = '15min', *, point: float = DEFAULT_POINT,
                     preset: str = 'learnable'):
  """Generates a regime-switching OHLCV market on a quote grid.

  Args:
    n_bars: number of bars T (>= 1).
    seed: a non-negative int or a tuple of them such as (seed, symbol_index) (np.random.SeedSequence entropy).
      The first m bars of a series do not depend on n_bars >= m.
    timeframe: bar length as a pandas Timedelta string; must divide one day. Per-bar volatility scales with
      sqrt(timeframe / 15 min); regime durations are in bars, not in time.
    point: the quote grid (price increment); prices are integer multiples of it, spreads whole points.
    preset: 'learnable' (default, the demo) or 'realistic' (real-FX-weak structure), see PRESETS.

  Returns:
    (frame, true_regime): frame has columns time (datetime64[ns, UTC]), open, high, low, close, volume
    (integer tick counts), spread (price units), spread_points (whole points) (float64, T rows);
    true_regime is int32[T] with ids in REGIMES order.
  """
  if seed is None:
    raise UserError('synthetic_market needs an explicit seed (None would make the market irreproducible)')
  if preset not in PRESETS:
    raise UserError(f"synthetic preset must be one of {sorted(PRESETS)}, got {preset!r}")
  try:
    point = float(point)
  except (TypeError, ValueError):
    point = float('nan')
  if not (math.isfinite(point) and 0 < point <= START_PRICE / 100):
    raise UserError(f"point must be a price increment in (0, {START_PRICE / 100:g}] (a grid fine enough for a "
                    f"price of ~{START_PRICE}), got {point!r}")
  n_bars = int(n_bars)
  if n_bars < 1:
    raise UserError(f"n_bars must be >= 1, got {n_bars}")
  params = PRESETS[preset]
  step = timeframe_delta(timeframe)
  rng = _streams(seed)
  base_vol = params.base_vol * math.sqrt(step / pd.Timedelta('15min'))
  time = trading_times(n_bars, step)
  if params.intraday and step < pd.Timedelta('1D'):
    scale = _HOURLY_VOL[np.asarray(time.hour)]
  else:
    scale = np.ones(n_bars)
  regime, seg_start = regime_path(n_bars, rng['durations'], rng['choices'], np.asarray(params.drift))
  draws = rng['quiet'].random((n_bars, 2))   # row-major: bar i's draws do not depend on n_bars
  quiet = draws[:, 0] < QUIET_SHARE
  quiet_ticks = 1.0 + np.floor(4.0 * draws[:, 1])   # 1-4 ticks
  log_ret = _log_returns(regime, seg_start, rng['returns'], base_vol, params, scale)
  log_ret[quiet] = 0.0
  sigma = base_vol * scale * np.asarray(params.vol)[regime]
  frame = _bars(log_ret, regime, rng, sigma, base_vol, quiet, quiet_ticks, point)
  frame.insert(0, 'time', time)
  return frame, regime


def _streams(seed) -> dict:
  """One independent generator per random component, each drawn in bar order.

  Separate streams make a series a prefix of any longer one with the same seed (how many durations are
  drawn depends on n_bars, and would otherwise shift every later draw): changing synthetic_bars extends the
  market instead of replacing it.
  """
  names = ('durations', 'choices', 'returns', 'intrabar', 'volume', 'spread', 'quiet')   # append only
  children = np.random.SeedSequence(seed).spawn(len(names))
  return {name: np.random.default_rng(child) for name, child in zip(names, children)}


def regime_path(n_bars: int, duration_rng: np.random.Generator, choice_rng: np.random.Generator,
                drift: np.ndarray = DRIFT):
  """Semi-Markov regime sequence (`drift` per regime only steers the bull/bear tilt).

  Returns:
    regime int32[T] and seg_start int64[T] (the index of the first bar of each bar's regime segment).
  """
  # Enough durations for the worst case (every segment at its minimum length).
  n_seg_max = n_bars // MIN_DURATION + 2
  durations = MIN_DURATION + duration_rng.geometric(1.0 / MEAN_EXTRA, size=n_seg_max) - 1
  n_seg = int(np.searchsorted(np.cumsum(durations), n_bars) + 1)
  durations = durations[:n_seg]
  choice_u = choice_rng.random(n_seg)
  seg_regime = np.empty(n_seg, np.int32)
  # A loop over segments (~T/300 iterations of scalar math), not over bars.
  level, current = 0.0, -1
  for k in range(n_seg):
    weights = np.ones(6)
    tilt = math.exp(-max(min(level / TILT_SCALE, 20.0), -20.0))  # tilt < 1 after net bull drift
    weights[[BULL_STRONG, BULL_WEAK]] *= tilt
    weights[[BEAR_STRONG, BEAR_WEAK]] /= tilt
    if current >= 0:
      weights[current] = 0.0
    cdf = np.cumsum(weights)
    current = int(np.searchsorted(cdf, choice_u[k] * cdf[-1], side='right'))
    current = min(current, 5)
    seg_regime[k] = current
    level += drift[current] * durations[k]  # expected log move so far, in units of the base vol
  regime = np.repeat(seg_regime, durations)[:n_bars].astype(np.int32)
  starts = np.concatenate([[0], np.cumsum(durations)[:-1]])
  seg_start = np.repeat(starts, durations)[:n_bars].astype(np.int64)
  return regime, seg_start


def _log_returns(regime: np.ndarray, seg_start: np.ndarray, rng: np.random.Generator, base_vol: float,
                 params: Preset, scale: np.ndarray):
  """Per-bar log returns float64[T] for a regime path (vectorised over bars); `scale` [T] is the intraday
  volatility multiple."""
  n = regime.shape[0]
  eps = rng.standard_normal(n)
  # Unit-variance AR(1) noise: the return's lag-1 autocorrelation inside a regime is ar_coef.
  ar = params.ar_coef
  from scipy import signal   # pylint: disable=g-import-not-at-top  (1.5 s of import the server never needs)
  noise = signal.lfilter([math.sqrt(1.0 - ar**2)], [1.0, -ar], eps)
  sigma = base_vol * np.asarray(params.vol)[regime] * scale
  ret = base_vol * np.asarray(params.drift)[regime] + sigma * noise
  in_range = regime == RANGE
  if in_range.any() and params.range_phi < 1.0:
    # Inside a RANGE segment the log price is level + d_t with d_t = phi d_{t-1} + sigma u_t and d = 0
    # before the segment. One filter over the whole series, then subtract the carried-over state
    # phi^(t - start + 1) * D[start - 1] so each segment starts from its own level exactly.
    phi = params.range_phi
    shock = np.where(in_range, sigma * noise, 0.0)
    dev_all = signal.lfilter([1.0], [1.0, -phi], shock)
    before = np.where(seg_start > 0, dev_all[np.maximum(seg_start - 1, 0)], 0.0)
    age = np.arange(n) - seg_start + 1
    dev = dev_all - phi**age * before
    dev_prev = np.where(age > 1, np.concatenate([[0.0], dev[:-1]]), 0.0)
    ret = np.where(in_range, dev - dev_prev, ret)
  return ret


def _on_grid(price: np.ndarray, point: float) -> np.ndarray:
  """Nearest grid price (at least one point). ticks / (1 / point) when 1/point is an integer (10**k), so a
  5-digit price is the double nearest its decimal text, exactly what a CSV round trip reads back."""
  ticks = np.maximum(np.rint(price / point), 1.0)
  inverse = round(1.0 / point)
  if abs(inverse * point - 1.0) < 1e-12:
    return ticks / inverse
  return ticks * point


def _bars(log_ret: np.ndarray, regime: np.ndarray, rng: dict, sigma: np.ndarray, base_vol: float,
          quiet: np.ndarray, quiet_ticks: np.ndarray, point: float) -> pd.DataFrame:
  """OHLC on the quote grid from an intrabar path per bar, plus tick volume and spread. `sigma` [T] is each
  bar's return volatility, `quiet` [T] marks bars without a price change. Returns a frame without `time`."""
  n = log_ret.shape[0]
  log_close = math.log(START_PRICE) + np.cumsum(log_ret)
  log_open = np.concatenate([[math.log(START_PRICE)], log_close[:-1]])
  high = np.empty(n)
  low = np.empty(n)
  for lo in range(0, n, _CHUNK):
    hi = min(lo + _CHUNK, n)
    z = rng['intrabar'].standard_normal((hi - lo, SUBSTEPS)) * (sigma[lo:hi, None] / math.sqrt(SUBSTEPS))
    z[quiet[lo:hi]] = 0.0    # a quiet bar does not move
    # Bridge: shift the steps so they sum to the bar's return, then pin the endpoint to the exact close.
    z += (log_ret[lo:hi] - z.sum(axis=1))[:, None] / SUBSTEPS
    path = log_open[lo:hi, None] + np.cumsum(z, axis=1)
    path[:, -1] = log_close[lo:hi]
    high[lo:hi] = np.maximum(path.max(axis=1), log_open[lo:hi])
    low[lo:hi] = np.minimum(path.min(axis=1), log_open[lo:hi])
  close = _on_grid(np.exp(log_close), point)
  open_ = np.concatenate([[_on_grid(np.array([START_PRICE]), point)[0]], close[:-1]])   # = previous close
  # Rounding to the grid is monotone, so these hold already; max/min guard the last ulp of exp.
  high = np.maximum(_on_grid(np.exp(high), point), np.maximum(open_, close))
  low = np.minimum(_on_grid(np.exp(low), point), np.minimum(open_, close))
  # Tick volume follows the bar's range (volatility and |return|) with lognormal noise; a quiet bar has a few.
  bar_range = (np.log(high) - np.log(low)) / base_vol
  noise = rng['volume'].lognormal(0.0, 0.3, n)
  volume = np.maximum(1.0, np.round(VOLUME_SCALE * (0.2 + bar_range) ** 0.8 * noise))
  volume = np.where(quiet, quiet_ticks, volume)
  widen = np.maximum(VOL[regime], 1.0)
  spread_points = np.maximum(1.0, np.rint(open_ * SPREAD_FRACTION * widen * rng['spread'].lognormal(0.0, 0.2, n)
                                          / point))
  inverse = round(1.0 / point)
  spread = spread_points / inverse if abs(inverse * point - 1.0) < 1e-12 else spread_points * point
  return pd.DataFrame({'open': open_, 'high': high, 'low': low, 'close': close, 'volume': volume,
                       'spread': spread, 'spread_points': spread_points})


def timeframe_delta(timeframe: str) -> pd.Timedelta:
  """'15min' -> Timedelta; UserError unless it is a positive divisor of one day."""
  try:
    step = pd.Timedelta(timeframe)
  except (ValueError, TypeError) as e:
    raise UserError(f"timeframe {timeframe!r} is not a pandas Timedelta string such as '15min'") from e
  day = pd.Timedelta('1D')
  if step <= pd.Timedelta(0) or day % step != pd.Timedelta(0):
    raise UserError(f"timeframe {timeframe!r} must be positive and divide one day evenly")
  return step


def trading_times(n_bars: int, step: pd.Timedelta, start: str = START_TIME) -> pd.DatetimeIndex:
  """n_bars UTC timestamps every `step`, Monday to Friday, from `start` (datetime64[ns, UTC])."""
  per_day = int(pd.Timedelta('1D') / step)
  n_days = -(-n_bars // per_day)
  # Calendar days needed: 7 per 5 weekdays, plus a week of slack for the starting weekday.
  days = pd.Timestamp(start).value + np.arange(n_days * 7 // 5 + 7, dtype=np.int64) * 86_400 * 10**9
  weekday = (days // (86_400 * 10**9) + 3) % 7   # 1970-01-01 was a Thursday (weekday 3)
  days = days[weekday < 5][:n_days]
  stamps = (days[:, None] + np.arange(per_day, dtype=np.int64)[None, :] * step.value).ravel()[:n_bars]
  return pd.DatetimeIndex(stamps.astype('datetime64[ns]')).tz_localize('UTC')
