"""Parity of natron.features.indicators with TA-Lib (the test oracle), plus edge cases and jit behaviour.

The market is a 200,000-bar random walk at an FX-like price level (~1.1, quoted to 5 decimals) with volatility
clustering, wicks and volume that follows volatility. Prices and volumes are rounded to float32 BEFORE both
TA-Lib (float64) and natron (float32) see them, so the comparison measures the algorithms, not the rounding
of the inputs.

Tolerance: |ours - talib| <= 1e-4 * max(|talib|, scale) after a burn-in of 10 x the longest period, where
`scale` is chosen per output so that values near 0 are judged on the output's natural unit:
- 0-100 (or +-100) oscillators (RSI, DI, ADX, MFI, WILLR, STOCH, AROON, CCI): scale 1;
- price levels (SMA, EMA, BBANDS): the series' median price (~1.1);
- small unbounded values (ATR, NATR, MACD lines, ROC): the median |talib value| of that output, which is
  stricter than the price level (a MACD value is ~1e-3 of the price);
- OBV: the median bar volume (OBV crosses 0; one bar's volume is its natural unit).
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

N_BARS = 200_000
RTOL = 1e-4


def random_walk_market(n: int, seed: int = 0):
  """Float32-representable FX-like OHLCV (float64 arrays): price ~1.1, clustered volatility, wicks, volume."""
  rng = np.random.default_rng(seed)
  # Per-bar volatility ~3e-4 (15-minute EURUSD), slowly varying (log-AR(1)) so calm and stressed spells exist.
  log_vol = lfilter([1.0], [1.0, -0.995], rng.normal(0.0, 0.05, n))
  vol = 3e-4 * np.exp(np.clip(log_vol, -1.5, 1.5))
  close = 1.1 * np.exp(np.cumsum(rng.normal(0.0, 1.0, n) * vol))
  open_ = np.concatenate([[1.1], close[:-1]]) * np.exp(rng.normal(0.0, 0.1, n) * vol)
  wicks = np.abs(rng.normal(0.0, 0.8, (2, n))) * vol * close
  high = np.maximum(open_, close) + wicks[0]
  low = np.minimum(open_, close) - wicks[1]
  volume = np.round(rng.lognormal(5.5, 0.5, n) * vol / 3e-4, 2)  # lots with 2 decimals: not integers
  as_f32 = lambda a: a.astype(np.float32).astype(np.float64)
  quote = lambda a: as_f32(np.round(a, 5))
  return {'open': quote(open_), 'high': quote(high), 'low': quote(low), 'close': quote(close),
          'volume': as_f32(volume)}


# name -> (talib call, natron call, longest period, scale kind per output)
SPECS = {
    'sma': (lambda m: talib.SMA(m['close']), lambda m: ind.sma(m['close']), 30, ('price',)),
    'ema': (lambda m: talib.EMA(m['close']), lambda m: ind.ema(m['close']), 30, ('price',)),
    'rsi': (lambda m: talib.RSI(m['close']), lambda m: ind.rsi(m['close']), 14, ('osc',)),
    'atr': (lambda m: talib.ATR(m['high'], m['low'], m['close']),
            lambda m: ind.atr(m['high'], m['low'], m['close']), 14, ('typical',)),
    'natr': (lambda m: talib.NATR(m['high'], m['low'], m['close']),
             lambda m: ind.natr(m['high'], m['low'], m['close']), 14, ('typical',)),
    'adx': (lambda m: talib.ADX(m['high'], m['low'], m['close']),
            lambda m: ind.adx(m['high'], m['low'], m['close']), 14, ('osc',)),
    'plus_di': (lambda m: talib.PLUS_DI(m['high'], m['low'], m['close']),
                lambda m: ind.plus_di(m['high'], m['low'], m['close']), 14, ('osc',)),
    'minus_di': (lambda m: talib.MINUS_DI(m['high'], m['low'], m['close']),
                 lambda m: ind.minus_di(m['high'], m['low'], m['close']), 14, ('osc',)),
    'cci': (lambda m: talib.CCI(m['high'], m['low'], m['close']),
            lambda m: ind.cci(m['high'], m['low'], m['close']), 14, ('osc',)),
    'mfi': (lambda m: talib.MFI(m['high'], m['low'], m['close'], m['volume']),
            lambda m: ind.mfi(m['high'], m['low'], m['close'], m['volume']), 14, ('osc',)),
    'obv': (lambda m: talib.OBV(m['close'], m['volume']),
            lambda m: ind.obv(m['close'], m['volume']), 1, ('volume',)),
    'willr': (lambda m: talib.WILLR(m['high'], m['low'], m['close']),
              lambda m: ind.willr(m['high'], m['low'], m['close']), 14, ('osc',)),
    'roc': (lambda m: talib.ROC(m['close']), lambda m: ind.roc(m['close']), 10, ('typical',)),
    'macd': (lambda m: talib.MACD(m['close']), lambda m: ind.macd(m['close']), 26,
             ('typical', 'typical', 'typical')),
    'bbands': (lambda m: talib.BBANDS(m['close']), lambda m: ind.bbands(m['close']), 20,
               ('price', 'price', 'price')),
    'stoch': (lambda m: talib.STOCH(m['high'], m['low'], m['close']),
              lambda m: ind.stoch(m['high'], m['low'], m['close']), 5, ('osc', 'osc')),
    'aroon': (lambda m: talib.AROON(m['high'], m['low']), lambda m: ind.aroon(m['high'], m['low']), 14,
              ('osc', 'osc')),
    'true_range': (lambda m: talib.TRANGE(m['high'], m['low'], m['close']),
                   lambda m: ind.true_range(m['high'], m['low'], m['close']), 1, ('typical',)),
}


def _outputs(value):
  """A single array or a tuple of arrays -> tuple of float64 numpy arrays."""
  values = value if isinstance(value, tuple) else (value,)
  return tuple(np.asarray(v, np.float64) for v in values)


def _scale(kind, expected, market):
  typical = np.median(np.abs(expected[~np.isnan(expected)])) if np.any(~np.isnan(expected)) else 0.0
  return {'osc': 1.0,
          'price': float(np.median(market['close'])),
          'volume': float(np.median(market['volume'])),
          'typical': float(typical) if typical > 0 else 1.0}[kind]  # 1.0 on a flat series (ATR == 0)


def assert_matches_talib(name, market, burn_in=None):
  """Same NaN rows as TA-Lib everywhere; values within RTOL * max(|talib|, scale) after the burn-in."""
  talib_fn, ours_fn, period, kinds = SPECS[name]
  expected, actual = _outputs(talib_fn(market)), _outputs(ours_fn(market))
  assert len(expected) == len(actual) == len(kinds), name
  burn = 10 * period if burn_in is None else burn_in
  for i, (want, got, kind) in enumerate(zip(expected, actual, kinds)):
    assert got.shape == want.shape, (name, i)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f'{name}[{i}] NaN rows differ')
    w, g = want[burn:], got[burn:]
    ok = ~np.isnan(w)
    err = np.abs(g[ok] - w[ok]) / np.maximum(np.abs(w[ok]), _scale(kind, want, market))
    assert err.size == 0 or err.max() <= RTOL, (
        f'{name}[{i}]: max scaled error {err.max():.2e} at row {burn + np.flatnonzero(ok)[err.argmax()]}')


@pytest.fixture(scope='module')
def market():
  return random_walk_market(N_BARS, seed=0)


@pytest.fixture(scope='module')
def edge_market():
  """2,000 bars with frozen stretches (h = l = c), equal closes inside a range, and a start with constant
  high/low (zero directional movement, so DX is undefined and ADX must hold its value)."""
  m = random_walk_market(2_000, seed=1)
  h, l, c = m['high'].copy(), m['low'].copy(), m['close'].copy()
  for s in (300, 900):
    h[s:s + 60] = l[s:s + 60] = c[s:s + 60] = c[s - 1]
  c[1400:1440] = c[1399]
  h[1400:1440] = c[1399] + 1e-4
  l[1400:1440] = c[1399] - 1e-4
  h[:100], l[:100] = 1.2, 1.0
  c[:100] = np.where(np.arange(100) % 2, 1.05, 1.15)
  as_f32 = lambda a: a.astype(np.float32).astype(np.float64)
  return dict(m, high=as_f32(h), low=as_f32(l), close=as_f32(c))


def test_market_is_realistic(market):
  c, h, l = market['close'], market['high'], market['low']
  assert c.shape == (N_BARS,)
  assert 0.5 < c.min() and c.max() < 2.5
  assert np.all(h >= np.maximum(market['open'], c)) and np.all(l <= np.minimum(market['open'], c))
  r = np.diff(np.log(c))
  assert 1e-4 < r.std() < 1e-3
  assert np.mean(market['volume'] != np.round(market['volume'])) > 0.5  # OBV sees non-integer sums


@pytest.mark.parametrize('name', sorted(SPECS))
def test_matches_talib_on_200k_bars(name, market):
  assert_matches_talib(name, market)


@pytest.mark.parametrize('name', sorted(SPECS))
def test_matches_talib_on_degenerate_bars(name, edge_market):
  # Flat stretches exercise every zero-denominator branch; no burn-in needed beyond the warm-up.
  assert_matches_talib(name, edge_market, burn_in=0)


@pytest.mark.parametrize('name', sorted(SPECS))
def test_flat_series(name, edge_market):
  """A constant market: TA-Lib's values (RSI/DI/ADX/STOCH/WILLR/CCI/ROC 0, AROON per ties, OBV = v[0])."""
  flat = {k: np.full(2_000, np.float32(1.1) if k != 'volume' else 100.0, np.float64) for k in edge_market}
  assert_matches_talib(name, flat, burn_in=0)
  for out in _outputs(SPECS[name][1](flat)):
    assert np.all(np.isfinite(out[60:]))


@pytest.mark.parametrize('length', [1, 13])
@pytest.mark.parametrize('name', sorted(SPECS))
def test_short_series(name, length, market):
  """Fewer bars than the warm-up: all NaN like TA-Lib (no crash); STOCH's 8-bar warm-up fits in 13 bars."""
  short = {k: v[:length] for k, v in market.items()}
  assert_matches_talib(name, short, burn_in=0)
  lookback = ind.LOOKBACK[name]
  for out in _outputs(SPECS[name][1](short)):
    assert out.shape == (length,)
    assert np.all(np.isnan(out[:lookback])) and np.all(~np.isnan(out[lookback:]))


def test_lookback_table_matches_talib(market):
  sample = {k: v[:500] for k, v in market.items()}
  for name, (talib_fn, _, _, _) in SPECS.items():
    first = _outputs(talib_fn(sample))[0]
    assert np.argmax(~np.isnan(first)) == ind.LOOKBACK[name], name


@pytest.mark.parametrize('name', sorted(SPECS))
def test_causal(name, edge_market):
  """Row t computed on bars[:t+1] equals the full-series row t (same start, so recursions agree too).

  Bit for bit, except BBANDS: XLA vectorises the two-pass moment sums differently for other lengths, which
  moves the last bit (1 ulp of the price)."""
  full = _outputs(SPECS[name][1](edge_market))
  prefix = _outputs(SPECS[name][1]({k: v[:1500] for k, v in edge_market.items()}))
  for a, b in zip(full, prefix):
    if name == 'bbands':
      np.testing.assert_allclose(b, a[:1500], rtol=2e-7, atol=0, equal_nan=True)
    else:
      np.testing.assert_array_equal(b, a[:1500])


def test_all_indicators_fuse_in_one_jit(edge_market):
  """Every indicator inside ONE jitted function (as compute_features uses them) matches the standalone call
  and does not retrace on new data of the same shape."""

  @jax.jit
  @chex.assert_max_traces(n=1)
  def everything(o, h, l, c, v):
    del o
    m = {'high': h, 'low': l, 'close': c, 'volume': v}
    return {name: spec[1](m) for name, spec in SPECS.items()}

  cols = ('open', 'high', 'low', 'close', 'volume')
  arrays = [jnp.asarray(edge_market[k], jnp.float32) for k in cols]
  fused = everything(*arrays)
  everything(*[a * 1.01 for a in arrays])  # new values, same shapes: assert_max_traces fails on a retrace
  for name, spec in SPECS.items():
    outs = fused[name] if isinstance(fused[name], tuple) else (fused[name],)
    assert all(o.dtype == jnp.float32 and o.shape == (2_000,) for o in outs), name
    for a, b in zip(_outputs(spec[1](edge_market)), _outputs(fused[name])):
      np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-5, equal_nan=True, err_msg=name)


def test_dmi_equals_separate_calls(edge_market):
  h, l, c = edge_market['high'], edge_market['low'], edge_market['close']
  for got, want in zip(ind.dmi(h, l, c), (ind.plus_di(h, l, c), ind.minus_di(h, l, c), ind.adx(h, l, c))):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_non_default_periods_match_talib(market):
  m = {k: v[:20_000] for k, v in market.items()}
  h, l, c = m['high'], m['low'], m['close']
  price = float(np.median(c))
  cases = [  # (talib, ours, scale)
      (talib.RSI(c, timeperiod=7), ind.rsi(c, timeperiod=7), 1.0),
      (talib.ADX(h, l, c, timeperiod=20), ind.adx(h, l, c, timeperiod=20), 1.0),
      (talib.PLUS_DI(h, l, c, timeperiod=2), ind.plus_di(h, l, c, timeperiod=2), 1.0),
      (talib.ATR(h, l, c, timeperiod=1), ind.atr(h, l, c, timeperiod=1), 1e-4),
      (talib.AROON(h, l, timeperiod=25)[1], ind.aroon(h, l, timeperiod=25)[1], 1.0),
      (talib.STOCH(h, l, c, fastk_period=14, slowk_period=1, slowd_period=5)[1],
       ind.stoch(h, l, c, fastk_period=14, slowk_period=1, slowd_period=5)[1], 1.0),
      # TA-Lib swaps fast and slow when fast > slow.
      (talib.MACD(c, fastperiod=26, slowperiod=12, signalperiod=5)[0],
       ind.macd(c, fastperiod=26, slowperiod=12, signalperiod=5)[0], 1e-4),
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
