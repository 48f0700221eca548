"""Market data: loading and validating OHLCV (CSV, MetaTrader 5, Parquet) and the synthetic market.

`load_market(config.data)` is what the phases call; `load_ohlcv` loads one series; `synthetic_market` is the
regime-switching generator that is the default data source (with its true regimes, in REGIMES order).
`candle_violations` is the one definition of a valid candle (ingestion, serving and features call it) and
`parse_times` the one time parser (ingestion and serving); natron.data.grid holds the quote-grid helpers.
"""
from natron.data.ohlcv import (DataError, load_market, load_ohlcv, ohlcv_summary, parse_point_setting,
                               repair_order, validate_ohlcv)
from natron.data.rules import Violation, candle_violations
from natron.data.synthetic import PRESETS, REGIMES, synthetic_market
from natron.data.times import parse_times, parse_tz

__all__ = ['DataError', 'PRESETS', 'REGIMES', 'Violation', 'candle_violations', 'load_market', 'load_ohlcv',
           'ohlcv_summary', 'parse_point_setting', 'parse_times', 'parse_tz', 'repair_order', 'synthetic_market',
           'validate_ohlcv']
