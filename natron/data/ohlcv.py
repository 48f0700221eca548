"""OHLCV ingestion: CSV, MetaTrader 5 exports, Parquet and DataFrames -> one validated frame.

Output of `load_ohlcv` (RangeIndex, one row per bar, in time order):
  time     datetime64[ns, UTC]
  open, high, low, close, volume   float64
  spread         float64, price units (when the data has a spread; MetaTrader points are converted)
  spread_points  float64, MetaTrader points (only when the source gives points)
  symbol         str (only when requested or present in the input)
and `frame.attrs`:
  source          the path, or 'frame'
  point           the quote grid's increment (float; a {symbol: point} dict for a frame holding several
                  symbols with different points)
  point_source    'config' (the `point` argument, data.point) or 'inferred from quote decimals'
  spread_source   'file, points x point' (MetaTrader points converted with `point`), 'file, price units',
                  or None when the data has no spread (the backtest then needs backtest.spread)
  volume_source   'volume', 'real_volume', 'tick_volume', or an explicit fallback such as
                  'tick_volume (fallback: real volume is all zero)' (also logged as a warning)
  tz, time_note   the zone naive times were read in (None: UTC) and a sentence for summaries
  ignored_columns, repair_report (with repair=True)

Accepted inputs:
- CSV with a header `time,open,high,low,close,volume[,spread]` (the seed format; `spread` in price units).
  Aliases: `datetime` / `timestamp` / `date` for `time`, or separate `date` and `time` columns.
- MetaTrader 5 "Export bars": tab-separated `<DATE> <TIME> <OPEN> <HIGH> <LOW> <CLOSE> <TICKVOL> <VOL>
  <SPREAD>`, dates like 2024.01.02, times like 00:15:00 (`<TIME>` absent in daily exports); UTF-8 or UTF-16.
  Also frames from the MetaTrader 5 Python API (`copy_rates_*`: time in epoch seconds, tick_volume,
  real_volume, spread).
- Parquet (`.parquet` / `.pq`) and pandas DataFrames with the seed columns (or the MetaTrader ones).

Quote grid: real prices are integer multiples of the symbol's point (1e-5 EURUSD, 1e-3 USDJPY, 0.01 stocks).
The point is `point=` (data.point) when given, else inferred as the coarsest decimal grid all prices lie on
(natron.data.grid.infer_point; the load summary says which). Prices off the given grid are an error naming
the rows; a file whose prices lie on no decimal grid is an error that says to set data.point. Nothing is
rounded. MetaTrader's `<SPREAD>` is an integer number of points: kept as `spread_points` and converted to
`spread` = points x point, so costs never vanish for want of a point size.

Volume: a `volume` column is used as is, and MetaTrader's real volume `<VOL>` when it is not all zero.
Volume that is all zero (spot FX exported with real volume, a CSV with 0 everywhere) is never accepted
silently: with a tick-volume column it falls back to tick volume, recorded in `volume_source` and logged as
a warning; without one it is an error (every volume feature would degenerate).

Times (natron.data.times, the parser serving uses too): YYYY-MM-DD HH:MM:SS, YYYY.MM.DD HH:MM:SS, ISO 8601
with an offset (converted), epoch seconds. Naive times are in `tz` (data.tz: an IANA name such as 'EET',
with daylight saving, or a fixed offset such as '+02:00') and converted to UTC; without `tz` they are taken
as UTC and the load summary says so. MetaTrader exports and the EA use the broker's server time: set tz.

Validation (natron.data.rules.candle_violations, the one definition of a valid candle) never drops, fills
or reorders anything (a frame holding several symbols comes back grouped by symbol, a stable sort that keeps
each symbol's validated row order). Every broken rule raises `DataError` naming the rule, the number of
offending rows and the first few of them (0-based data rows; in text files line = row + 2): missing columns,
unparseable times, non-numeric or NaN/inf values, non-positive prices, high < max(open, close),
low > min(open, close), negative volume or spread, prices off the quote grid, duplicate or decreasing
timestamps (within a symbol), times the zone cannot place (daylight saving). Gaps in time are legal;
`ohlcv_summary` counts them. `repair=True` is the one explicit fix: a stable sort by time and removal of
repeated timestamps (the first row in file order is kept), with the exact counts in
`frame.attrs['repair_report']` and the log.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
from absl import logging

from natron.data import grid, rules, times
from natron.data.synthetic import DEFAULT_POINT, PRESETS, synthetic_market, timeframe_delta
from natron.errors import UserError

PRICES = ('open', 'high', 'low', 'close')
REQUIRED = ('time',) + PRICES + ('volume',)
OPTIONAL = ('spread', 'spread_points')
_MAX_LISTED = 5

# Normalised header name (lower case, '<>' and spaces stripped) -> canonical name.
_ALIASES = {
    'time': 'time', 'datetime': 'time', 'timestamp': 'time', 'date': 'date',
    'open': 'open', 'high': 'high', 'low': 'low', 'close': 'close',
    'volume': 'volume', 'tickvol': 'tick_volume', 'tick_volume': 'tick_volume',
    'vol': 'real_volume', 'real_volume': 'real_volume', 'spread': 'spread', 'spread_points': 'spread_points',
    'symbol': 'symbol',
}
_MT5_ONLY = ('tick_volume', 'real_volume')
_NUMERIC = PRICES + ('volume', 'tick_volume', 'real_volume', 'spread', 'spread_points')
_ARROW_TIME_FORMATS = (pcsv.ISO8601,) + times.ARROW_FORMATS
_TIME_RULE = times.TIME_RULE
POINT_CONFIG = 'config'
POINT_INFERRED = 'inferred from quote decimals'
# `spread` and `spread_points x point` of one row may differ by the float64 rounding of both (~1e-16 relative).
_SPREAD_MATCH = 1e-6


class DataError(UserError):
  """Input data breaks a rule; the message names the rule and the offending rows.

  `violations` holds (rule, rows) pairs, rows being 0-based data row numbers (all of them, not just the
  ones the message lists); `rule` is the rule's text (natron.data.rules).
  """

  def __init__(self, message: str, violations=()):
    super().__init__(message)
    self.violations = list(violations)


# ----------------------------------------------------------------------------------------------- loading

def load_ohlcv(path_or_frame, *, repair: bool = False, symbol: str | None = None, point=None,
               tz: str | None = None) -> pd.DataFrame:
  """Loads and validates one OHLCV series (see the module docstring for formats, rules and attrs).

  Args:
    path_or_frame: a path (CSV / MetaTrader export / Parquet) or a pandas DataFrame (not modified).
    repair: sort by time and drop repeated timestamps, reporting the counts; never fixes values.
    symbol: adds a constant `symbol` column.
    point: the quote grid's increment (float or text such as '1e-5'; for a frame holding several symbols
      also a {symbol: point} mapping, absent symbols inferred). None: inferred from the quote decimals.
      Prices must lie on it; MetaTrader spreads in points are converted with it.
    tz: time zone of naive timestamps (IANA name or fixed offset such as '+02:00'); None: UTC.

  Returns:
    the canonical frame [T rows] with attrs source, point, point_source, spread_source, volume_source, tz,
    time_note, ignored_columns (+ repair_report).
  """
  try:
    times.parse_tz(tz)
  except times.TimeZoneError as e:
    raise DataError(str(e)) from None
  source, raw, is_text = _read(path_or_frame)
  table, used = _canonical_columns(raw, source)
  ignored = [str(c) for c in raw.columns if str(c) not in used]
  if len(raw) == 0:
    raise DataError(f"{source}: no rows (only a header)")
  violations = []
  groups = _groups(table['symbol'].astype(str).to_numpy() if 'symbol' in table else None, len(raw))
  time = _parse_time(table, tz, groups, violations)
  frame, volume_source = _assemble(table, time, source, violations)
  if symbol is not None:
    if 'symbol' in frame and not (frame['symbol'] == symbol).all():
      raise DataError(f"{source}: symbol={symbol!r} was given but the data has a `symbol` column with other "
                      f"values {sorted(frame['symbol'].unique())[:_MAX_LISTED]}")
    frame['symbol'] = str(symbol)
  if violations:   # unparseable values: report them with every other broken rule, before any repair
    _raise_if(violations + _not_already(_violations(frame), violations), source, is_text)
  points, point_source = _points(frame, point, source)
  spread_source, spread_violations = _convert_spread(frame, points)
  _check_volume(frame, source)
  # An inferred point fits every price by construction; a given one is checked (rule off_grid).
  given = {sym: p for sym, p in points.items()
           if (point_source if isinstance(point_source, str) else point_source[sym]) == POINT_CONFIG}
  if spread_violations:   # row numbers refer to the data as read: report before any repair
    _raise_if(spread_violations + _violations(frame, given), source, is_text)
  report = None
  if repair:
    frame, report = repair_order(frame)
    logging.info('%s: repair: %s', source, report)
  _raise_if(_violations(frame, given), source, is_text, repairable=not repair)
  one_point = set(points.values())
  frame.attrs.update(
      source=source, point=one_point.pop() if len(one_point) == 1 else dict(points),
      point_source=point_source, spread_source=spread_source, volume_source=volume_source,
      tz=None if times.parse_tz(tz) is None else str(tz), time_note=times.describe_tz(tz),
      ignored_columns=ignored)
  if report is not None:
    frame.attrs['repair_report'] = report
  if 'symbol' in frame and frame['symbol'].nunique() > 1:
    # Group the symbols (stable: each symbol's validated time order is kept) so no window can cross them.
    frame = frame.sort_values('symbol', kind='stable').reset_index(drop=True)
  if ignored:
    logging.info('%s: ignored columns %s', source, ignored)
  logging.info('%s: %d bars; point %s (%s); spread: %s; volume: %s; %s', source, len(frame),
               _format_points(frame.attrs['point']), point_source, spread_source or 'none in the data',
               volume_source, frame.attrs['time_note'])
  return frame


def _format_points(point) -> str:
  if isinstance(point, dict):
    return ', '.join(f'{k}={v:g}' for k, v in point.items())
  return f'{point:g}'


def _groups(symbols, n: int) -> list:
  """[(symbol or None, rows int64 [k])]: one group per symbol in order of first appearance, or one group."""
  if symbols is None:
    return [(None, np.arange(n))]
  codes, uniques = pd.factorize(symbols, sort=False)
  if len(uniques) <= 1:
    return [(uniques[0] if len(uniques) else None, np.arange(n))]
  order = np.argsort(codes, kind='stable')
  bounds = np.searchsorted(codes[order], np.arange(len(uniques) + 1))
  return [(str(uniques[k]), order[bounds[k]:bounds[k + 1]]) for k in range(len(uniques))]


def _frame_groups(frame: pd.DataFrame) -> list:
  return _groups(frame['symbol'].astype(str).to_numpy() if 'symbol' in frame else None, len(frame))


def _read(path_or_frame):
  """-> (source name, raw DataFrame, is_text_file)."""
  if isinstance(path_or_frame, pd.DataFrame):
    frame = path_or_frame
    names = {_ALIASES.get(_normalise(c)) for c in frame.columns}
    if 'time' not in names and 'date' not in names and isinstance(frame.index, pd.DatetimeIndex):
      frame = frame.rename_axis('time').reset_index()   # a time-indexed frame: the index is the time
    return 'frame', frame, False
  if not isinstance(path_or_frame, (str, os.PathLike)):
    raise DataError(f"expected a path or a pandas DataFrame, got {type(path_or_frame).__name__}")
  path = Path(path_or_frame)
  if not path.is_file():
    raise DataError(f"{path}: no such file")
  if path.suffix.lower() in ('.parquet', '.pq'):
    try:
      return str(path), pd.read_parquet(path), False
    except Exception as e:  # pyarrow raises several types for corrupt files
      raise DataError(f"{path}: not a readable Parquet file ({e})") from e
  return str(path), _read_text(path), True


def _read_text(path: Path) -> pd.DataFrame:
  """CSV or MetaTrader export with a header line.

  Fast path: pyarrow's multi-threaded CSV reader with explicit column types (float64 numbers, timestamps in
  the seed and MetaTrader layouts), ~0.5 s per million bars. Anything it cannot convert (text in a number
  column, other time formats, offsets) falls back to pandas' C engine, which reads the awkward columns as
  text so that validation can name the offending rows.
  """
  with open(path, 'rb') as f:
    head = f.read(4096)
  if not head.strip():
    raise DataError(f"{path}: the file is empty")
  if head.startswith((b'\xff\xfe', b'\xfe\xff')):
    encoding = 'utf-16'
  elif head.startswith(b'\xef\xbb\xbf'):
    encoding = 'utf-8-sig'
  else:
    encoding = 'utf-8'
  first = head.decode(encoding, errors='ignore').lstrip('\ufeff').splitlines()[0]
  sep = '\t' if '\t' in first else (';' if ';' in first and ',' not in first else ',')
  names = [h.strip() for h in first.split(sep)]
  try:
    return _read_text_arrow(path, encoding, sep, names)
  except (pa.ArrowInvalid, pa.ArrowTypeError, UnicodeDecodeError):
    pass
  # Number columns are left to pandas' type inference: clean ones still parse as numbers in C, and only a
  # column holding text becomes strings, which `_numeric` then checks row by row (vectorised).
  text = {h: str for h in names if _ALIASES.get(_normalise(h)) in ('time', 'date', 'symbol')}
  try:
    return pd.read_csv(path, dtype=text, sep=sep, encoding=encoding, engine='c', skipinitialspace=True,
                       low_memory=False)
  except (ValueError, UnicodeDecodeError) as e:
    raise DataError(f"{path}: malformed text ({e})") from e


def _read_text_arrow(path: Path, encoding: str, sep: str, names: list) -> pd.DataFrame:
  types = {}
  for h in names:
    name = _ALIASES.get(_normalise(h))
    if name in _NUMERIC:
      types[h] = pa.float64()
    elif name == 'time' and 'date' not in (_ALIASES.get(_normalise(n)) for n in names):
      types[h] = pa.timestamp('ns')
    elif name == 'time':
      types[h] = pa.time64('ns')        # MetaTrader <TIME> beside <DATE>
    elif name == 'date':
      types[h] = pa.timestamp('ns')
    elif name == 'symbol':
      types[h] = pa.string()
  convert = pcsv.ConvertOptions(column_types=types, timestamp_parsers=list(_ARROW_TIME_FORMATS))
  table = pcsv.read_csv(path, read_options=pcsv.ReadOptions(encoding=encoding),
                        parse_options=pcsv.ParseOptions(delimiter=sep), convert_options=convert)
  frame = table.to_pandas()
  for h, t in types.items():
    if t == pa.time64('ns'):   # datetime.time objects -> offsets from midnight, added to <DATE> later
      frame[h] = pd.to_timedelta(pc.cast(table[h], pa.int64()).to_numpy(zero_copy_only=False), 'ns')
  return frame


def _normalise(name) -> str:
  return str(name).strip().strip('<>').strip().lower().replace(' ', '_')


def _canonical_columns(raw: pd.DataFrame, source: str):
  """Maps input columns to canonical names -> (dict name -> Series, set of the input names used)."""
  table, used = {}, set()
  for col in raw.columns:
    name = _ALIASES.get(_normalise(col))
    if name is None:
      continue
    if name in table:
      raise DataError(f"{source}: columns {sorted(c for c in raw.columns if _ALIASES.get(_normalise(c)) == name)}"
                      f" all map to `{name}`; keep one")
    table[name] = raw[col]
    used.add(str(col))
  if 'time' not in table and 'date' in table:
    table['time'] = table.pop('date')
  is_mt5 = any(c in table for c in _MT5_ONLY)
  if is_mt5 and 'spread' in table:
    table['spread_points'] = table.pop('spread')
  missing = [c for c in REQUIRED if c not in table and not (c == 'volume' and is_mt5)]
  if missing:
    raise DataError(f"{source}: missing column(s) {missing}; found {[str(c) for c in raw.columns]}. "
                    f"Expected a header time,open,high,low,close,volume[,spread] or a MetaTrader 5 export "
                    f"<DATE> <TIME> <OPEN> <HIGH> <LOW> <CLOSE> <TICKVOL> <VOL> <SPREAD>")
  return table, used


def _parse_time(table: dict, tz, groups: list, violations: list) -> pd.DatetimeIndex:
  """UTC timestamps from `time` (+ a separate `date`), recording unparseable rows as a violation.

  natron.data.times.parse_times is the one parser (serving uses it too); pyarrow's fast path has already
  turned clean text into datetime64 (naive: wall-clock times in `tz`).
  """
  values = table['time']
  if 'date' in table and pd.api.types.is_timedelta64_dtype(values.dtype):   # MetaTrader, parsed by arrow
    values = pd.to_datetime(table['date']) + values
  elif 'date' in table:   # MetaTrader <DATE> and <TIME> as text
    values = table['date'].astype(str).str.strip() + ' ' + values.astype(str).str.strip()
  if pd.api.types.is_bool_dtype(values.dtype):
    values = values.astype(object)
  parsed = times.parse_times(values, tz, [rows for _, rows in groups])
  shown = {'time': np.asarray(values)}
  bad = np.flatnonzero(parsed.bad)
  if bad.size:
    rule = _TIME_RULE + (f'; {parsed.reason}' if parsed.reason else '')
    violations.append((rule, bad, shown))
  for rule, rows in parsed.problems:
    violations.append((rule, rows, shown))
  return pd.DatetimeIndex(parsed.ns.view('datetime64[ns]')).tz_localize('UTC')


def _numeric(series: pd.Series, name: str, violations: list) -> np.ndarray:
  """float64 values; entries that are present but not numbers are recorded as a violation (then NaN)."""
  if pd.api.types.is_float_dtype(series.dtype):
    return series.to_numpy(np.float64)
  if pd.api.types.is_numeric_dtype(series.dtype) and not pd.api.types.is_bool_dtype(series.dtype):
    return series.to_numpy(np.float64, na_value=np.nan)
  out = pd.to_numeric(series, errors='coerce').to_numpy(np.float64, na_value=np.nan)
  text = series.astype(str).str.strip()
  present = series.notna().to_numpy() & (text != '').to_numpy()
  bad = np.flatnonzero(np.isnan(out) & present & ~text.str.lower().isin(['nan', 'inf', '-inf']).to_numpy())
  if bad.size:
    violations.append((f'{name} must be numeric', bad, {name: series.to_numpy()}))
  return out


def _assemble(table: dict, time: pd.DatetimeIndex, source: str, violations: list):
  """Canonical frame from the mapped columns (spread still in the source's unit) -> (frame, volume_source)."""
  cols = {'time': time}
  for name in PRICES:
    cols[name] = _numeric(table[name], name, violations)
  tick = _numeric(table['tick_volume'], 'tick_volume', violations) if 'tick_volume' in table else None
  if 'volume' in table:
    cols['volume'], volume_source = _numeric(table['volume'], 'volume', violations), 'volume'
    fallback = 'volume is all zero'
  else:
    real = _numeric(table['real_volume'], 'real_volume', violations) if 'real_volume' in table else None
    cols['volume'], volume_source = (real, 'real_volume') if real is not None else (tick, 'tick_volume')
    fallback = 'real volume is all zero'
  if volume_source != 'tick_volume' and tick is not None and _all_zero(cols['volume']) and not _all_zero(tick):
    # Spot FX exported with real volume: every volume feature would degenerate. Explicit and loud.
    cols['volume'], volume_source = tick, f'tick_volume (fallback: {fallback})'
    logging.warning('%s: %s; using the tick volume column instead (frame.attrs[\'volume_source\'] records it)',
                    source, fallback)
  if 'spread' in table:
    cols['spread'] = _numeric(table['spread'], 'spread', violations)
  if 'spread_points' in table:
    cols['spread_points'] = _numeric(table['spread_points'], 'spread_points', violations)
  if 'symbol' in table:
    cols['symbol'] = table['symbol'].astype(str).to_numpy()
  return pd.DataFrame(cols), volume_source


def _all_zero(x: np.ndarray) -> bool:
  finite = x[np.isfinite(x)]
  return bool(finite.size) and not np.any(finite != 0)


def _check_volume(frame: pd.DataFrame, source: str):
  """All-zero volume (per symbol) is an error: it cannot be told apart from 'no volume'."""
  volume = frame['volume'].to_numpy(np.float64)
  for sym, rows in _frame_groups(frame):
    if _all_zero(volume[rows]):
      where = f' (symbol {sym})' if sym is not None else ''
      raise DataError(
          f"{source}{where}: the volume is 0 in every row, so every volume feature would be constant. Spot FX "
          f"has no real volume: export tick volume instead (MetaTrader <TICKVOL>, ExportBars.mq5 with "
          f"InpUseRealVolume=false), or give a file with a tick_volume column")


def parse_point_setting(value, symbols=None) -> dict:
  """data.point -> {symbol: point or None (infer)}; `symbols` are the symbols loaded ([None] for one series).

  None / '' -> infer everywhere; '1e-5' -> that point for every symbol; 'EURUSD=1e-5,USDJPY=1e-3' (or a
  mapping) -> per symbol, others inferred. An unknown symbol name or a bad number is a UserError.
  """
  symbols = [None] if symbols is None else list(symbols)
  if value is None or (isinstance(value, str) and not value.strip()):
    return {s: None for s in symbols}
  if isinstance(value, dict):
    mapping = dict(value)
  elif isinstance(value, str) and '=' in value:
    mapping = {}
    for part in value.split(','):
      if not part.strip():
        continue
      key, sep, number = part.partition('=')
      if not sep or not key.strip():
        raise UserError(f"data.point={value!r}: write one point ('1e-5') or SYMBOL=POINT pairs "
                        f"('EURUSD=1e-5,USDJPY=1e-3')")
      mapping[key.strip()] = number.strip()
  else:
    p = _checked_point(value, 'data.point')
    return {s: p for s in symbols}
  unknown = sorted(k for k in mapping if k not in symbols)
  if unknown:
    raise UserError(f"data.point names symbol(s) {unknown} that are not in the data {[s for s in symbols if s]}")
  return {s: _checked_point(mapping[s], f'data.point[{s}]') if s in mapping else None for s in symbols}


def _checked_point(value, name: str) -> float:
  try:
    return grid.check_point(value)
  except grid.GridError:
    raise DataError(f"{name}={value!r}: a point is a positive price increment such as 1e-5 (EURUSD), 1e-3 "
                    f"(USDJPY) or 0.01 (stocks)") from None


def _points(frame: pd.DataFrame, point, source: str):
  """-> ({symbol or None: point}, point_source) for every symbol group of the frame."""
  groups = _frame_groups(frame)
  wanted = parse_point_setting(point, [sym for sym, _ in groups]) if isinstance(point, (dict, str)) or \
      point is None else {sym: _checked_point(point, 'point') for sym, _ in groups}
  columns = [frame[c].to_numpy(np.float64) for c in PRICES]
  n = len(frame)

  def prices_of(rows):   # [4 k] this group's prices (no copy of the frame's columns for a one-symbol frame)
    return np.concatenate(columns if rows.size == n else [c[rows] for c in columns])

  points, sources = {}, {}
  for sym, rows in groups:
    if wanted[sym] is not None:
      points[sym], sources[sym] = wanted[sym], POINT_CONFIG
      top = float(np.nanmax(np.abs(prices_of(rows)))) if rows.size else 0.0
      if top / wanted[sym] >= grid.MAX_TICKS:
        raise DataError(f"{source}: a price of {top:.10g} is {top / wanted[sym]:.0f} points of "
                        f"{wanted[sym]:g}: at 2**24 points or more float32 cannot hold prices exactly; use a "
                        f"coarser point (e.g. {wanted[sym] * 10:g})")
      continue
    x = prices_of(rows)
    ok = np.isfinite(x) & (x > 0)   # broken values are reported by the rules, not by the grid inference
    if not ok.all():
      x = x[ok]
    where = f' (symbol {sym})' if sym is not None else ''
    try:
      points[sym], sources[sym] = grid.infer_point(x), POINT_INFERRED
    except grid.GridError as e:
      raise DataError(f"{source}{where}: cannot infer the quote grid from the prices: {e}") from None
  kinds = set(sources.values())
  return points, (kinds.pop() if len(kinds) == 1 else sources)


def _convert_spread(frame: pd.DataFrame, points: dict):
  """MetaTrader points -> `spread` in price units (in place) -> (spread_source or None, violations)."""
  if 'spread_points' not in frame:
    return ('file, price units' if 'spread' in frame else None), []
  per_row = np.empty(len(frame))
  for sym, rows in _frame_groups(frame):
    per_row[rows] = points[sym]
  converted = frame['spread_points'].to_numpy(np.float64) * per_row
  if 'spread' not in frame:
    frame.insert(frame.columns.get_loc('spread_points'), 'spread', converted)
    return 'file, points x point', []
  given = frame['spread'].to_numpy(np.float64)
  with np.errstate(invalid='ignore'):
    differs = np.abs(given - converted) > _SPREAD_MATCH * per_row
  if not differs.any():
    return 'file, price units', []
  show = {'spread': given, 'spread_points': frame['spread_points'].to_numpy(), 'point': per_row}
  return 'file, price units', [('spread must equal spread_points x point (the data holds two spreads that '
                                'disagree: drop one column, or set data.point)', np.flatnonzero(differs), show)]


# ---------------------------------------------------------------------------------------------- validation

def validate_ohlcv(frame: pd.DataFrame, *, source: str = 'frame', point=None):
  """Raises DataError if a canonical frame (time as datetime64, float columns) breaks any rule.

  `point`: also check that prices lie on this quote grid (a float, or {symbol: point}).
  """
  points = None
  if point is not None:
    points = point if isinstance(point, dict) else {sym: point for sym, _ in _frame_groups(frame)}
  _raise_if(_violations(frame, points), source, is_text=False)


def _violations(frame: pd.DataFrame, points: dict | None = None) -> list:
  """All rule violations of a canonical frame -> list of (rule text, rows int64[k], columns to show).

  natron.data.rules.candle_violations is the rule set; it runs per symbol (time order is per symbol) and the
  rows are mapped back to the frame's.
  """
  values = {c: frame[c].to_numpy(np.float64) for c in PRICES + ('volume',) + OPTIONAL if c in frame}
  time_ns = _ns(frame['time'])
  merged = {}
  for sym, rows in _frame_groups(frame):
    found = rules.candle_violations(
        time_ns[rows], *(values[c][rows] for c in PRICES + ('volume',)),
        spread=values['spread'][rows] if 'spread' in values else None,
        point=None if points is None else points.get(sym))
    for v in found:
      merged.setdefault(v.text, (v, []))[1].append(rows[v.rows])
  if 'spread_points' in values and 'spread' not in values:   # a canonical frame with points only
    bad = ~np.isfinite(values['spread_points'])
    if bad.any():
      merged.setdefault('spread_points must be finite', (None, [np.flatnonzero(bad)]))
  # NaT rows were reported as unparseable times; a row after one has no step to judge.
  nat = np.asarray(frame['time'].isna())
  out = []
  for text, (v, row_lists) in merged.items():
    rows = np.sort(np.concatenate(row_lists))
    if v is not None and v.rule == 'time_order' and nat.any():
      rows = rows[~(nat[rows] | nat[np.maximum(rows - 1, 0)])]
      if not rows.size:
        continue
    out.append((text, rows, _shown(text, v, values, frame)))
  return out


def _shown(text: str, v, values: dict, frame: pd.DataFrame) -> dict:
  """The columns an ingestion message lists for each offending row of a rule."""
  if v is None:
    return {'spread_points': values['spread_points']}
  if v.rule == 'not_finite':
    return {v.field: values[v.field]}
  if text == rules.HIGH:
    return {'high': values['high'], 'open': values['open'], 'close': values['close']}
  if text == rules.LOW:
    return {'low': values['low'], 'open': values['open'], 'close': values['close']}
  if v.rule in ('price_positive', 'off_grid'):
    return {k: values[k] for k in PRICES}
  if v.rule == 'time_order':
    return {'time': pd.DatetimeIndex(frame['time'])}   # formatted only for the rows a message lists
  shown = {v.field: values[v.field]}
  if v.field == 'spread' and 'spread_points' in values:
    shown['spread_points'] = values['spread_points']
  return shown


def _not_already(violations: list, parse_violations: list) -> list:
  """Drops rows of finiteness rules that a parse rule already reported (text turned into NaN)."""
  feeds = {'tick_volume': ('volume',), 'real_volume': ('volume',), 'spread_points': ('spread', 'spread_points')}
  parsed_bad = {}
  for rule, rows, _ in parse_violations:
    column = rule.split(' ')[0]
    for output in feeds.get(column, (column,)):
      parsed_bad.setdefault(output, set()).update(rows.tolist())
  out = []
  for rule, rows, show in violations:
    column = rule.split(' ')[0]
    if rule.endswith('(not NaN/inf/missing)') and column in parsed_bad:
      rows = np.array([r for r in rows if r not in parsed_bad[column]], np.int64)
    if rows.size:
      out.append((rule, rows, show))
  return out


def _time_steps(frame: pd.DataFrame) -> np.ndarray:
  """time[i] - time[i-1] in ns within each symbol (rows in input order); 1 where there is no predecessor."""
  t = _ns(frame['time'])
  nat = np.asarray(frame['time'].isna())
  if 'symbol' in frame and frame['symbol'].nunique() > 1:
    prev = frame.groupby('symbol', sort=False)['time'].shift(1)
    pt = _ns(prev)
    step = t - pt
    step[np.asarray(prev.isna()) | nat] = 1
    return step
  step = np.ones_like(t)
  step[1:] = np.diff(t)
  step[1:][nat[1:] | nat[:-1]] = 1
  return step


def _raise_if(violations: list, source: str, is_text: bool, repairable: bool = False):
  if not violations:
    return
  lines = [f"{source}: invalid OHLCV data, {len(violations)} rule(s) broken "
           f"(rows are 0-based data rows{'; file line = row + 2' if is_text else ''}; nothing was changed):"]
  for rule, rows, show in violations:
    listed = ', '.join(_describe_row(r, show, is_text) for r in rows[:_MAX_LISTED])
    more = f' and {rows.size - _MAX_LISTED} more' if rows.size > _MAX_LISTED else ''
    lines.append(f"  rule '{rule}' broken in {rows.size} row(s): {listed}{more}")
  if repairable and any(rule.startswith('timestamps') for rule, _, _ in violations):
    lines.append('  (repair=True sorts by time and drops repeated timestamps, reporting the counts)')
  if any(rule == rules.ON_GRID for rule, _, _ in violations):
    lines.append('  (set data.point, the `point` argument, to the instrument\'s price increment (MetaTrader: '
                 'SYMBOL_POINT), or leave it unset to infer it from the quote decimals; nothing is rounded)')
  raise DataError('\n'.join(lines), [(rule, rows) for rule, rows, _ in violations])


def _format(value) -> str:
  if isinstance(value, (float, np.floating)):
    return f'{value:.10g}'
  if isinstance(value, pd.Timestamp):
    return value.isoformat()
  return repr(value)


def _describe_row(row: int, show: dict, is_text: bool) -> str:
  fields = ', '.join(f'{k}={_format(v[row])}' for k, v in show.items())
  line = f' (line {row + 2})' if is_text else ''
  return f'row {row}{line} [{fields}]'


# ------------------------------------------------------------------------------------------------- repair

def repair_order(frame: pd.DataFrame):
  """Stable sort by (symbol,) time and removal of repeated timestamps (the first in input order is kept).

  Returns:
    (repaired frame with a fresh RangeIndex, report dict:
      rows_in, rows_out;
      decreasing_steps: rows earlier than the row before them (what validation reports as decreasing);
      rows_moved: rows at a different position after the sort than before it;
      duplicates_dropped: rows removed for repeating a timestamp (rows_in - rows_out);
      conflicting_duplicates: of those, rows whose values differed from the kept row's (logged as a warning)).
  """
  keys = ['symbol', 'time'] if 'symbol' in frame else ['time']
  if frame['time'].isna().any():
    raise DataError('repair cannot order rows with missing timestamps')
  frame = frame.reset_index(drop=True)
  decreasing = int(np.count_nonzero(_time_steps(frame) < 0))
  position = np.asarray(frame.sort_values(keys, kind='stable').index)
  rows_moved = int(np.count_nonzero(position != np.arange(len(frame))))
  ordered = frame.take(position).reset_index(drop=True)
  repeated = ordered.duplicated(keys, keep='first').to_numpy()
  conflicting = int(np.count_nonzero(repeated & _differs_from_kept(ordered, keys)))
  repaired = ordered.loc[~repeated].reset_index(drop=True)
  report = dict(rows_in=int(len(frame)), rows_out=int(len(repaired)), decreasing_steps=decreasing,
                rows_moved=rows_moved, duplicates_dropped=int(repeated.sum()),
                conflicting_duplicates=conflicting)
  if conflicting:
    logging.warning('repair dropped %d repeated timestamps whose OHLCV values differed from the kept row',
                    conflicting)
  return repaired, report


def _differs_from_kept(ordered: pd.DataFrame, keys: list) -> np.ndarray:
  """bool [rows]: the row's values differ from those of the first row with its key (NaN equals NaN)."""
  group = ordered.groupby(keys, sort=False).ngroup().to_numpy()
  _, first = np.unique(group, return_index=True)   # ngroup numbers groups in order of first appearance
  kept = first[group]
  differs = np.zeros(len(ordered), bool)
  for column in ordered.columns.difference(keys):
    values = ordered[column].to_numpy()
    other = values[kept]
    if values.dtype.kind == 'f':
      differs |= (values != other) & ~(np.isnan(values) & np.isnan(other))
    else:
      differs |= values != other
  return differs


# ------------------------------------------------------------------------------------------------ summary

def ohlcv_summary(frame: pd.DataFrame) -> dict:
  """JSON-able description: rows, start, end, median bar interval, gaps, largest gap (per symbol too).

  A gap is an interval longer than the median bar interval (weekends, holidays, missing bars). With a
  `symbol` column the top-level figures aggregate the symbols and `symbols` holds each one's summary.
  """
  if 'symbol' not in frame:
    return _series_summary(frame['time'])
  per = {str(s): _series_summary(g['time']) for s, g in frame.groupby('symbol', sort=True)}
  largest = max(per.values(), key=lambda d: d['largest_gap_s'] or 0.0) if per else {}
  return dict(rows=int(len(frame)), start=min((d['start'] for d in per.values()), default=None),
              end=max((d['end'] for d in per.values()), default=None),
              median_interval_s=float(np.median([d['median_interval_s'] for d in per.values()])) if per else None,
              gaps=int(sum(d['gaps'] for d in per.values())),
              largest_gap_s=largest.get('largest_gap_s'), largest_gap_after=largest.get('largest_gap_after'),
              symbols=per)


def _ns(times) -> np.ndarray:
  """int64 nanoseconds since the epoch (UTC) of a datetime Series/Index (NaT -> int64 min)."""
  return np.asarray(pd.DatetimeIndex(times).as_unit('ns').asi8)


def _series_summary(time: pd.Series) -> dict:
  t = _ns(time)
  out = dict(rows=int(t.size), start=None, end=None, median_interval_s=None, gaps=0, largest_gap_s=None,
             largest_gap_after=None)
  if t.size == 0:
    return out
  out.update(start=pd.Timestamp(t[0], tz='UTC').isoformat(), end=pd.Timestamp(t[-1], tz='UTC').isoformat())
  if t.size > 1:
    d = np.diff(t)
    median = np.median(d)
    i = int(np.argmax(d))
    out.update(median_interval_s=float(median) / 1e9, gaps=int(np.count_nonzero(d > median)),
               largest_gap_s=float(d[i]) / 1e9, largest_gap_after=pd.Timestamp(t[i], tz='UTC').isoformat())
  return out


# ------------------------------------------------------------------------------------------------- market

def load_market(data_config) -> pd.DataFrame:
  """The market every phase trains on: all symbols in one frame sorted by (symbol, time).

  Args:
    data_config: `config.data` (or the whole config): path ('' -> synthetic; else one path or comma-separated
      paths, one symbol each, named by file stem), repair, timeframe, point (None: inferred per file from the
      quote decimals, the synthetic market's own 1e-5; '1e-5'; or 'EURUSD=1e-5,USDJPY=1e-3'), tz (naive
      times' zone, None: UTC), synthetic_bars, synthetic_seed, synthetic_preset ('learnable' | 'realistic'),
      synthetic_symbols (default 1; one symbol is named 'SYNTH' and uses synthetic_seed itself, several are
      SYNTH0, SYNTH1, ... with seeds (synthetic_seed, i)).

  Returns:
    the canonical frame plus a `symbol` column (str); windows must never cross symbols. attrs: source,
    sources {symbol: path or 'synthetic'}, repair_reports {symbol: report}, points {symbol: point},
    point_sources {symbol: 'config' | 'inferred from quote decimals' | 'synthetic default'}, spread_sources
    {symbol: 'file, points x point' | 'file, price units' | 'synthetic' | None}, volume_sources {symbol: ...},
    tz (data.tz or None), time_note (how times were read), synthetic_preset (synthetic data only).
  """
  cfg = data_config.data if hasattr(data_config, 'data') and not hasattr(data_config, 'path') else data_config

  def get(key, default):
    return cfg.get(key, default) if hasattr(cfg, 'get') else getattr(cfg, key, default)

  path = str(get('path', '') or '').strip()
  timeframe = str(get('timeframe', '15min'))
  expected = timeframe_delta(timeframe).total_seconds()   # a bad timeframe fails before any loading
  point, tz = get('point', None), get('tz', None)
  if not path:
    preset = str(get('synthetic_preset', 'learnable') or 'learnable')
    frames = _synthetic_symbols(int(get('synthetic_bars', 20_000)), int(get('synthetic_seed', 0)),
                                int(get('synthetic_symbols', 1)), timeframe, preset, point)
    time_note = 'synthetic market: times generated in UTC' + (' (data.tz is not used)' if tz else '')
    tz = None
  else:
    try:
      times.parse_tz(tz)
    except times.TimeZoneError as e:
      raise DataError(str(e)) from None
    frames = _file_symbols(path, bool(get('repair', False)), point, tz)
    time_note = times.describe_tz(tz)
  frames.sort(key=lambda f: f['symbol'].iat[0] if len(f) else '')
  market = pd.concat(frames, ignore_index=True)
  named = [(f['symbol'].iat[0], f.attrs) for f in frames if len(f)]
  market.attrs = {
      'source': path or 'synthetic',
      'sources': {sym: a.get('source', 'synthetic') for sym, a in named},
      'repair_reports': {sym: a['repair_report'] for sym, a in named if 'repair_report' in a},
      'points': {sym: a['point'] for sym, a in named},
      'point_sources': {sym: a['point_source'] for sym, a in named},
      'spread_sources': {sym: a['spread_source'] for sym, a in named},
      'volume_sources': {sym: a['volume_source'] for sym, a in named},
      'tz': None if times.parse_tz(tz) is None else str(tz),
      'time_note': time_note,
  }
  if not path:
    market.attrs['synthetic_preset'] = preset
  summary = ohlcv_summary(market)
  logging.info('data: %d bars, %d symbol(s), %s .. %s, %d gaps (largest %s s); %s', summary['rows'],
               len(summary['symbols']), summary['start'], summary['end'], summary['gaps'],
               summary['largest_gap_s'], time_note)
  for sym, a in named:
    logging.info('data: %s: point %g (%s); spread: %s; volume: %s', sym, a['point'], a['point_source'],
                 a['spread_source'] or 'none in the data (a backtest needs backtest.spread)', a['volume_source'])
  median = summary['median_interval_s']
  if median is not None and abs(median - expected) > 1e-9:
    logging.warning('data: the median bar interval is %g s but config.data.timeframe is %s (%g s)', median,
                    timeframe, expected)
  return market


def _synthetic_symbols(n_bars: int, seed: int, n_symbols: int, timeframe: str, preset: str = 'learnable',
                       point=None) -> list:
  if n_symbols < 1:
    raise UserError(f"config.data.synthetic_symbols must be >= 1, got {n_symbols}")
  if preset not in PRESETS:
    raise UserError(f"config.data.synthetic_preset must be one of {sorted(PRESETS)}, got {preset!r}")
  if n_symbols == 1:
    names, seeds = ['SYNTH'], [seed]
  else:
    width = len(str(n_symbols - 1))   # zero-padded so the lexicographic order is the numeric order
    names, seeds = [f'SYNTH{i:0{width}d}' for i in range(n_symbols)], [(seed, i) for i in range(n_symbols)]
  points = parse_point_setting(point, names)
  frames = []
  for name, sym_seed in zip(names, seeds):
    kwargs = {} if points[name] is None else {'point': points[name]}
    frame, _ = synthetic_market(n_bars, seed=sym_seed, timeframe=timeframe, preset=preset, **kwargs)
    frame['symbol'] = name
    frame.attrs = dict(source='synthetic', point=float(kwargs.get('point', DEFAULT_POINT)),
                       point_source=POINT_CONFIG if kwargs else 'synthetic default', spread_source='synthetic',
                       volume_source='tick_volume (synthetic)')
    frames.append(frame)
  return frames


def _file_symbols(path: str, repair: bool, point=None, tz=None) -> list:
  paths = [p.strip() for p in path.split(',') if p.strip()]
  symbols = [Path(p).stem for p in paths]
  repeated = sorted({s for s in symbols if symbols.count(s) > 1})
  if repeated:
    raise DataError(f"config.data.path: several files share the symbol name(s) {repeated} (the file stem); "
                    f"rename them so each symbol is one file")
  points = parse_point_setting(point, symbols)
  return [load_ohlcv(p, repair=repair, symbol=s, point=points[s], tz=tz) for p, s in zip(paths, symbols)]
