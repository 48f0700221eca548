"""Parity of natron.features.indicators with TA-Lib (the test oracle) on real quote grids, edge cases, jit.

What we match: TA-Lib run in float64 on the prices IN POINTS (price / point, exact integers), the inputs
`natron.features.compute_features` gives the indicators (`natron.data.grid.to_ticks`). Our float32 inputs are
the same exact integers, so every difference, tie and comparison is exact and only the smoothing rounds.
TA-Lib on the raw float64 QUOTES is not the same oracle: float64 differences of decimal quotes are inexact
(1.10003 - 1.10000 != 1.09990 - 1.09987 in float64), so TA-Lib itself breaks grid ties in +DM/-DM and its
ADX/DI move by whole DI points (`test_talib_on_raw_quotes_breaks_grid_ties` documents it); for the unit-bearing
outputs (SMA, EMA, ATR, MACD, BBANDS, TRANGE) ticks x point also match TA-Lib on the raw quotes.

The markets are generated here: random walks quantised to real grids (point 1e-5 at ~1.1, 1e-3 at ~150, 1e-2
at ~50 and at ~3000) with EURUSD-M15-like per-bar volatility (~3e-4 relative, clustered), opens on the previous
close, open == close bars, flat bars (o = h = l = c), highs / lows equal to the previous bar's, and integer
tick volumes; the 1.1 series has 200,000 bars. On the 50 / 0.01 grid a bar moves ~1.5 points, so ties are
everywhere.

Tolerance (the contract): |ours - talib| <= 1e-4 * max(|talib|, scale) after a burn-in of 10 x the longest
period, where `scale` is the floor for values near 0, each output's natural unit:
- 0-100 (or +-100) oscillators (RSI, DI, ADX, MFI, WILLR, STOCH, AROON, CCI, ROC in percent): 1 point of the
  oscillator, i.e. 1e-4 of a point absolute near 0;
- price levels (SMA, EMA, BBANDS): the series' median price (the value itself, never near 0);
- small unit-bearing values that cross 0 or shrink on flat stretches (ATR, NATR, MACD lines, TRANGE): the
  median |talib value| of that output. MACD's float32 error scales with the EMA deviations it is the difference
  of, not with MACD itself, so near a zero crossing only an absolute floor of its own typical size is meaningful;
- OBV: the median bar volume (OBV crosses 0; one bar's volume is its natural unit).
Measured errors are ~1e-6 (float32 rounding through the recursions), far inside 1e-4 on any CPU.
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import talib
from scipy.signal import lfilter

from natron.errors import UserError
from natron.features import indicators as ind

RTOL = 1e-4
LONG_BARS = 200_000
GRID_BARS = 20_000
EDGE_BARS = 3_000
EPS32 = float(np.finfo(np.float32).eps)

# name -> (typical price, point)
GRIDS = {'fx5_1.1': (1.1, 1e-5), 'jpy3_150': (150.0, 1e-3), 'stock2_50': (50.0, 1e-2), 'index2_3000': (3000.0, 1e-2)}


def grid_market(n: int, price: float, point: float, seed: int = 0, vol: float = 3e-4):
  """OHLCV on a quote grid -> (ticks, prices): dicts of float64 arrays.

  `ticks` holds the prices in points (exact integers), `prices` the same quotes as decimal text would parse
  (np.round(ticks * point, decimals): the nearest float64 to each quote). Volume is integer tick volume.
  """
  rng = np.random.default_rng(seed)
  # Per-bar volatility ~3e-4 (15-minute EURUSD), slowly varying (log-AR(1)): calm and stressed spells.
  log_vol = lfilter([1.0], [1.0, -0.995], rng.normal(0.0, 0.05, n))
  sig = vol * np.exp(np.clip(log_vol, -1.5, 1.5))
  close = price * np.exp(np.cumsum(rng.normal(0.0, 1.0, n) * sig))
  open_ = np.concatenate([[price], close[:-1]]) * np.exp(rng.normal(0.0, 0.1, n) * sig)
  wicks = np.abs(rng.normal(0.0, 0.8, (2, n))) * sig * close
  q = lambda a: np.round(a / point)
  o, c = q(open_), q(close)
  h = np.maximum(q(np.maximum(open_, close) + wicks[0]), np.maximum(o, c))
  l = np.minimum(q(np.minimum(open_, close) - wicks[1]), np.minimum(o, c))
  u = rng.random((5, n))
  o = np.where(u[0] < 0.5, np.concatenate([c[:1], c[:-1]]), o)      # open on the previous close
  c = np.where(u[1] < 0.05, o, c)                                     # open == close
  h, l = np.maximum(h, np.maximum(o, c)), np.minimum(l, np.minimum(o, c))
  prev_h, prev_l = np.concatenate([h[:1], h[:-1]]), np.concatenate([l[:1], l[:-1]])
  h = np.where((u[2] < 0.1) & (prev_h >= np.maximum(o, c)), prev_h, h)   # equal highs
  l = np.where((u[3] < 0.1) & (prev_l <= np.minimum(o, c)), prev_l, l)   # equal lows
  flat = np.flatnonzero(u[4] < 0.03)
  flat = flat[flat > 0]
  for t in flat:                                                      # o = h = l = c at the previous close
    o[t] = h[t] = l[t] = c[t] = c[t - 1]
  volume = np.maximum(np.round(rng.lognormal(4.0, 0.7, n) * sig / vol), 1.0)
  volume[flat] = 1.0
  decimals = int(round(-np.log10(point)))
  ticks = {'open': o, 'high': h, 'low': l, 'close': c, 'volume': volume}
  prices = {k: (np.round(v * point, decimals) if k != 'volume' else v.copy()) for k, v in ticks.items()}
  return ticks, prices


# name -> (talib call, natron call, longest period, scale kind per output, unit-bearing)
SPECS = {
    'sma': (lambda m: talib.SMA(m['close']), lambda m: ind.sma(m['close']), 30, ('price',), True),
    'ema': (lambda m: talib.EMA(m['close']), lambda m: ind.ema(m['close']), 30, ('price',), True),
    'rsi': (lambda m: talib.RSI(m['close']), lambda m: ind.rsi(m['close']), 14, ('osc',), False),
    'atr': (lambda m: talib.ATR(m['high'], m['low'], m['close']),
            lambda m: ind.atr(m['high'], m['low'], m['close']), 14, ('typical',), True),
    'natr': (lambda m: talib.NATR(m['high'], m['low'], m['close']),
             lambda m: ind.natr(m['high'], m['low'], m['close']), 14, ('typical',), False),
    'adx': (lambda m: talib.ADX(m['high'], m['low'], m['close']),
            lambda m: ind.adx(m['high'], m['low'], m['close']), 14, ('osc',), False),
    'plus_di': (lambda m: talib.PLUS_DI(m['high'], m['low'], m['close']),
                lambda m: ind.plus_di(m['high'], m['low'], m['close']), 14, ('osc',), False),
    'minus_di': (lambda m: talib.MINUS_DI(m['high'], m['low'], m['close']),
                 lambda m: ind.minus_di(m['high'], m['low'], m['close']), 14, ('osc',), False),
    'cci': (lambda m: talib.CCI(m['high'], m['low'], m['close']),
            lambda m: ind.cci(m['high'], m['low'], m['close']), 14, ('osc',), False),
    'mfi': (lambda m: talib.MFI(m['high'], m['low'], m['close'], m['volume']),
            lambda m: ind.mfi(m['high'], m['low'], m['close'], m['volume']), 14, ('osc',), False),
    'obv': (lambda m: talib.OBV(m['close'], m['volume']),
            lambda m: ind.obv(m['close'], m['volume']), 1, ('volume',), False),
    'willr': (lambda m: talib.WILLR(m['high'], m['low'], m['close']),
              lambda m: ind.willr(m['high'], m['low'], m['close']), 14, ('osc',), False),
    'roc': (lambda m: talib.ROC(m['close']), lambda m: ind.roc(m['close']), 10, ('osc',), False),
    'macd': (lambda m: talib.MACD(m['close']), lambda m: ind.macd(m['close']), 26,
             ('typical', 'typical', 'typical'), True),
    'bbands': (lambda m: talib.BBANDS(m['close']), lambda m: ind.bbands(m['close']), 20,
               ('price', 'price', 'price'), True),
    'stoch': (lambda m: talib.STOCH(m['high'], m['low'], m['close']),
              lambda m: ind.stoch(m['high'], m['low'], m['close']), 5, ('osc', 'osc'), False),
    'aroon': (lambda m: talib.AROON(m['high'], m['low']), lambda m: ind.aroon(m['high'], m['low']), 14,
              ('osc', 'osc'), False),
    'true_range': (lambda m: talib.TRANGE(m['high'], m['low'], m['close']),
                   lambda m: ind.true_range(m['high'], m['low'], m['close']), 1, ('typical',), True),
}
TALIB_DEFINED = [name for name in SPECS if name != 'true_range']
UNIT_BEARING = [name for name, spec in SPECS.items() if spec[4]]
assert sorted(TALIB_DEFINED) == sorted(n for n in ind.__all__ if n not in ('dmi', 'true_range', 'LOOKBACK'))


def _outputs(value):
  """A single array or a tuple of arrays -> tuple of float64 numpy arrays."""
  values = value if isinstance(value, tuple) else (value,)
  return tuple(np.asarray(v, np.float64) for v in values)


def _scale(kind, expected, market):
  valid = expected[~np.isnan(expected)]
  typical = float(np.median(np.abs(valid))) if valid.size else 0.0
  return {'osc': 1.0,
          'price': float(np.median(market['close'])),
          'volume': float(np.median(market['volume'])),
          'typical': typical if typical > 0 else 1.0}[kind]  # 1.0 on a flat series (ATR == 0)


def scaled_errors(name, market, actual, burn_in=None, expected=None):
  """Max |ours - talib| / max(|talib|, scale) after the burn-in, per output; asserts equal NaN rows."""
  talib_fn, _, period, kinds, _ = SPECS[name]
  expected = _outputs(talib_fn(market)) if expected is None else expected
  assert len(expected) == len(actual) == len(kinds), name
  burn = 10 * period if burn_in is None else burn_in
  errors = []
  for i, (want, got, kind) in enumerate(zip(expected, actual, kinds)):
    assert got.shape == want.shape, (name, i)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f'{name}[{i}] NaN rows differ')
    w, g = want[burn:], got[burn:]
    ok = ~np.isnan(w)
    err = np.abs(g[ok] - w[ok]) / np.maximum(np.abs(w[ok]), _scale(kind, want, market))
    errors.append((float(err.max()) if err.size else 0.0,
                   burn + int(np.flatnonzero(ok)[err.argmax()]) if err.size else -1))
  return errors


def assert_matches_talib(name, market, burn_in=None):
  """Same NaN rows as TA-Lib on the same inputs everywhere; values within RTOL after the burn-in."""
  actual = _outputs(SPECS[name][1](market))
  for i, (err, row) in enumerate(scaled_errors(name, market, actual, burn_in)):
    assert err <= RTOL, f'{name}[{i}]: max scaled error {err:.2e} at row {row}'


@pytest.fixture(scope='module')
def markets():
  """grid name -> (ticks, prices); the 1.1 / 1e-5 series is the 200,000-bar one."""
  out = {}
  for i, (grid, (price, point)) in enumerate(GRIDS.items()):
    n = LONG_BARS if point == 1e-5 else GRID_BARS
    out[grid] = grid_market(n, price, point, seed=i)
  return out


def _edge(ticks):
  """Degenerate stretches on a tick series: flat bars for 60 and 400 bars (Wilder sums decay ~1e-13 without
  reaching 0), no volume for 100 bars, equal closes inside a 3-point range, and a start with constant
  high/low (zero directional movement: DX undefined, ADX holds its value)."""
  m = {k: v[:EDGE_BARS].copy() for k, v in ticks.items()}
  o, h, l, c, v = (m[k] for k in ('open', 'high', 'low', 'close', 'volume'))
  for s, length in ((300, 60), (900, 400)):
    o[s:s + length] = h[s:s + length] = l[s:s + length] = c[s:s + length] = c[s - 1]
  v[1500:1600] = 0.0
  c[2500:2540] = c[2499]
  h[2500:2540], l[2500:2540] = c[2499] + 3, c[2499] - 3
  h[:100], l[:100] = c[0] + 50, c[0] - 50
  c[:100] = np.where(np.arange(100) % 2, c[0] - 20, c[0] + 20)
  o[:100] = c[:100]
  return m


@pytest.fixture(scope='module')
def edge_markets(markets):
  return {grid: _edge(markets[grid][0]) for grid in ('fx5_1.1', 'stock2_50')}


# --- the data ----------------------------------------------------------------------------------------------


def test_markets_are_on_real_grids_with_ties(markets):
  for grid, (ticks, prices) in markets.items():
    price, point = GRIDS[grid]
    o, h, l, c, v = (ticks[k] for k in ('open', 'high', 'low', 'close', 'volume'))
    for k in ('open', 'high', 'low', 'close'):
      assert np.array_equal(ticks[k], np.round(ticks[k])) and ticks[k].max() < 2**24, (grid, k)
      np.testing.assert_array_equal(np.round(prices[k] / point), ticks[k])
    assert np.array_equal(v, np.round(v)) and v.min() >= 0, grid
    assert np.all(h >= np.maximum(o, c)) and np.all(l <= np.minimum(o, c)), grid
    assert 0.5 * price < np.median(prices['close']) < 2 * price, grid
    r = np.diff(np.log(prices['close']))
    assert 1e-4 < r.std() < 1e-3, (grid, r.std())                  # EURUSD M15 ~3e-4 per bar
    up, down = np.diff(h), -np.diff(l)
    assert np.mean((h == l) & (o == c)) > 0.01, grid                 # flat bars
    assert np.mean(o == c) > 0.05 and np.mean(up == 0) > 0.05 and np.mean(down == 0) > 0.05, grid
    assert np.mean((up == down) & (up > 0)) > 1e-3, grid             # tied directional moves
  assert len(markets['fx5_1.1'][0]['close']) >= 200_000


# --- parity ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('grid', sorted(GRIDS))
@pytest.mark.parametrize('name', sorted(SPECS))
def test_matches_talib_on_ticks(name, grid, markets):
  assert_matches_talib(name, markets[grid][0])


@pytest.mark.parametrize('grid', sorted(GRIDS))
@pytest.mark.parametrize('name', sorted(UNIT_BEARING))
def test_unit_bearing_outputs_in_price_units_match_talib_on_quotes(name, grid, markets):
  """ticks x point equals TA-Lib on the raw float64 quotes (these outputs have no grid ties to break)."""
  ticks, prices = markets[grid]
  point = GRIDS[grid][1]
  in_price = tuple(out * point for out in _outputs(SPECS[name][1](ticks)))
  for i, (err, row) in enumerate(scaled_errors(name, prices, in_price)):
    assert err <= RTOL, f'{name}[{i}] x point vs TA-Lib on quotes: {err:.2e} at row {row}'


def test_talib_on_raw_quotes_breaks_grid_ties(markets):
  """Documents the oracle choice: float64 differences of decimal quotes break +DM/-DM ties, so TA-Lib on the
  raw quotes and TA-Lib on price / point differ in ADX/DI by far more than 1e-4 (every other TA-Lib output
  agrees between the two to float64 rounding); we match TA-Lib on price / point."""
  ticks, prices = markets['fx5_1.1']
  for name in ('adx', 'plus_di', 'minus_di'):
    err, _ = scaled_errors(name, ticks, _outputs(SPECS[name][0](prices)))[0]
    assert err > 1e-2, (name, err)
  for name in ('rsi', 'cci', 'mfi', 'willr', 'roc', 'stoch', 'aroon', 'natr', 'obv'):
    for err, _ in scaled_errors(name, ticks, _outputs(SPECS[name][0](prices))):
      assert err < 1e-8, (name, err)


@pytest.mark.parametrize('grid', ['fx5_1.1', 'stock2_50'])
def test_float32_prices_were_the_bug(grid, markets):
  """The old failure mode: the same indicators on float32 price LEVELS miss TA-Lib by more than 1e-4
  (ties broken, small differences rounded), while on ticks they match (test_matches_talib_on_ticks)."""
  ticks, prices = markets[grid]
  as_f32 = {k: v.astype(np.float32) for k, v in prices.items()}
  for name in ('adx', 'plus_di', 'minus_di', 'mfi', 'cci', 'stoch', 'willr'):
    worst = max(err for err, _ in scaled_errors(name, ticks, _outputs(SPECS[name][1](as_f32))))
    assert worst > RTOL, (name, worst)
    assert max(err for err, _ in scaled_errors(name, ticks, _outputs(SPECS[name][1](ticks)))) <= RTOL


@pytest.mark.parametrize('grid', ['fx5_1.1', 'stock2_50'])
@pytest.mark.parametrize('name', sorted(SPECS))
def test_matches_talib_on_degenerate_bars(name, grid, edge_markets):
  # Flat stretches exercise every zero-denominator branch; no burn-in needed beyond the warm-up.
  assert_matches_talib(name, edge_markets[grid], burn_in=0)


@pytest.mark.parametrize('name', sorted(SPECS))
def test_flat_series(name):
  """A constant market: TA-Lib's values (RSI/DI/ADX/STOCH/WILLR/CCI/ROC 0, AROON per ties, OBV = v[0])."""
  flat = {k: np.full(EDGE_BARS, 110_000.0 if k != 'volume' else 100.0) for k in
          ('open', 'high', 'low', 'close', 'volume')}
  assert_matches_talib(name, flat, burn_in=0)
  for out in _outputs(SPECS[name][1](flat)):
    assert np.all(np.isfinite(out[60:]))


@pytest.mark.parametrize('length', [1, 13])
@pytest.mark.parametrize('name', sorted(SPECS))
def test_short_series(name, length, edge_markets):
  """Fewer bars than the warm-up: all NaN like TA-Lib (no crash); STOCH's 8-bar warm-up fits in 13 bars."""
  short = {k: v[:length] for k, v in edge_markets['stock2_50'].items()}
  assert_matches_talib(name, short, burn_in=0)
  lookback = ind.LOOKBACK[name]
  for out in _outputs(SPECS[name][1](short)):
    assert out.shape == (length,)
    assert np.all(np.isnan(out[:lookback])) and np.all(~np.isnan(out[lookback:]))


def test_lookback_table_matches_talib(markets):
  sample = {k: v[:500] for k, v in markets['jpy3_150'][0].items()}
  for name, spec in SPECS.items():
    first = _outputs(spec[0](sample))[0]
    assert np.argmax(~np.isnan(first)) == ind.LOOKBACK[name], name


# --- causality and jit -------------------------------------------------------------------------------------


@pytest.mark.parametrize('name', sorted(SPECS))
def test_causal(name, edge_markets):
  """Row t computed on bars[:t+1] equals the full-series row t (same start, so recursions agree too).

  Bit for bit (scans, and window reductions of exact integers), except BBANDS: its two-pass sum of squared
  deviations may be contracted into FMAs in the vectorised body of the loop and not in its remainder, which
  XLA splits differently for other lengths, so a row may move by one rounding of the variance (1 ulp of
  the band, bounded by 2 ulp here)."""
  market = edge_markets['fx5_1.1']
  full = _outputs(SPECS[name][1](market))
  prefix = _outputs(SPECS[name][1]({k: v[:1500] for k, v in market.items()}))
  for a, b in zip(full, prefix):
    if name == 'bbands':
      np.testing.assert_allclose(b, a[:1500], rtol=2 * EPS32, atol=0, equal_nan=True)
    else:
      np.testing.assert_array_equal(b, a[:1500])


def test_all_indicators_fuse_in_one_jit(edge_markets):
  """Every indicator inside ONE jitted function (as compute_features uses them) matches the standalone call
  and does not retrace on new data of the same shape."""
  market = edge_markets['fx5_1.1']

  @jax.jit
  @chex.assert_max_traces(n=1)
  def everything(o, h, l, c, v):
    del o
    m = {'high': h, 'low': l, 'close': c, 'volume': v}
    return {name: spec[1](m) for name, spec in SPECS.items()}

  cols = ('open', 'high', 'low', 'close', 'volume')
  arrays = [jnp.asarray(market[k], jnp.float32) for k in cols]
  fused = everything(*arrays)
  everything(*[a + 7.0 for a in arrays])  # new values, same shapes: assert_max_traces fails on a retrace
  for name, spec in SPECS.items():
    outs = fused[name] if isinstance(fused[name], tuple) else (fused[name],)
    assert all(o.dtype == jnp.float32 and o.shape == (EDGE_BARS,) for o in outs), name
    alone = _outputs(spec[1](market))
    # Fusion may contract a*b+c into an FMA or reassociate a sum, so each step rounds differently; a
    # contractive recursion with weight alpha carries ~1/alpha such roundings (<= 31 for EMA(30)), and a
    # window sum n of them: 64 float32 eps of each output's natural scale bounds both.
    for err, row in scaled_errors(name, market, _outputs(fused[name]), 0, alone):
      assert err <= 64 * EPS32, (name, err, row)


def test_dmi_equals_separate_calls(edge_markets):
  m = edge_markets['fx5_1.1']
  h, l, c = m['high'], m['low'], m['close']
  for got, want in zip(ind.dmi(h, l, c), (ind.plus_di(h, l, c), ind.minus_di(h, l, c), ind.adx(h, l, c))):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_non_default_periods_match_talib(markets):
  m = {k: v[:20_000] for k, v in markets['fx5_1.1'][0].items()}
  h, l, c = m['high'], m['low'], m['close']
  price = float(np.median(c))
  typical = lambda x: float(np.nanmedian(np.abs(x)))
  macd = talib.MACD(c, fastperiod=26, slowperiod=12, signalperiod=5)[0]
  cases = [  # (talib, ours, scale): the scales of the module docstring
      (talib.RSI(c, timeperiod=7), ind.rsi(c, timeperiod=7), 1.0),
      (talib.ADX(h, l, c, timeperiod=20), ind.adx(h, l, c, timeperiod=20), 1.0),
      (talib.PLUS_DI(h, l, c, timeperiod=2), ind.plus_di(h, l, c, timeperiod=2), 1.0),
      (talib.ATR(h, l, c, timeperiod=1), ind.atr(h, l, c, timeperiod=1), typical(talib.ATR(h, l, c, 1))),
      (talib.AROON(h, l, timeperiod=25)[1], ind.aroon(h, l, timeperiod=25)[1], 1.0),
      (talib.STOCH(h, l, c, fastk_period=14, slowk_period=1, slowd_period=5)[1],
       ind.stoch(h, l, c, fastk_period=14, slowk_period=1, slowd_period=5)[1], 1.0),
      # TA-Lib swaps fast and slow when fast > slow.
      (macd, ind.macd(c, fastperiod=26, slowperiod=12, signalperiod=5)[0], typical(macd)),
      (talib.BBANDS(c, timeperiod=5, nbdevup=1.5, nbdevdn=3.0)[2],
       ind.bbands(c, timeperiod=5, nbdevup=1.5, nbdevdn=3.0)[2], price),
  ]
  for i, (want, got, scale) in enumerate(cases):
    got = np.asarray(got, np.float64)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=str(i))
    w, g = want[400:], got[400:]
    assert np.max(np.abs(g - w) / np.maximum(np.abs(w), scale)) <= RTOL, i


def test_clear_errors_for_bad_input():
  x = np.linspace(1.0, 2.0, 50)
  with pytest.raises(UserError, match='1-D'):
    ind.sma(x.reshape(5, 10))
  with pytest.raises(UserError, match='same length'):
    ind.atr(x, x[:-1], x)
  with pytest.raises(UserError, match='timeperiod must be >= 2'):
    ind.rsi(x, timeperiod=1)
  with pytest.raises(UserError, match='timeperiod must be >= 2'):
    ind.plus_di(x, x, x, timeperiod=1)  # TA-Lib's period-1 DI drops the factor 100: not mirrored
  with pytest.raises(UserError, match='static'):
    jax.jit(lambda a, n: ind.ema(a, timeperiod=n))(x, 10)
