"""Feature engine: counts, warm-up, causality of every feature, train/serve parity, exactness on quote grids
(ties stay ties), smart-money timing, market profile, and agreement with the TA-Lib-compatible indicators.

The markets are generated here, on a real quote grid (EURUSD-like: point 1e-5 at ~1.1, ~3e-4 per-bar
volatility) with flat bars, open == close, opens on the previous close, equal highs / lows and integer tick
volumes, so every tie a real feed has is exercised. Compiling the full feature set is the main cost, so the
suite uses only two input lengths (the session series of SERIES_BARS bars and the serving window of
WARMUP + 96 bars), each compiled once per process.

Tolerances come from float32 error estimates (EPS32 = 2**-23), stated where they are used.
"""
import numpy as np
import pandas as pd
import jax
import jax.numpy as jnp
import pytest

from natron import features as F
from natron.data import grid
from natron.errors import UserError
from natron.features import indicators as ind
from natron.features import market_profile, patterns, smart_money
from test_indicators import grid_market

SERIES_BARS = 4000
WINDOW = 96
SERVE_BARS = F.WARMUP + WINDOW
COLS = ('open', 'high', 'low', 'close', 'volume')
PRICES = ('open', 'high', 'low', 'close')
POINT = 1e-5
EPS32 = float(np.finfo(np.float32).eps)


def _quote(ticks, point=POINT):
  """Prices in points -> the float64 quotes decimal text parses to."""
  return np.round(ticks * point, int(round(-np.log10(point))))


def _market(seed, n=SERIES_BARS, price=1.1, point=POINT):
  """A DataFrame of 15-minute bars on the `point` grid with the ties of a real feed (test_indicators.grid_market:
  flat bars, open == close, equal highs and lows, opens on the previous close, integer tick volumes)."""
  _, prices = grid_market(n, price, point, seed=seed)
  frame = pd.DataFrame({'time': pd.date_range('2024-01-01', periods=n, freq='15min', tz='UTC'), **prices})
  frame.attrs['point'] = point
  return frame


def _arrays(frame):
  return {k: frame[k].to_numpy(np.float64, copy=True) for k in COLS}   # never a view of the fixture


def _ticks(frame, point=POINT):
  """float64 integer ticks of the four price columns."""
  return {k: np.round(frame[k].to_numpy(np.float64) / point) for k in PRICES}


@pytest.fixture(scope='module')
def market():
  return _market(seed=3)


@pytest.fixture(scope='module')
def full(market):
  x, names = F.compute_features(market)
  return x, names


def _close(a, b, tol):
  """|a - b| <= tol * max(|b|, 1) elementwise, NaN == NaN (every feature is O(1): 1 is its natural scale)."""
  both_nan = np.isnan(a) & np.isnan(b)
  ok = np.abs(a - b) <= tol * np.maximum(np.abs(b), 1.0)
  return both_nan | ok


def _report(ok, names):
  bad = np.flatnonzero(~ok.all(axis=0))
  return [names[i] for i in bad]


# --- schema ------------------------------------------------------------------------------------------------

MINIMUM = {'moving_averages': 13, 'momentum': 13, 'volatility': 15, 'volume': 9, 'patterns': 8, 'returns': 8,
           'trend': 6, 'statistics': 6, 'support_resistance': 4, 'smart_money': 6, 'market_profile': 10}


def test_counts_names_and_schema(full):
  x, names = full
  assert F.NUM_FEATURES >= 100 and x.shape == (SERIES_BARS, F.NUM_FEATURES) and x.dtype == np.float32
  assert names == list(F.FEATURE_NAMES) and len(set(names)) == len(names)
  assert set(F.CATEGORY_COUNTS) == set(MINIMUM)
  for cat, minimum in MINIMUM.items():
    assert F.CATEGORY_COUNTS[cat] >= minimum, cat
  for required in ('adx_14', 'plus_di_14', 'minus_di_14', 'aroon_up_25', 'aroon_down_25', 'aroon_osc_25',
                   'skew_50', 'kurt_50', 'zscore_20', 'hurst_200', 'bos', 'choch', 'swing_high', 'swing_low',
                   'poc_dist_atr', 'vah_dist_atr', 'val_dist_atr', 'volume_entropy'):
    assert required in names
  digest = F.feature_schema_hash()
  assert len(digest) == 64 and digest == F.feature_schema_hash()
  assert F.LOOKBACK < F.WARMUP and F.WARMUP + WINDOW <= 1100


def test_nan_exactly_in_warmup_and_finite_after(full):
  x, _ = full
  assert np.isnan(x[:F.WARMUP]).all()
  assert np.isfinite(x[F.WARMUP:]).all()
  # Scale-free values: nothing near a price level or a raw volume.
  assert np.abs(x[F.WARMUP:]).max() < 1e3


def test_degenerate_bars_stay_finite(market):
  # No volume at all (an FX feed without volume) and 300 identical bars (a halted market) mid-series.
  arrays = _arrays(market)
  arrays['volume'][:] = 0.0
  flat = slice(2000, 2300)
  for k in ('open', 'high', 'low', 'close'):
    arrays[k][flat] = arrays['close'][flat.start - 1]
  x, names = F.compute_features(arrays)
  bad = [n for n, ok in zip(names, np.isfinite(x[F.WARMUP:]).all(axis=0)) if not ok]
  assert not bad, bad


def test_short_input_is_all_nan():
  frame = _market(seed=5).iloc[:F.WARMUP]
  x, names = F.compute_features(frame)
  assert x.shape == (F.WARMUP, len(names)) and np.isnan(x).all()


# --- causality ---------------------------------------------------------------------------------------------


def _perturbed_future(arrays, t, seed):
  """Bars > t replaced by a different, still valid OHLCV path (new random walk, volumes, ranges)."""
  rng = np.random.default_rng(seed)
  out = {k: v.copy() for k, v in arrays.items()}
  n = SERIES_BARS - t - 1
  if n <= 0:
    return out
  close = arrays['close'][t] * np.exp(np.cumsum(rng.normal(0, 3e-3, n)))
  open_ = np.concatenate([[arrays['close'][t]], close[:-1]]) * np.exp(rng.normal(0, 1e-3, n))
  spread = np.abs(rng.normal(0, 2e-3, n)) * close
  q = lambda a: _quote(np.round(a / POINT))                   # still on the quote grid
  out['open'][t + 1:] = q(open_)
  out['close'][t + 1:] = q(close)
  out['high'][t + 1:] = q(np.maximum(open_, close) + spread)
  out['low'][t + 1:] = q(np.minimum(open_, close) - spread)
  out['volume'][t + 1:] = np.round(rng.lognormal(8, 2, n))
  return out


def test_changing_the_future_never_changes_the_past(market, full):
  x_full, names = full
  arrays = _arrays(market)
  ts = [F.WARMUP - 1, F.WARMUP, F.WARMUP + 1, F.WARMUP + 37, 1500, 2222, 3100, SERIES_BARS - 2]
  for i, t in enumerate(ts):
    x, _ = F.compute_features(_perturbed_future(arrays, t, seed=i), point=POINT)
    # Same length, same program, same bars <= t: a causal feature's row is bit-identical.
    ok = (x[:t + 1] == x_full[:t + 1]) | (np.isnan(x[:t + 1]) & np.isnan(x_full[:t + 1]))
    assert ok.all(), f't={t}: rows <= t changed for {_report(ok, names)}'
    # The perturbation really changed later rows, so the check has teeth.
    if t < SERIES_BARS - 2:
      assert not np.allclose(x[t + 2:], x_full[t + 2:], equal_nan=True)


def test_real_prefixes_match_full_history(market, full):
  x_full, names = full
  other = _market(seed=11)
  x_other, _ = F.compute_features(other)
  for frame, reference in ((market, x_full), (other, x_other)):
    x, _ = F.compute_features(frame.iloc[:SERVE_BARS])       # frame[:t+1] with t = SERVE_BARS - 1
    # Another length: XLA may split loops (vectorised body / remainder) and contract FMAs differently, so a
    # row may round differently; chains of ~30 float32 roundings (recursions, window sums) bound it by
    # 64 EPS32 of the feature's O(1) scale.
    ok = _close(x, reference[:SERVE_BARS], 64 * EPS32)
    assert ok.all(), f'prefix rows differ for {_report(ok, names)}'


# --- train / serve parity ----------------------------------------------------------------------------------


@pytest.mark.parametrize('seed', [3, 11])
def test_serving_window_matches_full_history(seed, market, full):
  frame = market if seed == 3 else _market(seed)
  x_full = full[0] if seed == 3 else F.compute_features(frame)[0]
  x_serve, names = F.compute_features(frame.iloc[-SERVE_BARS:])
  tail_serve, tail_full = x_serve[-WINDOW:], x_full[-WINDOW:]
  assert np.isfinite(tail_serve).all()
  # The contract (DESIGN.md rule 6): 1e-4. The recursions forget their start as (1 - 2/101)^900 ~ 2e-8, the
  # rest is float32 rounding (64 EPS32 as above), so this bound is loose by design.
  ok = _close(tail_serve, tail_full, 1e-4)
  assert ok.all(), f'serving window differs from full history for {_report(ok, names)}'


# --- scale invariance --------------------------------------------------------------------------------------


def test_quote_scale_and_point_invariance(market, full):
  """The same bars quoted 1000x larger (1.12345 -> 1123.45, inferred point 0.01): identical ticks, identical
  features. On a 10x finer grid (point 1e-6: ticks x 10) with 37x the volume every comparison is the same, so
  flags are identical, and continuous features move only by rounding."""
  x_full, names = full
  scaled = market.copy()
  for k in PRICES:
    scaled[k] = np.round(scaled[k] * 1000.0, 2)
  scaled.attrs = {}
  x, _ = F.compute_features(scaled)
  np.testing.assert_array_equal(x, x_full)
  x10, _ = F.compute_features(market.assign(volume=market['volume'] * 37.0), point=POINT / 10)
  a, b = x10[F.WARMUP:], x_full[F.WARMUP:]
  err = np.abs(a - b) / np.maximum(np.abs(b), 1.0)
  flags = ('doji', 'hammer', 'shooting_star', 'engulfing', 'inside_bar', 'outside_bar', 'three_soldiers_crows',
           'swing_high', 'swing_low', 'bos', 'choch', 'structure_trend', 'bars_since_break', 'liquidity_sweep',
           'ema_alignment', 'in_value_area')
  for i, name in enumerate(names):
    if name in flags:
      np.testing.assert_array_equal(a[:, i], b[:, i], err_msg=name)
    else:
      # x10 is exact, but each later rounding differs: chains of ~30 float32 roundings (64 EPS32) in most
      # rows; a discrete choice among float sums (the POC bin on a tie of rounded shares) may flip in a few.
      assert np.median(err[:, i]) <= 64 * EPS32, name
      assert (err[:, i] > 1e-3).mean() <= 2e-3, f'{name} changes with the point'


# --- exact on the quote grid: ties stay ties ----------------------------------------------------------------


def _structure_reference(c, is_high, price_h, is_low, price_l):
  """Plain-Python break-of-structure scan (the definition in natron.features.smart_money), on exact ticks."""
  sh = sl = None
  sh_live = sl_live = False
  trend, out = 0, []
  for t in range(len(c)):
    if is_high[t]:
      sh, sh_live = price_h[t], True
    if is_low[t]:
      sl, sl_live = price_l[t], True
    up = sh_live and c[t] > sh
    down = sl_live and c[t] < sl
    bull, bear = up and not down, down and not up
    bos = int(bull and trend >= 0) - int(bear and trend <= 0)
    choch = int(bull and trend < 0) - int(bear and trend > 0)
    trend = 1 if bull else (-1 if bear else trend)
    sh_live, sl_live = sh_live and not up, sl_live and not down
    out.append((bos, choch, trend))
  return np.array(out, np.float64)


def test_ties_on_the_grid_behave_per_definition(market, full):
  """Every feature that compares or subtracts prices, against a float64 reference on the exact ticks: an open
  equal to the close is equal (doji, zero intrabar return), an open on the previous close is no gap, a low
  equal to the high two bars back is no fair value gap, an equal high is neither a swing nor a break, a body
  of exactly 10% of the range is a doji."""
  x, names = full
  col = lambda n: x[:, names.index(n)].astype(np.float64)
  tk = _ticks(market)
  o, h, l, c = tk['open'], tk['high'], tk['low'], tk['close']
  rows = np.arange(len(c)) >= F.WARMUP
  lag = lambda a, k: np.concatenate([np.full(k, np.nan), a[:-k]])
  rng, body = h - l, c - o
  upper, lower = h - np.maximum(o, c), np.minimum(o, c) - l
  # The data really has the ties this test is about.
  assert np.sum(rows & (o == c) & (rng > 0)) > 50 and np.sum(rows & (o == lag(c, 1))) > 1000
  assert np.sum(rows & (h == lag(h, 1))) > 100 and np.sum(rows & (10 * np.abs(body) == rng) & (rng > 0)) > 0
  has = rng > 0
  small = has & (20 * np.abs(body) <= 7 * rng)
  want = {
      'doji': has & (10 * np.abs(body) <= rng),
      'hammer': small & (5 * lower >= 3 * rng) & (10 * upper <= rng),
      'shooting_star': small & (5 * upper >= 3 * rng) & (10 * lower <= rng),
      'inside_bar': (h < lag(h, 1)) & (l > lag(l, 1)),
      'outside_bar': (h > lag(h, 1)) & (l < lag(l, 1)),
  }
  for name, flag in want.items():
    np.testing.assert_array_equal(col(name)[rows], flag[rows].astype(np.float64), err_msg=name)
  assert np.all(col('doji')[rows & (o == c) & has] == 1.0)
  pb = lag(body, 1)
  bigger = np.abs(body) > np.abs(pb)
  bull = (pb < 0) & (body > 0) & (o <= lag(c, 1)) & (c >= lag(o, 1)) & bigger
  bear = (pb > 0) & (body < 0) & (o >= lag(c, 1)) & (c <= lag(o, 1)) & bigger
  np.testing.assert_array_equal(col('engulfing')[rows], (bull.astype(float) - bear)[rows])
  # Exact zeros where the prices tie.
  assert np.all(col('logret_intrabar')[rows & (o == c)] == 0.0)
  assert np.all(col('gap_atr')[rows & (o == lag(c, 1))] == 0.0)
  assert np.all(col('body_atr')[rows & (o == c)] == 0.0)
  np.testing.assert_array_equal(np.sign(col('fvg_atr'))[rows],
                                np.sign(np.maximum(l - lag(h, 2), 0) - np.maximum(lag(l, 2) - h, 0))[rows])
  roll = lambda a, n, f: pd.Series(a).rolling(n).agg(f).to_numpy()
  assert np.all(col('dist_high_20_atr')[rows & (c == roll(h, 20, 'max'))] == 0.0)
  assert np.all(col('dist_low_20_atr')[rows & (c == roll(l, 20, 'min'))] == 0.0)
  np.testing.assert_array_equal((col('dist_high_50_atr') > 0)[rows], (roll(h, 50, 'max') > c)[rows])
  # Percentile rank: ties with earlier closes count half, exactly.
  win = np.lib.stride_tricks.sliding_window_view(c, 50)
  rank = ((win[:, :-1] < win[:, -1:]).sum(1) + 0.5 * (win[:, :-1] == win[:, -1:]).sum(1)) / 49
  np.testing.assert_allclose(col('pct_rank_50')[49:][rows[49:]], rank[rows[49:]], rtol=EPS32, atol=0)
  # Swings (strictly above / below K bars each side) and the structure scan, on exact ticks.
  k = smart_money.SWING_K
  win_h = np.lib.stride_tricks.sliding_window_view(h, 2 * k + 1)
  win_l = np.lib.stride_tricks.sliding_window_view(l, 2 * k + 1)
  others = np.r_[0:k, k + 1:2 * k + 1]
  swing_h = np.r_[np.zeros(2 * k, bool), win_h[:, k] > win_h[:, others].max(1)]
  swing_l = np.r_[np.zeros(2 * k, bool), win_l[:, k] < win_l[:, others].min(1)]
  np.testing.assert_array_equal(col('swing_high')[rows], swing_h[rows].astype(float))
  np.testing.assert_array_equal(col('swing_low')[rows], swing_l[rows].astype(float))
  assert np.sum(swing_h & ~np.r_[np.zeros(2 * k, bool), win_h[:, k] >= win_h[:, others].max(1)]) == 0
  assert np.sum(np.r_[np.zeros(2 * k, bool), win_h[:, k] == win_h[:, others].max(1)] & rows) > 0  # tied peaks
  ref = _structure_reference(c, swing_h, lag(h, k), swing_l, lag(l, k))
  for i, name in enumerate(('bos', 'choch', 'structure_trend')):
    np.testing.assert_array_equal(col(name)[rows], ref[rows, i], err_msg=name)


def test_an_equal_high_is_neither_a_swing_nor_a_break():
  # In points. A peak at bar 5 (high 20); bar 12 closes exactly at 20 (no break), bar 13 at 21 (BOS up, and a
  # new peak at 21); bars 18 and 19 tie at a high of 21: neither is a swing (strictly above K bars each side)
  # and closing at 20 below them breaks nothing.
  c = np.array([10, 11, 12, 13, 14, 15, 14, 13, 12, 13, 14, 15, 20, 21, 17, 16, 15, 18, 20, 20, 18, 17, 16, 15,
                15], np.float32)
  h, l = c.copy(), c - 1
  h[5] = 20
  h[14:] = c[14:] + 1
  is_high, price_h, is_low, price_l = (np.asarray(a) for a in smart_money.confirmed_swings(jnp.array(h),
                                                                                          jnp.array(l)))
  k = smart_money.SWING_K
  assert h[18] == h[19] == h[13] == 21 and np.flatnonzero(is_high).tolist() == [5 + k, 13 + k]
  assert price_h[5 + k] == 20 and price_h[13 + k] == 21
  ms = {key: np.asarray(val) for key, val in
        smart_money.market_structure(jnp.array(c), is_high, price_h, is_low, price_l).items()}
  assert ms['bos'][12] == 0.0 and ms['bos'][13] == 1.0 and np.flatnonzero(ms['bos']).tolist() == [13]
  assert not ms['choch'].any()


def test_candle_thresholds_are_exact_in_points():
  """Bodies and wicks at exactly the pattern thresholds (10%, 35%, 60%) count as the definition says (the
  bounds are inclusive); one point past them they do not."""
  #            o     h     l     c        body  upper  lower  (% of the range)
  bars = [(1000, 1010, 1000, 1001),     # 10    90     0     doji, shooting star
          (1000, 1010, 1000, 1002),     # 20    80     0     shooting star
          (1007, 1020, 1000, 1000),     # 35    65     0     shooting star
          (1006, 1020, 1000, 1013),     # 35    35     30    nothing
          (1012, 1020, 1000, 1018),     # 30    10     60    hammer (both bounds hit exactly)
          (1011, 1020, 1000, 1017),     # 30    15     55    nothing
          (1008, 1020, 1000, 1002),     # 30    60     10    shooting star (both bounds hit exactly)
          (1000, 1020, 1000, 1007),     # 35    65     0     shooting star
          (1000, 1020, 1000, 1008)]     # 40    60     0     nothing (body > 35%)
  o, h, l, c = (jnp.array([b[i] for b in bars], jnp.float32) for i in range(4))
  names, cols = patterns.compute(o, h, l, c, jnp.ones_like(c), atr=jnp.ones_like(c))
  got = {n: np.asarray(col).tolist() for n, col in zip(names, cols)}
  assert got['doji'] == [1, 0, 0, 0, 0, 0, 0, 0, 0]
  assert got['hammer'] == [0, 0, 0, 0, 1, 0, 0, 0, 0]
  assert got['shooting_star'] == [1, 1, 1, 0, 0, 0, 1, 1, 0]


# --- smart money -------------------------------------------------------------------------------------------


def test_swings_are_recorded_at_confirmation_and_breaks_on_the_breaking_bar():
  # Up to a peak at bar 5, down to a trough at bar 8, up through the peak (close 16 at bar 12), a new peak at
  # bar 14, then down through the trough (close 11 at bar 21).
  c = np.array([10, 11, 12, 13, 14, 15, 14, 13, 12, 13, 14, 15, 16, 17, 18, 17, 16, 15, 14, 13, 12, 11, 10],
               np.float32)
  h, l = c + 0.5, c - 0.5
  is_high, price_h, is_low, price_l = (np.asarray(a) for a in smart_money.confirmed_swings(jnp.array(h),
                                                                                          jnp.array(l)))
  k = smart_money.SWING_K
  assert k == 3
  assert np.flatnonzero(is_high).tolist() == [5 + k, 14 + k]      # known only k bars after the peak
  assert price_h[8] == 15.5 and price_h[17] == 18.5
  assert np.flatnonzero(is_low).tolist() == [8 + k]
  assert price_l[11] == 11.5
  ms = {key: np.asarray(val) for key, val in
        smart_money.market_structure(jnp.array(c), is_high, price_h, is_low, price_l).items()}
  assert np.isnan(ms['last_high'][:8]).all() and ms['last_high'][8] == 15.5     # not before confirmation
  assert np.flatnonzero(ms['bos']).tolist() == [12] and ms['bos'][12] == 1.0    # first break: BOS up
  assert np.flatnonzero(ms['choch']).tolist() == [21] and ms['choch'][21] == -1.0   # break against the trend
  assert ms['trend'][11] == 0 and ms['trend'][12] == 1 and ms['trend'][20] == 1 and ms['trend'][21] == -1
  assert ms['since'][12] == 0 and ms['since'][20] == 8 and ms['since'][21] == 0


# --- market profile ----------------------------------------------------------------------------------------


def test_volume_histogram_exact_small_window():
  # Window 4, 4 bins over [0, 4]: bars (low, high, volume). Each bar's volume spreads over its own range.
  lows = np.array([0, 1, 0, 3], np.float32)
  highs = np.array([4, 2, 1, 4], np.float32)
  vols = np.array([0, 6, 1, 1], np.float32)
  histogram = jax.jit(market_profile.volume_histogram, static_argnames=('window', 'bins', 'chunk'))
  p, lo, width = histogram(jnp.array(highs), jnp.array(lows), jnp.array(vols), window=4, bins=4, chunk=8)
  np.testing.assert_allclose(np.asarray(p)[3], np.array([1, 6, 0, 1]) / 8, atol=1e-6)
  assert float(lo[3]) == 0.0 and float(width[3]) == 1.0 and np.isnan(np.asarray(p)[:3]).all()
  poc, va_lo, va_hi = (np.asarray(a)[3] for a in market_profile.value_area(p))
  assert poc == 1 and va_lo == 1 and va_hi == 1           # 6/8 >= 70% in the POC bin alone


def test_profile_poc_sits_at_the_most_traded_price():
  # Prices in points of 0.01 (a stock at ~100): 10100 points is 101.00.
  rng = np.random.default_rng(0)
  t = F.WARMUP + 200
  c = np.round(10_000.0 * np.exp(np.cumsum(rng.normal(0, 1e-3, t))))
  h, l = c + 10, c - 10
  v = np.round(rng.lognormal(5, 0.3, t))
  # The last window: price oscillates between 95 and 105, but 3/4 of the volume trades in bars at 101.
  w = market_profile.WINDOW
  c[-w:] = np.where(np.arange(w) % 4 == 0, 10_100.0, np.round(np.linspace(9_500, 10_500, w)))
  h[-w:], l[-w:] = c[-w:] + 5, c[-w:] - 5
  v[-w:] = np.where(np.arange(w) % 4 == 0, 1000.0, 10.0)
  c[-1], h[-1], l[-1] = 9_600.0, 9_605.0, 9_595.0
  cols = jax.jit(lambda *a: market_profile.compute(*a)[1])(*(jnp.array(x, jnp.float32) for x in (c, h, l, c, v)))
  names = market_profile.NAMES
  last = {n: float(col[-1]) for n, col in zip(names, cols)}
  atr = float(ind.atr(h, l, c, 14)[-1])
  poc_price = 9_600.0 - last['poc_dist_atr'] * atr
  bin_width = (10_505 - 9_495) / market_profile.BINS
  assert abs(poc_price - 10_100.0) <= bin_width / 2 + 1e-3 * atr
  assert last['val_dist_atr'] < 0 and last['in_value_area'] == 0.0       # the close is below the value area
  assert last['poc_share'] > 0.7 and last['volume_entropy'] < 0.5
  assert last['volume_below_close'] < 0.05


def test_profile_rows_are_exact_on_the_grid():
  """Bars on the grid with every bin edge on the grid (a 16-point window range: 1-point bins): a zero-range
  bar exactly on an edge counts in the bin above it (bins are half-open), a bar spanning whole bins splits
  its volume exactly by points, and shares are exact fractions."""
  window, bins = 4, 16
  lows = np.array([1000, 1000, 1004, 1010], np.float32)
  highs = np.array([1016, 1000, 1004, 1012], np.float32)
  vols = np.array([16, 8, 4, 2], np.float32)
  histogram = jax.jit(market_profile.volume_histogram, static_argnames=('window', 'bins', 'chunk'))
  p, lo, width = histogram(jnp.array(highs), jnp.array(lows), jnp.array(vols), window=window, bins=bins)
  assert float(lo[3]) == 1000.0 and float(width[3]) == 1.0
  want = np.ones(16)                  # bar 0: 1 per 1-point bin
  want[0] += 8                        # bar 1 at 1000: the bin [1000, 1001)
  want[4] += 4                        # bar 2 at 1004, exactly on the edge 4: the bin [1004, 1005)
  want[10:12] += 1                    # bar 3 over [1010, 1012]: 1 per bin
  # Shares are k/30 for integers k: float32 rounding of the cdf sums (W terms) and one division, a few ulps.
  np.testing.assert_allclose(np.asarray(p)[3], want / want.sum(), rtol=0, atol=8 * EPS32)


def _numpy_profile(h, l, v, t, window, bins):
  """Reference volume profile of bars t-window+1..t: each bar's volume spread uniformly over its range."""
  hs, ls, vs = (x[t - window + 1:t + 1].astype(np.float64) for x in (h, l, v))
  lo, hi = ls.min(), hs.max()
  edges = lo + (hi - lo) / bins * np.arange(bins + 1)
  hist = np.zeros(bins)
  for a, b, vol in zip(ls, hs, vs):
    if b > a:
      hist += vol * np.clip((np.minimum(edges[1:], b) - np.maximum(edges[:-1], a)) / (b - a), 0, None)
    else:                                            # a zero-range bar: all its volume in its own bin
      hist[min(int((a - lo) / (hi - lo) * bins), bins - 1)] += vol
  return hist / hist.sum()


def test_volume_histogram_matches_reference_in_blocks():
  rng = np.random.default_rng(7)
  t_len, window, bins = 300, 24, 8
  c = np.round(5_000.0 * np.exp(np.cumsum(rng.normal(0, 2e-3, t_len))))      # a 50.00 stock, in points
  spread = np.round(np.abs(rng.normal(0, 1e-3, t_len)) * c)
  spread[::17] = 0.0                                  # some zero-range bars
  h, l, v = (c + spread).astype(np.float32), (c - spread).astype(np.float32), rng.lognormal(3, 1, t_len)
  v = np.round(v).astype(np.float32)
  histogram = jax.jit(market_profile.volume_histogram, static_argnames=('window', 'bins', 'chunk'))
  one, _, _ = histogram(h, l, v, window=window, bins=bins)
  blocked, _, _ = histogram(h, l, v, window=window, bins=bins, chunk=64)    # 5 blocks, the last padded
  one, blocked = np.asarray(one), np.asarray(blocked)
  # Same per-row arithmetic in blocks; only loop splitting / FMA contraction may differ: a few ulps of a share.
  np.testing.assert_allclose(blocked, one, rtol=0, atol=8 * EPS32)
  assert np.isnan(one[:window - 1]).all() and np.isfinite(one[window - 1:]).all()
  for t in (window - 1, 100, 187, t_len - 1):
    # float32 cdf: a sum of `window` terms of at most the window's volume, so window * EPS32 of the total (the
    # share's scale 1), doubled for the difference of two cdf rows.
    np.testing.assert_allclose(one[t], _numpy_profile(h, l, v, t, window, bins), atol=2 * window * EPS32,
                               err_msg=f't={t}')


def test_rolling_windows_match_numpy():
  from natron.features import primitives as P  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  x = rng.normal(0, 1, 700).astype(np.float32)
  for n in (1, 3, 20, 37, 200):
    ref = np.lib.stride_tricks.sliding_window_view(x.astype(np.float64), n)
    got = {name: np.asarray(jax.jit(fn, static_argnums=1)(x, n))
           for name, fn in (('sum', P.rolling_sum), ('max', P.rolling_max), ('min', P.rolling_min))}
    for name in got:
      assert np.isnan(got[name][:n - 1]).all(), (name, n)
    np.testing.assert_array_equal(got['max'][n - 1:], ref.max(axis=1).astype(np.float32))   # exact
    np.testing.assert_array_equal(got['min'][n - 1:], ref.min(axis=1).astype(np.float32))
    # A float32 sum of n terms: within n * EPS32 * sum|x| of the exact sum.
    np.testing.assert_array_less(np.abs(got['sum'][n - 1:] - ref.sum(axis=1)),
                                 n * EPS32 * np.abs(ref).sum(axis=1) + 1e-30)
  # lag_fold visits lags oldest first, with NaN before the series starts.
  seen = jax.jit(lambda x: P.lag_fold((x,), 4, jnp.zeros((4,) + x.shape), lambda acc, lagged, k: acc.at[k].set(
      lagged[0])))(x[:10])
  for k in range(4):
    np.testing.assert_array_equal(np.asarray(seen)[k], np.concatenate([np.full(k, np.nan), x[:10 - k]]))


# --- agreement with the indicators -------------------------------------------------------------------------


def test_features_equal_the_indicators(market, full):
  x, names = full
  col = lambda n: x[F.WARMUP:, names.index(n)]
  (o, h, l, c, v), _ = F.to_points(market)

  @jax.jit
  def reference(o, h, l, c, v):
    atr = ind.atr(h, l, c, 14)
    macd, signal, hist = ind.macd(c)
    upper, middle, lower = ind.bbands(c, 20, 2.0, 2.0)
    slowk, slowd = ind.stoch(h, l, c)
    down, up = ind.aroon(h, l, 25)
    return {
        'rsi_14': ind.rsi(c, 14) / 100, 'rsi_7': ind.rsi(c, 7) / 100, 'stoch_k': slowk / 100,
        'stoch_d': slowd / 100, 'willr_14': ind.willr(h, l, c, 14) / 100, 'cci_20': ind.cci(h, l, c, 20) / 100,
        'mfi_14': ind.mfi(h, l, c, v, 14) / 100, 'roc_10': ind.roc(c, 10) / 100,
        'macd_atr': macd / atr, 'macd_signal_atr': signal / atr, 'macd_hist_atr': hist / atr,
        'adx_14': ind.adx(h, l, c, 14) / 100, 'plus_di_14': ind.plus_di(h, l, c, 14) / 100,
        'minus_di_14': ind.minus_di(h, l, c, 14) / 100, 'aroon_up_25': up / 100, 'aroon_down_25': down / 100,
        'natr_14': ind.natr(h, l, c, 14) / 100, 'bb_pctb_20': (c - lower) / (upper - lower),
        'close_sma20_atr': (c - ind.sma(c, 20)) / atr, 'close_ema20_atr': (c - ind.ema(c, 20)) / atr,
        'close_ema100_atr': (c - ind.ema(c, 100)) / atr,
    }

  ref = {k: np.asarray(val)[F.WARMUP:] for k, val in reference(o, h, l, c, v).items()}
  atr = np.asarray(ind.atr(h, l, c, 14))[F.WARMUP:]
  upper, _, lower = ind.bbands(c, 20, 2.0, 2.0)
  band = np.asarray(upper - lower, np.float64)[F.WARMUP:]          # the unit of %b
  ulp_price = np.spacing(np.asarray(c, np.float32)[F.WARMUP:]).astype(np.float64)
  for name, expected in ref.items():
    if name.startswith(('close_', 'bb_')):
      # The reference rounds an MA LEVEL before subtracting it (the features use exact deviations): the
      # EMA(n) level recursion carries up to (n+1)/2 roundings of half an ulp of the price (EMA(100): ~25
      # ulps), an SMA one. 64 ulps of the price in points, in ATR (or band) units.
      unit = atr if name.startswith('close_') else band
      tol = 64 * ulp_price / np.abs(unit)
    else:
      # The same float32 operations traced in another jit (fusion and FMA contraction may differ): chains of
      # ~30 roundings through the recursions, 64 EPS32 of the value's O(1) scale.
      tol = 64 * EPS32 * np.maximum(np.abs(expected), 1.0)
    np.testing.assert_array_less(np.abs(col(name) - expected), tol, err_msg=name)


# --- input handling ----------------------------------------------------------------------------------------


def test_input_forms_agree_and_errors_are_clear(market, full):
  x_full, _ = full
  arrays = _arrays(market)
  np.testing.assert_array_equal(F.compute_features(arrays)[0], x_full)
  np.testing.assert_array_equal(F.compute_features(tuple(arrays[k] for k in COLS))[0], x_full)
  with pytest.raises(UserError, match='volume'):
    F.compute_features(market.drop(columns=['volume']))
  bad = dict(arrays, close=np.where(np.arange(SERIES_BARS) == 7, np.nan, arrays['close']))
  with pytest.raises(UserError, match='row 7'):
    F.compute_features(bad)
  with pytest.raises(UserError, match=r"prices must be > 0.*row 9"):   # the one candle rule set (natron.data.rules)
    F.compute_features(dict(arrays, low=np.where(np.arange(SERIES_BARS) == 9, 0.0, arrays['low'])))
  with pytest.raises(UserError, match=r"high >= max\(open, close\).*row 11"):
    F.compute_features(dict(arrays, high=np.where(np.arange(SERIES_BARS) == 11, arrays['low'] - 1e-3,
                                                         arrays['high'])))
  with pytest.raises(UserError, match='different lengths'):
    F.compute_features(dict(arrays, open=arrays['open'][:-1]))
  two = pd.concat([market.assign(symbol='A'), market.assign(symbol='B')])
  with pytest.raises(UserError, match='symbol'):
    F.compute_features(two)


def test_prices_enter_the_core_in_points(market, full):
  """compute_features converts prices to exact float32 integers (price / point) before the float32 core: the
  point comes from the argument, else frame.attrs['point'], else the quotes; off-grid prices are an error."""
  x_full, _ = full
  (o, h, l, c, v), point = F.to_points(market)
  assert point == POINT and all(a.dtype == np.float32 for a in (o, h, l, c, v))
  np.testing.assert_array_equal(c, np.round(market['close'].to_numpy() / POINT))
  arrays = _arrays(market)                                     # no attrs: the point is inferred
  assert F.to_points(arrays)[1] == POINT
  np.testing.assert_array_equal(F.compute_features(arrays)[0], x_full)
  np.testing.assert_array_equal(F.compute_features(market, point=POINT)[0], x_full)
  np.testing.assert_array_equal(np.asarray(jax.jit(F.compute_features_jax)(o, h, l, c, v)), x_full)
  one_symbol = market.assign(symbol='X')
  one_symbol.attrs = {'point': {'X': 1e-6}}                  # a loader's {symbol: point}
  assert F.to_points(one_symbol)[1] == 1e-6
  off = dict(arrays, close=np.where(np.arange(SERIES_BARS) == 5, arrays['close'] + 3e-6, arrays['close']))
  with pytest.raises(grid.GridError, match='not multiples of point'):
    F.compute_features(off, point=POINT)
  assert F.to_points(off)[1] == 1e-6                          # inferred: the finer grid all prices lie on
  with pytest.raises(UserError, match='point'):
    F.compute_features(arrays, point=-1.0)


# --- phase -------------------------------------------------------------------------------------------------


def test_phase_writes_matrix_and_summary(tmp_path, market, full):
  import json  # pylint: disable=g-import-not-at-top
  from configs import features as features_config  # pylint: disable=g-import-not-at-top
  from natron.features import phase  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'SYNTH.csv'                  # the session's grid market, as a CSV of decimal quotes
  out = market.copy()
  out['time'] = out['time'].dt.strftime('%Y-%m-%d %H:%M:%S')
  out.to_csv(path, index=False, float_format='%.5f')
  config = features_config.get_config('quick')
  config.data.path = str(path)                  # SERIES_BARS bars: the session's compiled length, no new compile
  summary = phase.run_phase(config, str(tmp_path))
  saved = np.load(tmp_path / 'features' / 'features.npz')
  assert saved['features'].shape == (SERIES_BARS, F.NUM_FEATURES) and saved['features'].dtype == np.float32
  assert saved['names'].tolist() == list(F.FEATURE_NAMES) and set(saved['symbol'].tolist()) == {'SYNTH'}
  assert saved['time'].dtype == np.dtype('datetime64[ns]') and (np.diff(saved['time']) > np.timedelta64(0)).all()
  on_disk = json.loads((tmp_path / 'features' / 'features_summary.json').read_text())
  assert on_disk['categories'] == F.CATEGORY_COUNTS and on_disk['warmup'] == F.WARMUP
  assert summary['nan_free_rows'] == SERIES_BARS - F.WARMUP == on_disk['symbols']['SYNTH']['nan_free_rows']
  assert set(on_disk['feature_stats']) == set(F.FEATURE_NAMES)
  # The file holds the session's market, so the phase wrote the same matrix.
  np.testing.assert_array_equal(saved['features'], full[0])
