"""Market data: loading and validating OHLCV (CSV, MetaTrader 5, Parquet) and the synthetic market.

`load_market(config.data)` is what the phases call; `load_ohlcv` loads one series; `synthetic_market` is the
regime-switching generator that is the default data source (with its true regimes, in REGIMES order).
"""
from natron.data.ohlcv import (DataError, load_market, load_ohlcv, ohlcv_summary, repair_order,
                               validate_ohlcv)
from natron.data.synthetic import REGIMES, synthetic_market

__all__ = ['DataError', 'REGIMES', 'load_market', 'load_ohlcv', 'ohlcv_summary', 'repair_order',
           'synthetic_market', 'validate_ohlcv']
