"""Feature engine: counts, warm-up, causality of every feature, train/serve parity, scale invariance, smart-money
timing, market profile, and agreement with the TA-Lib-compatible indicators.

Compiling the full feature set is the main cost, so the suite uses only two input lengths (the session series
of SERIES_BARS bars and the serving window of WARMUP + 96 bars), each compiled once per process.
"""
import numpy as np
import pandas as pd
import jax
import jax.numpy as jnp
import pytest

from natron import features as F
from natron.data import synthetic_market
from natron.errors import UserError
from natron.features import indicators as ind
from natron.features import market_profile, smart_money

SERIES_BARS = 4000
WINDOW = 96
SERVE_BARS = F.WARMUP + WINDOW
COLS = ('open', 'high', 'low', 'close', 'volume')


def _market(seed):
  frame, _ = synthetic_market(SERIES_BARS, seed=seed)
  return frame


def _arrays(frame):
  return {k: frame[k].to_numpy(np.float64, copy=True) for k in COLS}   # never a view of the fixture


@pytest.fixture(scope='module')
def market():
  return _market(seed=3)


@pytest.fixture(scope='module')
def full(market):
  x, names = F.compute_features(market)
  return x, names


def _close(a, b, tol):
  """|a - b| <= tol * max(|b|, 1) elementwise, NaN == NaN."""
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
  out['open'][t + 1:] = open_
  out['close'][t + 1:] = close
  out['high'][t + 1:] = np.maximum(open_, close) + spread
  out['low'][t + 1:] = np.minimum(open_, close) - spread
  out['volume'][t + 1:] = rng.lognormal(8, 2, n)
  return out


def test_changing_the_future_never_changes_the_past(market, full):
  x_full, names = full
  arrays = _arrays(market)
  ts = [F.WARMUP - 1, F.WARMUP, F.WARMUP + 1, F.WARMUP + 37, 1500, 2222, 3100, SERIES_BARS - 2]
  for i, t in enumerate(ts):
    x, _ = F.compute_features(_perturbed_future(arrays, t, seed=i))
    ok = _close(x[:t + 1], x_full[:t + 1], 1e-6)
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
    ok = _close(x, reference[:SERVE_BARS], 1e-6)
    assert ok.all(), f'prefix rows differ for {_report(ok, names)}'


# --- train / serve parity ----------------------------------------------------------------------------------


@pytest.mark.parametrize('seed', [3, 11])
def test_serving_window_matches_full_history(seed, market, full):
  frame = market if seed == 3 else _market(seed)
  x_full = full[0] if seed == 3 else F.compute_features(frame)[0]
  x_serve, names = F.compute_features(frame.iloc[-SERVE_BARS:])
  tail_serve, tail_full = x_serve[-WINDOW:], x_full[-WINDOW:]
  assert np.isfinite(tail_serve).all()
  ok = _close(tail_serve, tail_full, 1e-4)
  assert ok.all(), f'serving window differs from full history for {_report(ok, names)}'


# --- scale invariance --------------------------------------------------------------------------------------


def test_scale_invariance(market, full):
  x_full, names = full
  scaled = market.copy()
  for k in ('open', 'high', 'low', 'close'):
    scaled[k] = scaled[k] * 1000.0
  scaled['volume'] = scaled['volume'] * 37.0
  x, _ = F.compute_features(scaled)
  a, b = x[F.WARMUP:], x_full[F.WARMUP:]
  err = np.abs(a - b) / np.maximum(np.abs(b), 1.0)
  # float32 rounds 1.1 and 1100 differently (~1e-7 relative, ~3e-4 ATR on this calm series), so continuous
  # features agree to ~1e-3 and a discrete choice (POC bin, a flag on a threshold) can flip on a near-tie in
  # a few rows. A feature that saw the price or volume level would differ by orders of magnitude everywhere.
  for i, name in enumerate(names):
    assert np.median(err[:, i]) <= 1e-3, name
    assert (err[:, i] > 5e-3).mean() <= 2e-3, f'{name} changes with the price scale'


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
  rng = np.random.default_rng(0)
  t = F.WARMUP + 200
  c = 100.0 * np.exp(np.cumsum(rng.normal(0, 1e-3, t)))
  h, l = c * 1.001, c * 0.999
  v = rng.lognormal(5, 0.3, t)
  # The last window: price oscillates between 95 and 105, but 3/4 of the volume trades in bars at 101.
  w = market_profile.WINDOW
  c[-w:] = np.where(np.arange(w) % 4 == 0, 101.0, np.linspace(95, 105, w))
  h[-w:], l[-w:] = c[-w:] + 0.05, c[-w:] - 0.05
  v[-w:] = np.where(np.arange(w) % 4 == 0, 1000.0, 10.0)
  c[-1], h[-1], l[-1] = 96.0, 96.05, 95.95
  cols = jax.jit(lambda *a: market_profile.compute(*a)[1])(*(jnp.array(x, jnp.float32) for x in (c, h, l, c, v)))
  names = market_profile.NAMES
  last = {n: float(col[-1]) for n, col in zip(names, cols)}
  atr = float(ind.atr(h.astype(np.float32), l.astype(np.float32), c.astype(np.float32), 14)[-1])
  poc_price = 96.0 - last['poc_dist_atr'] * atr
  bin_width = (105.05 - 94.95) / market_profile.BINS
  assert abs(poc_price - 101.0) <= bin_width / 2 + 1e-3
  assert last['val_dist_atr'] < 0 and last['in_value_area'] == 0.0       # the close is below the value area
  assert last['poc_share'] > 0.7 and last['volume_entropy'] < 0.5
  assert last['volume_below_close'] < 0.05


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
  c = 50.0 * np.exp(np.cumsum(rng.normal(0, 2e-3, t_len)))
  spread = np.abs(rng.normal(0, 1e-3, t_len)) * c
  spread[::17] = 0.0                                  # some zero-range bars
  h, l, v = (c + spread).astype(np.float32), (c - spread).astype(np.float32), rng.lognormal(3, 1, t_len)
  v = v.astype(np.float32)
  histogram = jax.jit(market_profile.volume_histogram, static_argnames=('window', 'bins', 'chunk'))
  one, _, _ = histogram(h, l, v, window=window, bins=bins)
  blocked, _, _ = histogram(h, l, v, window=window, bins=bins, chunk=64)    # 5 blocks, the last padded
  one, blocked = np.asarray(one), np.asarray(blocked)
  np.testing.assert_allclose(blocked, one, rtol=1e-6, atol=1e-7)
  assert np.isnan(one[:window - 1]).all() and np.isfinite(one[window - 1:]).all()
  for t in (window - 1, 100, 187, t_len - 1):
    np.testing.assert_allclose(one[t], _numpy_profile(h, l, v, t, window, bins), atol=2e-5, err_msg=f't={t}')


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
    np.testing.assert_allclose(got['sum'][n - 1:], ref.sum(axis=1), rtol=0, atol=2e-5 * n)
  # lag_fold visits lags oldest first, with NaN before the series starts.
  seen = jax.jit(lambda x: P.lag_fold((x,), 4, jnp.zeros((4,) + x.shape), lambda acc, lagged, k: acc.at[k].set(
      lagged[0])))(x[:10])
  for k in range(4):
    np.testing.assert_array_equal(np.asarray(seen)[k], np.concatenate([np.full(k, np.nan), x[:10 - k]]))


# --- agreement with the indicators -------------------------------------------------------------------------


def test_features_equal_the_indicators(market, full):
  x, names = full
  col = lambda n: x[F.WARMUP:, names.index(n)]
  o, h, l, c, v = (jnp.asarray(market[k].to_numpy(), jnp.float32) for k in COLS)

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
  for name, expected in ref.items():
    # MA levels carry ~1e-7 of the price in float32 (~1e-3 ATR here); the features use exact deviations.
    tol = 2e-3 if name.startswith(('close_', 'bb_')) else 1e-5
    np.testing.assert_array_less(np.abs(col(name) - expected), tol * np.maximum(np.abs(expected), 1.0),
                                 err_msg=name)


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
  with pytest.raises(UserError, match='non-positive'):
    F.compute_features(dict(arrays, low=np.where(np.arange(SERIES_BARS) == 9, 0.0, arrays['low'])))
  with pytest.raises(UserError, match='different lengths'):
    F.compute_features(dict(arrays, open=arrays['open'][:-1]))
  two = pd.concat([market.assign(symbol='A'), market.assign(symbol='B')])
  with pytest.raises(UserError, match='symbol'):
    F.compute_features(two)


# --- phase -------------------------------------------------------------------------------------------------


def test_phase_writes_matrix_and_summary(tmp_path, market, full):
  import json  # pylint: disable=g-import-not-at-top
  from configs import features as features_config  # pylint: disable=g-import-not-at-top
  from natron.features import phase  # pylint: disable=g-import-not-at-top
  config = features_config.get_config('quick')
  config.data.synthetic_bars = SERIES_BARS      # the session's compiled length: no new compile
  config.data.synthetic_seed = 3
  summary = phase.run_phase(config, str(tmp_path))
  saved = np.load(tmp_path / 'features' / 'features.npz')
  assert saved['features'].shape == (SERIES_BARS, F.NUM_FEATURES) and saved['features'].dtype == np.float32
  assert saved['names'].tolist() == list(F.FEATURE_NAMES) and set(saved['symbol'].tolist()) == {'SYNTH'}
  assert saved['time'].dtype == np.dtype('datetime64[ns]') and (np.diff(saved['time']) > np.timedelta64(0)).all()
  on_disk = json.loads((tmp_path / 'features' / 'features_summary.json').read_text())
  assert on_disk['categories'] == F.CATEGORY_COUNTS and on_disk['warmup'] == F.WARMUP
  assert summary['nan_free_rows'] == SERIES_BARS - F.WARMUP == on_disk['symbols']['SYNTH']['nan_free_rows']
  assert set(on_disk['feature_stats']) == set(F.FEATURE_NAMES)
  # The built-in market at this seed is the session's market, so the phase wrote the same matrix.
  np.testing.assert_array_equal(saved['features'], full[0])
