"""Walk-forward evaluation: fine-tune + PPO + test repeated over successive, purged, out-of-sample folds.

One train/val/test split tells how a model did on one stretch of history; a trader wants to know whether it
keeps working as the market moves on. Fold k (oldest first) trains on everything before its validation
block (expanding) or on a fixed-length window just before it (rolling), chooses its epoch / PPO seed on the
validation block and is tested on test block k. The test blocks are consecutive and never overlap, so their
returns chain into one out-of-sample equity path (the compounded total return of the aggregate table).

Layout on the (common) bar timeline of N bars, P = the dataset purge (natron.dataset.purge_of):

  | train (rows < b1) | P | val windows [b1+P, b2) | P | test block k [s_k, e_k) | later bars: not in fold k |

with b2 = s_k - P, so the dataset's own purge (test windows start at b2 + P) puts the first test window
exactly at the block start, and b1 = b2 - P - val_bars. Each fold runs in workdir/walkforward/fold_<k>/ on a
copy of the market cut to [train start, e_k) (written there as Parquet), so no phase can read a bar after its
test block, with config.dataset.split_dates = (time[b1], time[b2]): the folds are cut on one calendar for
all symbols (the dataset splits every symbol at those dates). Every phase resumes by itself, and a fold whose
summary.json matches its plan is skipped, so an interrupted run continues where it stopped.
Costs: every symbol's cost model is resolved before any fold runs (`natron.backtest.resolve_costs`: a market
without a spread and no backtest.spread stops here, not after hours of training); each fold's backtest
records the model it applied, and report.md states it per fold and symbol (commission, spread source, mean
spread in price units and points).
Writes workdir/walkforward/{plan.json, summary.json, report.md}.

On a cluster: walkforward.fold = k (launch.py --fold=k) runs fold k alone (one array task per fold; plan.json
and the fold's own summary.json, no tables), and walkforward.gather (launch.py --gather) runs nothing and builds
summary.json and report.md from the fold directories, refusing folds that are missing or ran with another config.
Multi-host (jax.distributed): every process runs the folds' phases, process 0 alone writes files.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import time

from absl import logging
import numpy as np
import pandas as pd

from natron import phases as phase_registry
from natron.errors import UserError

PHASE = 'walkforward'
TASKS = ('buy', 'sell', 'direction', 'regime')
MODES = ('expanding', 'rolling')
METRICS = ('total_return', 'sharpe', 'max_drawdown', 'num_trades')
EVIDENCE = ('total_return_ci', 'sharpe_ci', 'psr', 'dsr', 'verdict')   # natron.backtest.evidence, when present
TASK_KEYS = ('fold', 'gather')   # config.walkforward keys that choose what one invocation does
# Phases a fold can run: the registry minus those that make no sense per fold (features, infer, serve,
# walkforward itself, report).
FOLD_PHASES = {name: phase_registry.PHASES[name]
               for name in ('dataset', 'pretrain', 'finetune', 'inspect', 'rl', 'backtest')}


# ==========================================================================================================
# Fold plan: pure functions of the bar count.
# ==========================================================================================================
@dataclasses.dataclass(frozen=True)
class Fold:
  """Row indices on the common timeline (half-open spans): train [train_start, val_bound), validation windows
  [val_bound + purge, test_bound), test block [test_start, test_end); test_start = test_bound + purge."""
  index: int
  train_start: int
  val_bound: int
  test_bound: int
  test_start: int
  test_end: int

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def _block_sizes(n_bars: int, folds: int, test_bars: int, test_frac: float, val_bars: int) -> tuple[int, int]:
  if test_bars > 0:
    tb = test_bars
  else:
    if not 0 < test_frac < 1:
      raise UserError(f'walkforward.test_frac must be in (0, 1) when test_bars is 0, got {test_frac}')
    tb = int(test_frac * n_bars) // folds
  return tb, (tb if val_bars < 0 else val_bars)


def _plan(n_bars, folds, test_bars, test_frac, val_bars, purge, mode, train_bars, min_train_bars):
  """The folds, or a string saying why `n_bars` is too few."""
  tb, vb = _block_sizes(n_bars, folds, test_bars, test_frac, val_bars)
  if tb < 2 or vb < 1:
    return f'test blocks of {tb} bars and validation blocks of {vb} bars (need >= 2 and >= 1)'
  first_test = n_bars - folds * tb
  out = []
  for k in range(folds):
    start = first_test + k * tb
    test_bound = start - purge
    val_bound = test_bound - purge - vb
    if mode == 'expanding':
      train_start = 0
    else:
      # Rolling: every fold trains on as many bars as fold 0 (or train_bars), ending at its own val block.
      length = train_bars if train_bars > 0 else first_test - 2 * purge - vb
      train_start = max(0, val_bound - length)
    if val_bound - train_start < min_train_bars:
      return (f'fold {k} would train on {val_bound - train_start} bars, fewer than the {min_train_bars} '
              'needed (feature warm-up + window + one test block)')
    out.append(Fold(k, train_start, val_bound, test_bound, start, start + tb))
  return out


def plan_folds(n_bars: int, *, folds: int, purge: int, mode: str = 'expanding', test_bars: int = 0,
               test_frac: float = 0.3, val_bars: int = -1, train_bars: int = 0,
               min_train_bars: int = 0) -> list[Fold]:
  """Successive folds over rows [0, n_bars) of a bar timeline.

  Args:
    n_bars: bars in the (common) series.
    folds: number of folds (>= 1).
    purge: bars between training and validation, and between validation and test (the dataset purge).
    mode: 'expanding' (train from the first bar) or 'rolling' (a fixed-length training window).
    test_bars: bars per test block; 0 -> the last `test_frac` of the bars in `folds` equal blocks.
    val_bars: bars of validation windows before each test block; -1 -> one test block.
    train_bars: rolling training length; 0 -> fold 0's (all it can have).
    min_train_bars: fewest training bars a fold may have.

  Returns:
    `folds` Folds, oldest first: test blocks consecutive and disjoint, the last ending at n_bars.

  Raises:
    UserError: bad settings, or too few bars (the message says how many are needed).
  """
  if mode not in MODES:
    raise UserError(f'walkforward.mode must be one of {MODES}, got {mode!r}')
  if folds < 1:
    raise UserError(f'walkforward.folds must be >= 1, got {folds}')
  if purge < 0 or test_bars < 0 or train_bars < 0 or min_train_bars < 0:
    raise UserError('walkforward: purge, test_bars, train_bars and min_train_bars must be >= 0')
  args = (folds, test_bars, test_frac, val_bars, purge, mode, train_bars, min_train_bars)
  plan = _plan(n_bars, *args)
  if isinstance(plan, list):
    check_folds(plan, purge)
    return plan
  need = _bars_needed(n_bars, args)
  raise UserError(f'walk-forward: {n_bars} bars are too few for {folds} {mode} folds: {plan}. It needs about '
                  f'{need} bars with these settings (walkforward.test_bars / test_frac / val_bars, '
                  f'dataset.window, purge {purge}); use more data or fewer folds.')


def _bars_needed(n_bars: int, args) -> int:
  """The smallest bar count that plans (bisection; the plan is monotone in n up to block rounding)."""
  hi = max(2 * n_bars, 16)
  while not isinstance(_plan(hi, *args), list):
    hi *= 2
    if hi > 10**12:
      return -1
  lo = n_bars
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (lo, mid) if isinstance(_plan(mid, *args), list) else (mid, hi)
  return hi


def check_folds(folds: list[Fold], purge: int) -> None:
  """Asserts the walk-forward invariants (a violation is a bug, not a user error)."""
  for f in folds:
    assert f.train_start < f.val_bound <= f.test_bound - purge, f
    assert f.test_start == f.test_bound + purge and f.test_start < f.test_end, f
  for a, b in zip(folds, folds[1:]):
    assert a.test_end == b.test_start, (a, b)


# ==========================================================================================================
# From rows to dates and per-fold data.
# ==========================================================================================================
def utc_times(frame: pd.DataFrame) -> np.ndarray:
  """datetime64[ns] [T]: the frame's bar times in UTC without a time zone (comparable numpy values)."""
  index = pd.DatetimeIndex(frame['time'])
  return (index.tz_convert('UTC').tz_localize(None) if index.tz is not None else index).to_numpy()


def common_timeline(frame: pd.DataFrame) -> np.ndarray:
  """datetime64[ns] [N]: every bar time of any symbol inside the range all symbols cover.

  The union is at least as dense as each symbol, so a symbol never has more than P bars where the timeline
  has P: the purge counted on this timeline is at least the purge for every symbol.
  """
  if 'time' not in frame:
    raise UserError('walk-forward needs a time column in the market data')
  times = utc_times(frame)
  symbols = frame['symbol'].to_numpy() if 'symbol' in frame else np.zeros(len(frame), np.int8)
  lo, hi = None, None
  for s in pd.unique(symbols):
    t = times[symbols == s]
    lo = t.min() if lo is None else max(lo, t.min())
    hi = t.max() if hi is None else min(hi, t.max())
  if lo is None or lo >= hi:
    raise UserError('walk-forward: the symbols share no common time range')
  return np.unique(times[(times >= lo) & (times <= hi)])


def fold_dates(timeline: np.ndarray, fold: Fold) -> dict:
  """ISO timestamps of a fold's boundaries; test_end is None for the last block (to the end of the data)."""
  def iso(i):
    return pd.Timestamp(timeline[i]).tz_localize(None).isoformat() if i < len(timeline) else None
  return {'train_start': iso(fold.train_start), 'val_start': iso(fold.val_bound),
          'test_split': iso(fold.test_bound), 'test_start': iso(fold.test_start), 'test_end': iso(fold.test_end)}


def fold_frame(frame: pd.DataFrame, dates: dict) -> pd.DataFrame:
  """Rows with train_start <= time < test_end (the fold sees nothing after its test block)."""
  t = pd.DatetimeIndex(frame['time'])
  keep = t >= pd.Timestamp(dates['train_start'], tz='UTC')
  if dates['test_end'] is not None:
    keep &= t < pd.Timestamp(dates['test_end'], tz='UTC')
  return frame.loc[np.asarray(keep)].reset_index(drop=True)


def symbol_spans(frame: pd.DataFrame, dates: dict, purge: int) -> dict:
  """Per symbol, the fold's spans as the dataset will cut them (same searchsorted as dataset._split_bounds).

  Returns {symbol: {'train_last': time, 'test_first': time, 'test_last': time, 'bars_between': int}}.
  """
  out = {}
  for sym, part in frame.groupby('symbol', sort=True):
    t = pd.DatetimeIndex(part['time'])
    b1 = int(t.searchsorted(pd.Timestamp(dates['val_start'], tz='UTC')))
    b2 = int(t.searchsorted(pd.Timestamp(dates['test_split'], tz='UTC')))
    first = b2 + purge
    if b1 < 1 or first >= len(t):
      raise UserError(f'walk-forward: symbol {sym} has no training or no test bars in fold spanning '
                      f'{dates["train_start"]} .. {dates["test_end"] or "end"}; its history is too sparse there.')
    out[str(sym)] = {'train_last': t[b1 - 1], 'test_first': t[first], 'test_last': t[-1],
                     'bars_between': first - b1}
  return out


def verify_spans(spans: list[dict], purge: int) -> None:
  """Each fold's test strictly after its training (>= 2 purges apart, val between); test blocks disjoint."""
  for k, fold in enumerate(spans):
    for sym, s in fold.items():
      if not (s['train_last'] < s['test_first'] and s['bars_between'] >= 2 * purge):
        raise UserError(f'walk-forward fold {k}, {sym}: test starts {s["test_first"]} but training runs to '
                        f'{s["train_last"]} ({s["bars_between"]} bars apart, need >= {2 * purge}).')
      if k and sym in spans[k - 1] and spans[k - 1][sym]['test_last'] >= s['test_first']:
        raise UserError(f'walk-forward folds {k - 1} and {k} ({sym}): test blocks overlap at {s["test_first"]}.')


# ==========================================================================================================
# Running the folds.
# ==========================================================================================================
def _settings(config) -> dict:
  if 'walkforward' not in config:
    raise UserError('The config has no walkforward section: use configs/walkforward.py, or add '
                    'config.walkforward = configs.walkforward.section() to yours.')
  wf = config.walkforward
  return dict(folds=int(wf.folds), mode=str(wf.mode), test_bars=int(wf.get('test_bars', 0)),
              test_frac=float(wf.get('test_frac', 0.3)), val_bars=int(wf.get('val_bars', -1)),
              train_bars=int(wf.get('train_bars', 0)))


def _phases(config) -> tuple[str, ...]:
  phases = tuple(config.walkforward.get('phases', ('finetune', 'rl', 'backtest')))
  unknown = [p for p in phases if p not in FOLD_PHASES]
  if not phases or unknown:
    raise UserError(f'walkforward.phases must name phases among {sorted(FOLD_PHASES)}, got {phases}')
  return phases


def fold_config(config, workdir: str, data_paths: list[str], dates: dict, phases):
  """The config one fold runs with: its own data cut, split dates and (maybe) the parent's pretrained encoder."""
  cfg = config.copy_and_resolve_references()
  with cfg.unlocked():
    for key in TASK_KEYS:   # which fold an invocation runs is not part of any fold's config (or fingerprint)
      if key in cfg.walkforward:
        del cfg.walkforward[key]
    cfg.data.path = ','.join(data_paths)
    cfg.data.repair = False          # the cut was written from the already loaded (and repaired) market
    cfg.dataset.split_dates = (dates['val_start'], dates['test_split'])
    cfg.phase = ''
    cfg.phases = tuple(phases)
    init = shared_model_init(config, workdir, phases)
    if init is not None:
      cfg.finetune.model_init = init
    if 'rl' not in phases and 'finetune' in cfg:
      cfg.finetune.rl_holdout = 0.0    # no PPO to hold bars out for: fine-tune on the whole training span
  return cfg


def shared_model_init(config, workdir: str, phases) -> str | None:
  """finetune.model_init for every fold when it is 'auto' and the folds do not pretrain themselves (else None).

  finetune's 'auto' looks in its own (the fold's) workdir; the encoder pretrained once lives in the parent's:
  its absolute path when it holds a checkpoint, else '' (from scratch).
  """
  if 'finetune' not in config or 'pretrain' in phases or str(config.finetune.get('model_init', '')) != 'auto':
    return None
  parent = os.path.abspath(os.path.join(workdir, 'pretrain'))
  return parent if os.path.isdir(parent) and os.listdir(parent) else ''


def config_fingerprint(cfg) -> str:
  """sha256 of a config's JSON: a finished fold is reused only under exactly the config it ran with."""
  return hashlib.sha256(cfg.to_json_best_effort(sort_keys=True).encode()).hexdigest()


def _fold_data_paths(frame: pd.DataFrame, fold_dir: str) -> list[str]:
  """fold_dir/data/<symbol>.parquet, one per symbol (natron.data names a file's symbol by its stem)."""
  return [os.path.abspath(os.path.join(fold_dir, 'data', f'{sym}.parquet'))
          for sym in sorted(frame['symbol'].astype(str).unique())]


def _is_main_process() -> bool:
  from natron.train import state as train_state  # pylint: disable=g-import-not-at-top
  return train_state.is_main_process()


def _sync(name: str) -> None:
  from natron.train import state as train_state  # pylint: disable=g-import-not-at-top
  train_state.sync(name)


def _write_json(path: str, value, **kwargs) -> None:
  """Atomic (array tasks of one walk-forward may write plan.json at the same time); process 0 only."""
  if not _is_main_process():
    return
  tmp = f'{path}.{os.getpid()}.tmp'
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=2, **kwargs)
  os.replace(tmp, path)


def _write_fold_data(frame: pd.DataFrame, fold_dir: str) -> None:
  if _is_main_process():
    os.makedirs(os.path.join(fold_dir, 'data'), exist_ok=True)
    for path, (_, part) in zip(_fold_data_paths(frame, fold_dir), frame.groupby('symbol', sort=True)):
      # Rewritten every time: the cut is a pure function of the plan, and a stale file must not survive.
      tmp = path + '.tmp'
      part.drop(columns=['symbol']).reset_index(drop=True).to_parquet(tmp, index=False)
      os.replace(tmp, path)
  _sync('natron_walkforward_fold_data')   # every process reads the cut process 0 wrote


def _run_phases(cfg, fold_dir: str, phases) -> dict:
  if _is_main_process():
    os.makedirs(fold_dir, exist_ok=True)
    with open(os.path.join(fold_dir, 'config.json'), 'w') as f:
      f.write(cfg.to_json_best_effort(indent=2))
  results = {}
  for name in phases:
    start = time.time()
    results[name] = importlib.import_module(FOLD_PHASES[name]).run_phase(cfg, fold_dir) or {}
    logging.info('walkforward: %s: phase %s done in %.1f s', os.path.basename(fold_dir), name,
                 time.time() - start)
  return results


def _load_json(path):
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return None


def fold_metrics(fold_dir: str) -> dict:
  """What one finished fold wrote: {'backtest': {symbol: {policy: metrics}}, 'supervised': {task: {...}},
  'costs': {symbol: the cost model its backtest applied (natron.backtest.CostModel.describe())}}."""
  backtest = {}
  root = os.path.join(fold_dir, 'backtest')
  if os.path.isdir(root):
    for sym in sorted(os.listdir(root)):
      m = _load_json(os.path.join(root, sym, 'metrics.json'))
      if m is not None:
        backtest[sym] = {p: {k: m[p].get(k) for k in METRICS + EVIDENCE if k in m[p] or k in METRICS}
                         for p in m}
  costs = {}
  if os.path.isdir(root):
    for sym in sorted(os.listdir(root)):
      m = _load_json(os.path.join(root, sym, 'metrics.json')) or {}
      cost = next((v['cost_model'] for v in m.values() if isinstance(v, dict) and v.get('cost_model')), None)
      if cost is not None:
        costs[sym] = cost
  report = _load_json(os.path.join(fold_dir, 'finetune', 'report.json')) or {}
  supervised = {t: _supervised_entry(report['test'][t]) for t in TASKS if t in report.get('test', {})}
  return {'backtest': backtest, 'supervised': supervised, 'costs': costs}


def run_phase(config, workdir: str) -> dict:
  """Runs every fold (resuming), then writes workdir/walkforward/{plan.json, summary.json, report.md}."""
  from natron import data as data_lib        # pylint: disable=g-import-not-at-top
  from natron import dataset as dataset_lib  # pylint: disable=g-import-not-at-top
  from natron import features as features_lib  # pylint: disable=g-import-not-at-top

  out_dir = os.path.join(workdir, PHASE)
  if _is_main_process():
    os.makedirs(out_dir, exist_ok=True)
  settings, phases = _settings(config), _phases(config)
  only, gather = int(config.walkforward.get('fold', -1)), bool(config.walkforward.get('gather', False))
  purge = dataset_lib.purge_of(config)
  frame = data_lib.load_market(config.data)
  costs = market_costs(frame, config) if {'rl', 'backtest'} & set(phases) else {}   # before any fold runs
  timeline = common_timeline(frame)
  min_train = int(config.walkforward.get('min_train_bars', 0))
  if min_train <= 0:
    tb, _ = _block_sizes(len(timeline), settings['folds'], settings['test_bars'], settings['test_frac'],
                         settings['val_bars'])
    min_train = features_lib.WARMUP + int(config.dataset.window) + tb
  folds = plan_folds(len(timeline), purge=purge, min_train_bars=min_train, **settings)
  start_time, end_time = timeline[0], timeline[-1]
  times = utc_times(frame)
  common = frame[(times >= start_time) & (times <= end_time)]
  dates = [fold_dates(timeline, f) for f in folds]
  spans = [symbol_spans(fold_frame(common, d), d, purge) for d in dates]
  verify_spans(spans, purge)
  plan = {'settings': {**settings, 'purge': purge, 'min_train_bars': min_train, 'phases': list(phases)},
          'bars': len(timeline), 'folds': [{'rows': f.to_dict(), 'dates': d} for f, d in zip(folds, dates)],
          'costs': costs}
  if not -1 <= only < len(folds):
    raise UserError(f'walkforward.fold={only} (--fold) is outside the plan: it has {len(folds)} folds '
                    f'(0..{len(folds) - 1}); -1 runs them all.')
  if gather:
    return _gather(config, workdir, out_dir, plan, folds, dates, common, phases)
  _write_json(os.path.join(out_dir, 'plan.json'), plan)
  logging.info('walkforward: %d %s folds over %d bars (%s .. %s), test blocks of %d bars, purge %d, phases %s',
               len(folds), settings['mode'], len(timeline), pd.Timestamp(start_time), pd.Timestamp(end_time),
               folds[0].test_end - folds[0].test_start, purge, ','.join(phases))

  rows, durations = [], []
  for fold, d in zip(folds, dates):
    if only >= 0 and fold.index != only:
      continue
    fold_dir = os.path.join(out_dir, f'fold_{fold.index}')
    part = fold_frame(common, d)
    cfg = fold_config(config, workdir, _fold_data_paths(part, fold_dir), d, phases)
    fingerprint = config_fingerprint(cfg)
    done = _load_json(os.path.join(fold_dir, 'summary.json'))
    if done is not None and done.get('config_sha256') == fingerprint:
      logging.info('walkforward: fold_%d (%d of %d) already done; skipped.', fold.index, fold.index + 1,
                   len(folds))
    else:
      if done is not None:
        logging.warning('walkforward: fold_%d ran with another config; running its phases again (each resumes '
                        'from its own checkpoints: delete %s to start the fold afresh).', fold.index, fold_dir)
      t0 = time.time()
      _write_fold_data(part, fold_dir)
      results = _run_phases(cfg, fold_dir, phases)
      _write_json(os.path.join(fold_dir, 'summary.json'),
                  {'dates': d, 'phases': list(phases), 'config_sha256': fingerprint, 'results': results},
                  default=str)
      _sync('natron_walkforward_fold_done')
      durations.append(time.time() - t0)
      left = 0 if only >= 0 else len(folds) - fold.index - 1
      logging.info('walkforward: fold_%d (%d of %d, test %s .. %s) done in %.0f s; ETA %.0f s for %d more '
                   'fold(s).', fold.index, fold.index + 1, len(folds), d['test_start'], d['test_end'] or 'end',
                   durations[-1], np.mean(durations) * left, left)
    rows.append({'fold': fold.index, 'dates': d, **fold_metrics(fold_dir)})
  if only >= 0:   # one cluster task: the tables wait for the gather (launch.py --gather)
    return {'fold': only, 'folds': len(folds)}
  return _write_tables(config, workdir, out_dir, plan, rows, phases)


def _write_tables(config, workdir: str, out_dir: str, plan: dict, rows: list[dict], phases) -> dict:
  summary = {'plan': plan, 'folds': rows, 'aggregate': aggregate(rows),
             'pretrained_encoder': (shared_model_init(config, workdir, phases) or None
                                    if 'finetune' in phases else None)}
  _write_json(os.path.join(out_dir, 'summary.json'), summary, default=_json_default)
  if _is_main_process():
    with open(os.path.join(out_dir, 'report.md'), 'w') as f:
      f.write(report_markdown(summary))
  return {'folds': len(plan['folds']), **_flat_headline(summary['aggregate'])}


def _gather(config, workdir: str, out_dir: str, plan: dict, folds, dates, common, phases) -> dict:
  """The tables from folds run separately (--fold=k): every fold must be done under this config's plan."""
  problems = []
  for fold, d in zip(folds, dates):
    fold_dir = os.path.join(out_dir, f'fold_{fold.index}')
    cfg = fold_config(config, workdir, _fold_data_paths(fold_frame(common, d), fold_dir), d, phases)
    done = _load_json(os.path.join(fold_dir, 'summary.json'))
    if done is None:
      problems.append(f'fold_{fold.index} not run (no {os.path.join(fold_dir, "summary.json")})')
    elif done.get('config_sha256') != config_fingerprint(cfg):
      problems.append(f'fold_{fold.index} ran with another config or fold plan (its config.json differs from '
                      'this one)')
  if problems:
    raise UserError(f'cannot gather the walk-forward in {out_dir}: ' + '; '.join(problems) + '. Run the '
                    'missing folds with --fold=k and the same --config and overrides, or gather with the config '
                    'the folds used.')
  _write_json(os.path.join(out_dir, 'plan.json'), plan)
  rows = [{'fold': f.index, 'dates': d, **fold_metrics(os.path.join(out_dir, f'fold_{f.index}'))}
          for f, d in zip(folds, dates)]
  return _write_tables(config, workdir, out_dir, plan, rows, phases)


def market_costs(frame: pd.DataFrame, config) -> dict:
  """{symbol: CostModel.describe()} over the whole market: resolves (or refuses) every symbol's costs up front."""
  from natron import backtest  # pylint: disable=g-import-not-at-top
  symbols = frame['symbol'].astype(str).to_numpy() if 'symbol' in frame else np.full(len(frame), 'SYMBOL')
  out = {}
  for sym in sorted(set(symbols)):
    part = frame.loc[symbols == sym]
    out[sym] = backtest.resolve_costs(part, sym, config, frame.attrs.get('points'),
                                      spread_sources=frame.attrs.get('spread_sources')).describe()
  return out


def _json_default(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  return str(x)


def _supervised_entry(m: dict) -> dict:
  """One task's test figures of a fold: accuracy, macro-F1, the baselines' accuracies, the margin over the best
  baseline with its interval, and the verdict (those present in the fold's report)."""
  out = {k: m.get(k) for k in ('accuracy', 'macro_f1', 'majority_baseline')}
  for name, b in (m.get('baselines') or {}).items():
    out[f'{name}_accuracy'] = b.get('accuracy')
  if 'margin_over_best_baseline' in m:
    best = m['margin_over_best_baseline']
    out.update(accuracy_ci=m.get('accuracy_ci'), margin_over_best=best['value'], margin_ci=best['ci'],
               best_baseline=best['baseline'], verdict=m.get('verdict'))
    for name, mm in (m.get('margins') or {}).items():
      out[f'margin_over_{name}'] = mm['value']
  return out


# ==========================================================================================================
# Aggregation and report.
# ==========================================================================================================
def _stats(values) -> dict:
  v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
  if not len(v):
    return {'mean': None, 'std': None, 'n': 0}
  return {'mean': float(v.mean()), 'std': float(v.std(ddof=1)) if len(v) > 1 else 0.0, 'n': int(len(v))}


def aggregate(rows: list[dict]) -> dict:
  """Across folds, per symbol and policy: mean/std of each metric, the compounded total return of the chained
  test blocks, and for PPO / supervised the share of folds that beat flat and buy-and-hold; supervised
  test accuracy and macro-F1 per task (mean/std)."""
  backtest = {}
  symbols = sorted({s for r in rows for s in r['backtest']})
  for sym in symbols:
    per = [r['backtest'][sym] for r in rows if sym in r['backtest']]
    policies = list(dict.fromkeys(p for m in per for p in m))
    out = {}
    for p in policies:
      runs = [m[p] for m in per if p in m]
      returns = [x['total_return'] for x in runs]
      out[p] = {k: _stats([x[k] for x in runs]) for k in METRICS}
      out[p]['compounded_return'] = float(np.prod([1.0 + x for x in returns]) - 1.0) if returns else None
      out[p]['folds'] = len(runs)
      for base in ('flat', 'buy_and_hold'):
        if p in ('ppo', 'supervised'):
          pairs = [(m[p]['total_return'], m[base]['total_return']) for m in per if p in m and base in m]
          out[p][f'beat_{base}'] = float(np.mean([a > b for a, b in pairs])) if pairs else None
          out[p]['compared_folds'] = len(pairs)
    backtest[sym] = out
  supervised = {}
  for t in TASKS:
    vals = [r['supervised'][t] for r in rows if t in r['supervised']]
    if vals:
      keys = ('accuracy', 'macro_f1', 'majority_baseline', 'momentum_accuracy', 'linear_accuracy',
              'margin_over_best', 'margin_over_majority', 'margin_over_momentum', 'margin_over_linear')
      supervised[t] = {k: _stats([v.get(k) for v in vals]) for k in keys if any(k in v for v in vals)}
      verdicts = [v['verdict'] for v in vals if v.get('verdict')]
      if verdicts:
        supervised[t]['folds_with_skill'] = sum(x.startswith('skill over') for x in verdicts)
        supervised[t]['folds_with_verdict'] = len(verdicts)
  return {'backtest': backtest, 'supervised': supervised}


def _flat_headline(agg: dict) -> dict:
  out = {}
  for sym, pols in agg['backtest'].items():
    for p, m in pols.items():
      out[f'{sym}.{p}.compounded_return'] = m['compounded_return']
      out[f'{sym}.{p}.mean_sharpe'] = m['sharpe']['mean']
  for t, m in agg['supervised'].items():
    out[f'supervised.{t}.mean_macro_f1'] = m['macro_f1']['mean']
  return out


def _pct(x, sign=True):
  return (f'{100 * x:+.2f}%' if sign else f'{100 * x:.2f}%') if isinstance(x, (int, float)) else 'n/a'


def _drawdown(x):
  """Drawdowns (stored as positive fractions) printed as losses."""
  if not isinstance(x, (int, float)):
    return 'n/a'
  return f'{-100 * x:.2f}%' if x > 0 else '0.00%'


def _num(x, fmt='.2f'):
  return format(x, fmt) if isinstance(x, (int, float)) else 'n/a'


def _ms(s, fn, std_fn=None):
  return f'{fn(s["mean"])} ± {(std_fn or fn)(s["std"])}' if s['mean'] is not None else 'n/a'


def _wins(m, base):
  frac, n = m.get(f'beat_{base}'), m.get('compared_folds', 0)
  return f'{round(frac * n)} of {n}' if frac is not None else ''


def cost_lines(rows: list[dict]) -> list[str]:
  """The cost model each fold's backtest applied, per symbol (or a note that none was recorded)."""
  from natron.backtest import cost_text  # pylint: disable=g-import-not-at-top
  symbols = sorted({s for r in rows for s in list(r.get('backtest', {})) + list(r.get('costs', {}))})
  if not symbols:
    return []
  lines = ['## Costs per fold', '', 'As each fold\'s backtest applied them (mean spread over its test block).', '',
           '| fold | symbol | commission (bps) | spread source | mean spread | mean spread (points) |',
           '|---|---|---|---|---|---|']
  for r in rows:
    for sym in symbols:
      c = r.get('costs', {}).get(sym)
      if c is None:
        if sym in r.get('backtest', {}):
          lines.append(f"| {r['fold']} | {sym} | {cost_text(None)} | | | |")
        continue
      lines.append(f"| {r['fold']} | {sym} | {c['commission_bps']} | {c['spread_source']} | "
                   f"{_num(c['mean_spread'], '.6g')} | {_num(c.get('mean_spread_points'), '.2f')} |")
  return lines + ['']


def baseline_lines(rows: list[dict], agg: dict) -> list[str]:
  """Per fold and task: accuracy beside momentum and linear, the margin over the best baseline with its 95%
  interval and the verdict; then the mean ± std of each margin over the folds."""
  if not any('margin_over_best' in r['supervised'].get(t, {}) for r in rows for t in TASKS):
    return []
  pts = lambda x: f'{100 * x:+.1f} pts' if isinstance(x, (int, float)) else 'n/a'
  spread = lambda x: f'{100 * x:.1f} pts' if isinstance(x, (int, float)) else 'n/a'
  lines = ['## Supervised test accuracy beside the baselines per fold', '',
           '| fold | task | accuracy | momentum | linear | majority | margin over best [95% CI] | verdict |',
           '|---|---|---|---|---|---|---|---|']
  for r in rows:
    for t in TASKS:
      m = r['supervised'].get(t)
      if not m or 'margin_over_best' not in m:
        continue
      ci = m['margin_ci']
      lines.append(f"| {r['fold']} | {t} | {_num(m['accuracy'], '.3f')} | {_num(m.get('momentum_accuracy'), '.3f')} | "
                   f"{_num(m.get('linear_accuracy'), '.3f')} | {_num(m.get('majority_accuracy'), '.3f')} | "
                   f"{pts(m['margin_over_best'])} [{pts(ci[0])}, {pts(ci[1])}] vs {m['best_baseline']} | "
                   f"{m['verdict']} |")
  lines += ['', '| task | margin over momentum (mean ± std) | margin over linear (mean ± std) | '
            'folds with skill over the best baseline |', '|---|---|---|---|']
  for t, m in agg['supervised'].items():
    if 'margin_over_best' not in m:
      continue
    lines.append(f"| {t} | {_ms(m.get('margin_over_momentum', {'mean': None}), pts, spread)} | "
                 f"{_ms(m.get('margin_over_linear', {'mean': None}), pts, spread)} | "
                 f"{m.get('folds_with_skill', 0)} of {m.get('folds_with_verdict', 0)} |")
  return lines + ['']


def report_markdown(summary: dict) -> str:
  """The walk-forward page: plan, per-fold tables, aggregates. Losses are printed as losses."""
  plan, rows, agg = summary['plan'], summary['folds'], summary['aggregate']
  s = plan['settings']
  lines = ['# Walk-forward evaluation', '',
           f"{len(plan['folds'])} {s['mode']} folds over {plan['bars']} bars; purge {s['purge']} bars between "
           f"train, validation and test; phases per fold: {', '.join(s['phases'])}. Test blocks are "
           'consecutive and disjoint; every fold is trained and tuned only on bars before its test block, '
           'and sees no bar after it. Returns are net of costs.', '']
  if summary.get('pretrained_encoder'):
    lines += [f"Encoder initialised from one self-supervised pretraining ({summary['pretrained_encoder']}); "
              'if that run\'s training split covers early test blocks, those folds saw their test bars '
              'unlabelled during pretraining: put `pretrain` in walkforward.phases for a strict evaluation.', '']
  lines += ['## Folds', '', 'Spans are [first bar, first bar after); validation windows start one purge after '
            'the validation split, test windows one purge after the test split.', '',
            '| fold | train | validation split | test |', '|---|---|---|---|']
  for f in plan['folds']:
    d, r = f['dates'], f['rows']
    lines.append(f"| {r['index']} | {d['train_start']} .. {d['val_start']} ({r['val_bound'] - r['train_start']} "
                 f"bars) | {d['val_start']} | {d['test_start']} .. {d['test_end'] or 'end'} "
                 f"({r['test_end'] - r['test_start']} bars) |")
  lines.append('')
  for sym, pols in agg['backtest'].items():
    lines += [f'## Backtest per fold: {sym}', '',
              '| fold | policy | total return | Sharpe | max drawdown | trades | total return 95% CI | PSR / DSR | '
              'verdict |', '|---|---|---|---|---|---|---|---|---|']
    for r in rows:
      for p, m in r['backtest'].get(sym, {}).items():
        ci = m.get('total_return_ci')
        lines.append(f"| {r['fold']} | {p} | {_pct(m['total_return'])} | {_num(m['sharpe'])} | "
                     f"{_drawdown(m['max_drawdown'])} | {m['num_trades']} | "
                     f"{f'[{_pct(ci[0])}, {_pct(ci[1])}]' if ci else 'n/a'} | "
                     f"{_num(m.get('psr'))} / {_num(m.get('dsr'))} | {m.get('verdict', '')} |")
    lines += ['', f'## Aggregate: {sym}', '',
              'Compounded return: the test blocks chained (one out-of-sample path). "Beats": folds whose test '
              'total return is higher.', '',
              '| policy | compounded return | return per fold (mean ± std) | Sharpe (mean ± std) | '
              'max drawdown (mean) | trades (mean) | beats flat | beats buy-and-hold |',
              '|---|---|---|---|---|---|---|---|']
    for p, m in pols.items():
      lines.append(f"| {p} | {_pct(m['compounded_return'])} | "
                   f"{_ms(m['total_return'], _pct, lambda x: _pct(x, sign=False))} | {_ms(m['sharpe'], _num)} | "
                   f"{_drawdown(m['max_drawdown']['mean'])} | {_num(m['num_trades']['mean'], '.1f')} | "
                   f"{_wins(m, 'flat')} | {_wins(m, 'buy_and_hold')} |")
    lines.append('')
    if 'ppo' not in pols:
      lines += ['_No PPO policy in these folds: add `rl` to walkforward.phases (before `backtest`)._', '']
  if not agg['backtest']:
    lines += ['_No backtest in the folds (add `backtest` to walkforward.phases)._', '']
  lines += cost_lines(rows)
  if agg['supervised']:
    lines += ['## Supervised test metrics per fold', '', '| fold | ' + ' | '.join(
        f'{t} acc / macro-F1 (majority)' for t in TASKS) + ' |', '|---|' + '---|' * len(TASKS)]
    for r in rows:
      cells = [f"{_num(r['supervised'][t]['accuracy'], '.3f')} / {_num(r['supervised'][t]['macro_f1'], '.3f')} "
               f"({_num(r['supervised'][t]['majority_baseline'], '.3f')})" if t in r['supervised'] else 'n/a'
               for t in TASKS]
      lines.append(f"| {r['fold']} | " + ' | '.join(cells) + ' |')
    lines.append('| mean ± std | ' + ' | '.join(
        f"{_ms(agg['supervised'][t]['accuracy'], lambda x: _num(x, '.3f'))} / "
        f"{_ms(agg['supervised'][t]['macro_f1'], lambda x: _num(x, '.3f'))}" if t in agg['supervised'] else 'n/a'
        for t in TASKS) + ' |')
    lines.append('')
    lines += baseline_lines(rows, agg)
  return '\n'.join(lines)
