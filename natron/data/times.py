"""The one time parser of ingestion and serving, and broker clocks (time zones with daylight saving).

Accepted times, the same everywhere (`load_ohlcv`, the server's requests):
  - text `YYYY-MM-DD HH:MM:SS` or `YYYY.MM.DD HH:MM:SS` (MetaTrader), `T` or a space between date and time,
    seconds, fractions and the time itself optional (`YYYY-MM-DD` is midnight);
  - the same with an explicit UTC offset (ISO 8601: `Z`, `+02:00`, `+0200`, `+02`), converted to UTC;
  - epoch seconds: numbers, or text of 9-10 digits (optionally with a fraction), in [0, MAX_EPOCH_SECONDS]
    (a larger number is almost always milliseconds, and is refused rather than read as the year 55,000).
Anything else (words such as 'now', day-first dates, `20240102`) is refused, never guessed.

A naive time (no offset) is in the zone `tz`: None means UTC. `tz` is an IANA name (`EET`, `Europe/Athens`:
with daylight saving) or a fixed offset (`+02:00`, `UTC+02:00`, `Etc/GMT-2` in IANA's inverted sign).
Daylight saving, decided once here:
  - a naive time the clock skipped (spring forward, e.g. 03:30 on the last Sunday of March in EET) cannot come
    from a clock in that zone: error naming the rows (the data is in another zone; check data.tz);
  - a naive time the clock showed twice (fall back, 03:00-03:59 on the last Sunday of October in EET) is
    resolved from the row order, as a clock shows it: the first pass is summer time, the rows after the clock
    went back are winter time (pandas' `ambiguous='infer'`); when the order cannot say (e.g. a single bar in
    that hour) it is an error naming the rows, with the fix (a fixed offset, or export in UTC).
Both DST changes of EET fall on Sunday 01:00 UTC, inside the FX weekend close, so 24x5 FX data never meets
them; 24x7 data (crypto) does. Brokers whose server clock follows the US DST dates ("New York close", UTC+2
/ UTC+3 switching with New York) have no IANA zone: `EET` is then one hour off for 2-3 weeks a year around
the US/EU switch dates; a fixed offset is off for half the year. Say which in your data notes.
"""
from __future__ import annotations

import dataclasses
import datetime
import re

import numpy as np
import pandas as pd

from natron.errors import UserError

MAX_EPOCH_SECONDS = 9_000_000_000   # 2255-03-14; datetime64[ns] overflows in 2262
NAT = np.iinfo(np.int64).min        # int64 view of NaT
TIME_RULE = ('time must be a valid timestamp (YYYY-MM-DD HH:MM:SS, YYYY.MM.DD HH:MM:SS, ISO 8601 with an '
             'optional UTC offset, or epoch seconds)')
# MetaTrader's dotted layouts for pyarrow's CSV reader, beside its ISO8601 parser (which refuses offsets): a
# fast path for clean files of naive times, all of which `parse_times` accepts too; anything else falls back
# to `parse_times`.
ARROW_FORMATS = ('%Y.%m.%d %H:%M:%S', '%Y.%m.%d %H:%M', '%Y.%m.%d')

_TEXT_TIME = re.compile(
    r'^(?P<date>\d{4}(?P<sep>[-.])\d{2}(?P=sep)\d{2})'
    r'(?P<clock>[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?)?'
    r'\s*(?P<offset>Z|[+-]\d{2}(?::?\d{2})?)?$')
_EPOCH_TEXT = re.compile(r'^\d{9,10}(?:\.\d+)?$')
_FIXED_OFFSET = re.compile(r'^(?:UTC)?\s*([+-])(\d{1,2})(?::?(\d{2}))?$', re.IGNORECASE)


class TimeZoneError(UserError):
  """A time zone setting that is not an IANA name or a fixed offset."""


@dataclasses.dataclass(frozen=True)
class ParsedTimes:
  """ns: int64 [N] nanoseconds since the epoch, UTC (NAT where bad or not placeable); bad: bool [N] rows
  that are not times; reason: a hint about the bad rows ('milliseconds? send seconds') or ''; problems:
  [(rule, rows)] naive times the zone cannot place (daylight saving, see the module docstring)."""
  ns: np.ndarray
  bad: np.ndarray
  reason: str = ''
  problems: list = dataclasses.field(default_factory=list)


# ------------------------------------------------------------------------------------------------ zones

def parse_tz(tz):
  """None / '' / 'UTC' -> None (UTC); '+02:00' / 'UTC+2' -> a fixed datetime.timezone; else an IANA name
  (checked). Raises TimeZoneError naming the setting."""
  if tz is None or isinstance(tz, datetime.tzinfo):
    return tz
  text = str(tz).strip()
  if not text or text.upper() in ('UTC', 'Z', 'ETC/UTC'):
    return None
  m = _FIXED_OFFSET.match(text)
  if m:
    sign, hours, minutes = m.group(1), int(m.group(2)), int(m.group(3) or 0)
    if hours > 14 or minutes >= 60:
      raise TimeZoneError(f'data.tz={tz!r}: a UTC offset must lie within -14:00 .. +14:00')
    delta = datetime.timedelta(hours=hours, minutes=minutes)
    return datetime.timezone(-delta if sign == '-' else delta)
  try:
    pd.Timestamp('2020-01-01').tz_localize(text)
  except Exception:  # pytz / zoneinfo raise different types for unknown names
    raise TimeZoneError(
        f'data.tz={tz!r} is not a time zone: use an IANA name such as \'EET\' or \'Europe/Athens\' (with '
        f'daylight saving), or a fixed offset such as \'+02:00\'') from None
  return text


def describe_tz(tz) -> str:
  """Text for load summaries: where naive times were taken to be."""
  zone = parse_tz(tz)
  if zone is None:
    return 'times taken as UTC (set data.tz for broker server time)'
  return f'naive times read in {tz} and converted to UTC'


def localize(naive_ns: np.ndarray, tz, groups=None) -> tuple[np.ndarray, list]:
  """Naive wall-clock times in `tz` -> (UTC ns int64 [N] (NAT where a row cannot be placed), problems).

  `groups`: optional list of row-index arrays (one per symbol) whose rows are each in time order; the DST
  fall-back hour is resolved from the order within each group. `problems` is a list of (rule, rows) for
  times the clock skipped and repeated hours whose order cannot tell (see the module docstring).
  """
  naive_ns = np.asarray(naive_ns, np.int64)
  zone = parse_tz(tz)
  if zone is None:
    return naive_ns, []
  valid = naive_ns != NAT
  out = np.full(naive_ns.shape, NAT, np.int64)
  if isinstance(zone, datetime.timezone):   # fixed offset: no daylight saving
    offset = int(zone.utcoffset(None).total_seconds()) * 10**9
    out[valid] = naive_ns[valid] - offset
    return out, []
  groups = [np.arange(naive_ns.size)] if groups is None else groups
  skipped_all, repeated_all = [], []
  for rows in groups:
    rows = np.asarray(rows)[valid[rows]]
    if rows.size == 0:
      continue
    index = pd.DatetimeIndex(naive_ns[rows].view('datetime64[ns]'))
    as_summer = index.tz_localize(zone, ambiguous=np.ones(rows.size, bool), nonexistent='NaT')
    skipped = np.asarray(as_summer.isna())
    repeated = np.asarray(index.tz_localize(zone, ambiguous='NaT', nonexistent='shift_forward').isna())
    out[rows] = np.where(skipped | repeated, NAT, as_summer.tz_convert('UTC').asi8)
    if skipped.any():
      skipped_all.append(rows[skipped])
    if repeated.any():
      keep = ~skipped
      try:   # the order tells which pass of the repeated hour each row is in
        inferred = index[keep].tz_localize(zone, ambiguous='infer')
        out[rows[keep]] = inferred.tz_convert('UTC').asi8
      except Exception:  # pytz.AmbiguousTimeError (a ValueError) or ValueError
        repeated_all.append(rows[repeated])
  problems = []
  if skipped_all:
    problems.append((f'times must exist in the time zone {tz} (these fall in the hour its clock skips at the '
                     f'daylight-saving change: the data is not in {tz}; check data.tz)',
                     np.sort(np.concatenate(skipped_all))))
  if repeated_all:
    problems.append((f'times in the hour the clock of {tz} shows twice (daylight saving ends) must be in '
                     f'order so that the first pass reads as summer time; the order here cannot tell (use a '
                     f'fixed offset such as \'+02:00\', or export in UTC)', np.sort(np.concatenate(repeated_all))))
  return out, problems


# ---------------------------------------------------------------------------------------------- parsing

def parse_times(values, tz=None, groups=None) -> ParsedTimes:
  """Times of any accepted kind -> ParsedTimes (UTC ns, bad-row mask, reason, DST problems).

  `values`: a sequence / array / Series of numbers (epoch seconds), strings, or datetime64 (naive or aware).
  Naive times are wall-clock times in `tz` (None: UTC); `groups` as in `localize`. Never raises on bad
  values: callers name the rows in their own message.
  """
  if isinstance(values, (pd.Series, pd.Index)):
    array, dtype = values.to_numpy(), values.dtype
  else:
    array = values if isinstance(values, np.ndarray) else np.asarray(values)
    dtype = array.dtype
  n = len(array)
  if isinstance(dtype, pd.DatetimeTZDtype):
    ns = pd.DatetimeIndex(values).tz_convert('UTC').as_unit('ns').asi8.copy()
    return ParsedTimes(ns, ns == NAT)
  if np.issubdtype(dtype, np.datetime64):
    ns = pd.DatetimeIndex(array).as_unit('ns').asi8.copy()
    bad, reason, naive = ns == NAT, '', np.ones(n, bool)
  elif dtype.kind in 'iuf':
    ns, bad, reason = _from_epoch(array)
    naive = np.zeros(n, bool)
  else:
    ns, bad, reason, naive = _from_objects(np.asarray(array, dtype=object))
  problems = []
  if naive.any() and parse_tz(tz) is not None:
    wall = np.where(naive & ~bad, ns, NAT)
    placed, problems = localize(wall, tz, groups)
    ns = np.where(naive & ~bad, placed, ns)
  return ParsedTimes(ns, bad, reason, problems)


def _from_epoch(seconds):
  """-> (ns, bad, reason) of epoch seconds."""
  s = np.asarray(seconds)
  if s.dtype.kind in 'iu':
    bad = (s < 0) | (s > MAX_EPOCH_SECONDS)
    ns = np.where(bad, NAT, s.astype(np.int64) * 10**9)
  else:
    s = s.astype(np.float64, copy=False)
    with np.errstate(invalid='ignore'):
      bad = ~np.isfinite(s) | (s < 0) | (s > MAX_EPOCH_SECONDS)
    ns = np.where(bad, NAT, np.round(np.where(bad, 0.0, s) * 1e9)).astype(np.int64)
  reason = f'epoch seconds must lie in [0, {MAX_EPOCH_SECONDS}] (milliseconds? send seconds)' if bad.any() else ''
  return ns, np.asarray(bad), reason


def _from_objects(values: np.ndarray):
  """Strings (numbers among them are epoch seconds) -> (ns, bad, reason, naive); other types are bad."""
  n = values.size
  ns = np.full(n, NAT, np.int64)
  bad = np.ones(n, bool)
  naive = np.zeros(n, bool)
  reason = ''
  is_str = np.fromiter((type(v) is str for v in values), dtype=bool, count=n)
  is_num = np.fromiter((isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
                        for v in values), dtype=bool, count=n)
  if is_num.any():
    rows = np.flatnonzero(is_num)
    ns[rows], bad[rows], reason = _from_epoch(np.array(values[rows].tolist(), np.float64))
  if is_str.any():
    rows = np.flatnonzero(is_str)
    text = pd.Series(values[rows], dtype=object).str.strip()
    epoch_text = text.str.match(_EPOCH_TEXT).to_numpy(bool)
    if epoch_text.any():
      e_ns, e_bad, e_reason = _from_epoch(text[epoch_text].astype(np.float64).to_numpy())
      ns[rows[epoch_text]], bad[rows[epoch_text]] = e_ns, e_bad
      reason = reason or e_reason
    parts = text.str.extract(_TEXT_TIME)
    matched = parts['date'].notna().to_numpy()
    if matched.any():
      iso = parts['date'].str.replace('.', '-', regex=False) + parts['clock'].fillna('').str.replace(
          'T', ' ', regex=False)
      offset = parts['offset']
      has_offset = matched & offset.notna().to_numpy()
      wall = matched & ~has_offset
      if wall.any():
        stamps = pd.DatetimeIndex(pd.to_datetime(iso[wall], format='ISO8601', errors='coerce'))
        ns[rows[wall]] = stamps.as_unit('ns').asi8
        bad[rows[wall]] = np.asarray(stamps.isna())
        naive[rows[wall]] = True
      if has_offset.any():
        text_with_offset = iso[has_offset] + offset[has_offset].str.replace('Z', '+00:00', regex=False)
        stamps = pd.DatetimeIndex(pd.to_datetime(text_with_offset, format='ISO8601', errors='coerce', utc=True))
        ns[rows[has_offset]] = stamps.as_unit('ns').asi8
        bad[rows[has_offset]] = np.asarray(stamps.isna())
  return ns, bad, reason, naive


def iso_utc(ns) -> str:
  """int64 ns since the epoch -> '2024-01-02T15:00:00Z' (fractions kept when present)."""
  text = str(np.datetime64(int(ns), 'ns'))
  return (text[:-10] if text.endswith('.000000000') else text.rstrip('0')) + 'Z'


__all__ = ['ARROW_FORMATS', 'MAX_EPOCH_SECONDS', 'NAT', 'ParsedTimes', 'TIME_RULE', 'TimeZoneError',
           'describe_tz', 'iso_utc', 'localize', 'parse_times', 'parse_tz']
