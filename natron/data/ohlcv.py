"""OHLCV ingestion: CSV, MetaTrader 5 exports, Parquet and DataFrames -> one validated frame.

Output of `load_ohlcv` (RangeIndex, one row per bar, in time order):
  time     datetime64[ns, UTC]
  open, high, low, close, volume   float64
  spread         float64, price units (only when known in price units, see below)
  spread_points  float64, MetaTrader points (only for MetaTrader sources)
  symbol         str (only when requested or present in the input)

Accepted inputs:
- CSV with a header `time,open,high,low,close,volume[,spread]` (the seed format; `spread` in price units).
  Aliases: `datetime` / `timestamp` / `date` for `time`, or separate `date` and `time` columns.
- MetaTrader 5 "Export bars": tab-separated `<DATE> <TIME> <OPEN> <HIGH> <LOW> <CLOSE> <TICKVOL> <VOL>
  <SPREAD>`, dates like 2024.01.02, times like 00:15:00 (`<TIME>` absent in daily exports); UTF-8 or UTF-16.
  Also frames from the MetaTrader 5 Python API (`copy_rates_*`: time in epoch seconds, tick_volume,
  real_volume, spread).
- Parquet (`.parquet` / `.pq`) and pandas DataFrames with the seed columns (or the MetaTrader ones).

Volume: a `volume` column is used as is. Otherwise (MetaTrader) real volume `<VOL>` is used, unless it is
all zero, as for spot FX, where the tick volume `<TICKVOL>` is used. `frame.attrs['volume_source']` says which.

MetaTrader spread is an integer number of *points* (the symbol's price increment, 1e-5 for EURUSD, 1e-3 for
USDJPY), which the export does not record. It is kept raw as `spread_points`; `spread` (price units, the
unit the backtest and RL costs use) is added only when the caller passes `point=` (spread = points * point).
The loader never guesses the point size from price decimals.

Times: naive timestamps are taken to be in `tz` (default UTC; MetaTrader exports are in the broker's
server time, e.g. pass tz='Etc/GMT-2' for a fixed UTC+2 server) and converted to UTC.

Validation never drops, fills or reorders anything (a frame holding several symbols comes back grouped by
symbol, a stable sort that keeps each symbol's validated row order). Every broken rule raises `DataError`
naming the rule, the number of offending rows and the first few of them (0-based data rows; in text files
line = row + 2):
missing columns, unparseable times, non-numeric or NaN/inf values, non-positive prices,
high < max(open, close), low > min(open, close), negative volume or spread, duplicate or decreasing
timestamps (within a symbol). Gaps in time are legal; `ohlcv_summary` counts them. `repair=True` is the one
explicit fix: a stable sort by time and removal of repeated timestamps (the first row in file order is kept),
with the exact counts in `frame.attrs['repair_report']` and the log.
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

from natron.data.synthetic import synthetic_market, timeframe_delta
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
_ARROW_TIME_FORMATS = (pcsv.ISO8601, '%Y.%m.%d %H:%M:%S', '%Y.%m.%d %H:%M', '%Y.%m.%d')
_TIME_RULE = ('time must be a valid timestamp (YYYY-MM-DD HH:MM:SS, YYYY.MM.DD HH:MM:SS, ISO 8601 with an '
              'optional UTC offset, or epoch seconds)')
_TIME_FORMATS = ('%Y-%m-%d %H:%M:%S', '%Y.%m.%d %H:%M:%S', '%Y-%m-%d %H:%M', '%Y.%m.%d %H:%M',
                 '%Y-%m-%dT%H:%M:%S', '%Y-%m-%d', '%Y.%m.%d', '%Y%m%d %H:%M:%S')


class DataError(UserError):
  """Input data breaks a rule; the message names the rule and the offending rows.

  `violations` holds (rule, rows) pairs, rows being 0-based data row numbers (all of them, not just the
  ones the message lists).
  """

  def __init__(self, message: str, violations=()):
    super().__init__(message)
    self.violations = list(violations)


# ----------------------------------------------------------------------------------------------- loading

def load_ohlcv(path_or_frame, *, repair: bool = False, symbol: str | None = None, point: float | None = None,
               tz: str = 'UTC') -> pd.DataFrame:
  """Loads and validates one OHLCV series (see the module docstring for formats and rules).

  Args:
    path_or_frame: a path (CSV / MetaTrader export / Parquet) or a pandas DataFrame (not modified).
    repair: sort by time and drop repeated timestamps, reporting the counts; never fixes values.
    symbol: adds a constant `symbol` column.
    point: MetaTrader point size in price units; turns `spread_points` into `spread`.
    tz: time zone of naive timestamps.

  Returns:
    the canonical frame [T rows], attrs: source, volume_source, ignored_columns (+ repair_report).
  """
  source, raw, is_text = _read(path_or_frame)
  table, used = _canonical_columns(raw, source)
  ignored = [str(c) for c in raw.columns if str(c) not in used]
  if len(raw) == 0:
    raise DataError(f"{source}: no rows (only a header)")
  violations = []
  time = _parse_time(table, source, tz, violations)
  frame, volume_source = _assemble(table, time, source, point, violations)
  if symbol is not None:
    if 'symbol' in frame and not (frame['symbol'] == symbol).all():
      raise DataError(f"{source}: symbol={symbol!r} was given but the data has a `symbol` column with other "
                      f"values {sorted(frame['symbol'].unique())[:_MAX_LISTED]}")
    frame['symbol'] = str(symbol)
  if violations:   # unparseable values: report them with every other broken rule, before any repair
    _raise_if(violations + _not_already(_violations(frame), violations), source, is_text)
  report = None
  if repair:
    frame, report = repair_order(frame)
    logging.info('%s: repair: %s', source, report)
  _raise_if(_violations(frame), source, is_text, repairable=not repair)
  frame.attrs.update(source=source, volume_source=volume_source, ignored_columns=ignored)
  if report is not None:
    frame.attrs['repair_report'] = report
  if 'symbol' in frame and frame['symbol'].nunique() > 1:
    # Group the symbols (stable: each symbol's validated time order is kept) so no window can cross them.
    frame = frame.sort_values('symbol', kind='stable').reset_index(drop=True)
  if ignored:
    logging.info('%s: ignored columns %s', source, ignored)
  return frame


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


def _parse_time(table: dict, source: str, tz: str, violations: list) -> pd.DatetimeIndex:
  """UTC timestamps from `time` (+ a separate `date`), recording unparseable rows as a violation."""
  values = table['time']
  if 'date' in table and pd.api.types.is_timedelta64_dtype(values.dtype):   # MetaTrader, parsed by arrow
    values = pd.to_datetime(table['date']) + values
  elif 'date' in table:   # MetaTrader <DATE> and <TIME> as text
    values = table['date'].astype(str).str.strip() + ' ' + values.astype(str).str.strip()
  if pd.api.types.is_datetime64_any_dtype(values.dtype):
    parsed = pd.DatetimeIndex(values)
  elif pd.api.types.is_numeric_dtype(values.dtype) and not pd.api.types.is_bool_dtype(values.dtype):
    # MetaTrader 5 Python API: epoch seconds, in the broker's server time like the exports.
    parsed = pd.DatetimeIndex(pd.to_datetime(values, unit='s', errors='coerce'))
  else:
    parsed = _parse_time_strings(values.astype(object))
  if parsed.tz is None:
    try:
      parsed = parsed.tz_localize(tz, ambiguous='raise', nonexistent='raise')
    except Exception as e:  # pytz / zoneinfo raise different types for DST problems
      raise DataError(f"{source}: cannot interpret the naive timestamps in time zone {tz!r} ({e}); "
                      f"use a fixed-offset zone such as 'Etc/GMT-2'") from e
  parsed = parsed.tz_convert('UTC').as_unit('ns')
  bad = np.flatnonzero(np.asarray(parsed.isna()))
  if bad.size:
    violations.append((_TIME_RULE, bad, {'time': np.asarray(values)}))
  return parsed


def _parse_time_strings(values: pd.Series) -> pd.DatetimeIndex:
  """Picks the known format (or ISO 8601 with offsets) that parses most of a sample, then parses all rows.

  Choosing on a sample's majority, not on its first value, keeps one bad row from derailing the format:
  the bad row is reported, the rest parse.
  """
  sample = values.dropna().head(200)
  if sample.empty:
    return pd.DatetimeIndex(pd.to_datetime(values, errors='coerce'))
  best, best_count = 'ISO8601', -1
  for fmt in ('ISO8601',) + _TIME_FORMATS:
    try:
      count = int(pd.to_datetime(sample, format=fmt, errors='coerce', utc=True).notna().sum())
    except (ValueError, TypeError):
      continue
    if count > best_count:
      best, best_count = fmt, count
    if count == len(sample):
      break
  try:
    return pd.DatetimeIndex(pd.to_datetime(values, format=best, errors='coerce'))
  except (ValueError, TypeError):   # mixed UTC offsets (e.g. across DST): convert each to UTC
    return pd.DatetimeIndex(pd.to_datetime(values, format=best, errors='coerce', utc=True))


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


def _assemble(table: dict, time: pd.DatetimeIndex, source: str, point, violations: list):
  """Canonical frame from the mapped columns -> (frame, volume_source)."""
  cols = {'time': time}
  for name in PRICES:
    cols[name] = _numeric(table[name], name, violations)
  if 'volume' in table:
    cols['volume'], volume_source = _numeric(table['volume'], 'volume', violations), 'volume'
  else:
    real = _numeric(table['real_volume'], 'real_volume', violations) if 'real_volume' in table else None
    if real is not None and np.nansum(np.abs(real)) > 0:
      cols['volume'], volume_source = real, 'real_volume'
    elif 'tick_volume' in table:
      cols['volume'], volume_source = _numeric(table['tick_volume'], 'tick_volume', violations), 'tick_volume'
    else:
      raise DataError(f"{source}: real volume is all zero and there is no tick volume column")
  if 'spread' in table:
    cols['spread'] = _numeric(table['spread'], 'spread', violations)
  if 'spread_points' in table:
    points = _numeric(table['spread_points'], 'spread_points', violations)
    if point is not None:
      if not (np.isfinite(point) and point > 0):
        raise DataError(f"point must be a positive price increment such as 1e-5, got {point!r}")
      cols['spread'] = points * float(point)
    cols['spread_points'] = points
  elif point is not None:
    raise DataError(f"{source}: point={point!r} was given but the data has no MetaTrader spread column")
  if 'symbol' in table:
    cols['symbol'] = table['symbol'].astype(str).to_numpy()
  frame = pd.DataFrame(cols)
  return frame, volume_source


# ---------------------------------------------------------------------------------------------- validation

def validate_ohlcv(frame: pd.DataFrame, *, source: str = 'frame'):
  """Raises DataError if a canonical frame (time as datetime64, float columns) breaks any rule."""
  _raise_if(_violations(frame), source, is_text=False)


def _violations(frame: pd.DataFrame) -> list:
  """All rule violations of a canonical frame -> list of (rule, rows int64[k], columns to show)."""
  violations = []
  values = {c: frame[c].to_numpy(np.float64) for c in PRICES + ('volume',) + OPTIONAL if c in frame}
  for name, x in values.items():
    bad = np.flatnonzero(~np.isfinite(x))
    if bad.size:
      violations.append((f'{name} must be finite (not NaN/inf/missing)', bad, {name: x}))
  o, h, l, c = (values[k] for k in PRICES)
  with np.errstate(invalid='ignore'):
    _add(violations, 'prices must be > 0', (o <= 0) | (h <= 0) | (l <= 0) | (c <= 0),
         {k: values[k] for k in PRICES})
    _add(violations, 'high >= max(open, close)', h < np.maximum(o, c), {'high': h, 'open': o, 'close': c})
    _add(violations, 'low <= min(open, close)', l > np.minimum(o, c), {'low': l, 'open': o, 'close': c})
    _add(violations, 'volume >= 0', values['volume'] < 0, {'volume': values['volume']})
    for name in OPTIONAL:
      if name in values:
        _add(violations, f'{name} >= 0', values[name] < 0, {name: values[name]})
  step = _time_steps(frame)
  times = {'time': pd.DatetimeIndex(frame['time'])}   # formatted only for the rows a message lists
  _add(violations, 'timestamps must not repeat (duplicate of the previous row)', step == 0, times)
  _add(violations, 'timestamps must increase (earlier than the previous row)', step < 0, times)
  return violations


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


def _add(violations: list, rule: str, mask: np.ndarray, show: dict):
  rows = np.flatnonzero(mask)
  if rows.size:
    violations.append((rule, rows, show))


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
      paths, one symbol each, named by file stem), repair, timeframe, synthetic_bars, synthetic_seed,
      synthetic_symbols (default 1; one symbol is named 'SYNTH' and uses synthetic_seed itself, several are
      SYNTH0, SYNTH1, ... with seeds (synthetic_seed, i)).

  Returns:
    the canonical frame plus a `symbol` column (str); windows must never cross symbols.
  """
  cfg = data_config.data if hasattr(data_config, 'data') and not hasattr(data_config, 'path') else data_config

  def get(key, default):
    return cfg.get(key, default) if hasattr(cfg, 'get') else getattr(cfg, key, default)

  path = str(get('path', '') or '').strip()
  timeframe = str(get('timeframe', '15min'))
  expected = timeframe_delta(timeframe).total_seconds()   # a bad timeframe fails before any loading
  if not path:
    frames = _synthetic_symbols(int(get('synthetic_bars', 20_000)), int(get('synthetic_seed', 0)),
                                int(get('synthetic_symbols', 1)), timeframe)
  else:
    frames = _file_symbols(path, bool(get('repair', False)))
  frames.sort(key=lambda f: f['symbol'].iat[0] if len(f) else '')
  market = pd.concat(frames, ignore_index=True)
  market.attrs = {
      'source': path or 'synthetic',
      'sources': {f['symbol'].iat[0]: f.attrs.get('source', 'synthetic') for f in frames if len(f)},
      'repair_reports': {f['symbol'].iat[0]: f.attrs['repair_report'] for f in frames
                         if len(f) and 'repair_report' in f.attrs},
  }
  summary = ohlcv_summary(market)
  logging.info('data: %d bars, %d symbol(s), %s .. %s, %d gaps (largest %s s)', summary['rows'],
               len(summary['symbols']), summary['start'], summary['end'], summary['gaps'],
               summary['largest_gap_s'])
  median = summary['median_interval_s']
  if median is not None and abs(median - expected) > 1e-9:
    logging.warning('data: the median bar interval is %g s but config.data.timeframe is %s (%g s)', median,
                    timeframe, expected)
  return market


def _synthetic_symbols(n_bars: int, seed: int, n_symbols: int, timeframe: str) -> list:
  if n_symbols < 1:
    raise UserError(f"config.data.synthetic_symbols must be >= 1, got {n_symbols}")
  if n_symbols == 1:
    frame, _ = synthetic_market(n_bars, seed=seed, timeframe=timeframe)
    frame['symbol'] = 'SYNTH'
    return [frame]
  width = len(str(n_symbols - 1))   # zero-padded so the lexicographic order is the numeric order
  frames = []
  for i in range(n_symbols):
    frame, _ = synthetic_market(n_bars, seed=(seed, i), timeframe=timeframe)
    frame['symbol'] = f'SYNTH{i:0{width}d}'
    frames.append(frame)
  return frames


def _file_symbols(path: str, repair: bool) -> list:
  paths = [p.strip() for p in path.split(',') if p.strip()]
  symbols = [Path(p).stem for p in paths]
  repeated = sorted({s for s in symbols if symbols.count(s) > 1})
  if repeated:
    raise DataError(f"config.data.path: several files share the symbol name(s) {repeated} (the file stem); "
                    f"rename them so each symbol is one file")
  return [load_ohlcv(p, repair=repair, symbol=s) for p, s in zip(paths, symbols)]
