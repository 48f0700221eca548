"""Walk-forward: the fold plan's invariants (pure), the aggregation, and one tiny end-to-end run with resume."""
import json
import os

import jax
import numpy as np
import pandas as pd
import pytest

from configs import walkforward as walkforward_config
from natron import data as data_lib
from natron import dataset as dataset_lib
from natron import walkforward as wf
from natron.errors import UserError


# ==========================================================================================================
# Fold plan.
# ==========================================================================================================
@pytest.mark.parametrize('mode', ['expanding', 'rolling'])
def test_folds_are_ordered_disjoint_and_tested_after_train_plus_purge(mode):
  purge, n = 80, 10_000
  folds = wf.plan_folds(n, folds=4, purge=purge, mode=mode, test_bars=500, val_bars=300)
  assert [f.index for f in folds] == [0, 1, 2, 3]
  assert folds[-1].test_end == n
  for f in folds:
    assert f.test_end - f.test_start == 500
    assert f.test_start - f.test_bound == purge              # the dataset's own purge lands on the block start
    assert f.test_bound - f.val_bound == purge + 300         # val windows [val_bound + purge, test_bound)
    assert f.val_bound > f.train_start                       # training rows < val_bound < test rows
  for a, b in zip(folds, folds[1:]):
    assert a.test_end == b.test_start                        # consecutive, no overlap, no hole
    assert b.val_bound == a.val_bound + 500


def test_expanding_keeps_the_first_bar_and_rolling_keeps_a_fixed_length_window():
  kw = dict(folds=3, purge=50, test_bars=400, val_bars=200)
  expanding = wf.plan_folds(6000, mode='expanding', **kw)
  rolling = wf.plan_folds(6000, mode='rolling', **kw)
  assert [f.train_start for f in expanding] == [0, 0, 0]
  lengths = [f.val_bound - f.train_start for f in rolling]
  assert lengths == [lengths[0]] * 3 and lengths[0] == expanding[0].val_bound
  assert [f.train_start for f in rolling] == [0, 400, 800]
  fixed = wf.plan_folds(6000, mode='rolling', train_bars=1500, **kw)
  assert [f.val_bound - f.train_start for f in fixed] == [1500] * 3
  # Same test blocks whatever the training window.
  assert [(f.test_start, f.test_end) for f in rolling] == [(f.test_start, f.test_end) for f in expanding]


def test_test_frac_splits_the_tail_into_equal_blocks_and_val_defaults_to_one_block():
  folds = wf.plan_folds(10_000, folds=3, purge=20, test_frac=0.3)
  assert [f.test_end - f.test_start for f in folds] == [1000] * 3
  assert folds[0].test_start == 7000
  assert all(f.test_bound - f.val_bound - 20 == 1000 for f in folds)


def test_too_short_data_raises_and_says_exactly_how_many_bars_are_needed():
  kw = dict(folds=3, purge=100, test_bars=300, val_bars=200, min_train_bars=1500)
  with pytest.raises(UserError, match=r'needs about (\d+) bars') as info:
    wf.plan_folds(2000, **kw)
  need = int(info.value.args[0].split('needs about ')[1].split()[0])
  assert need == 1500 + 100 + 200 + 100 + 3 * 300
  assert len(wf.plan_folds(need, **kw)) == 3
  with pytest.raises(UserError):
    wf.plan_folds(need - 1, **kw)


@pytest.mark.parametrize('bad', [dict(mode='sliding'), dict(folds=0), dict(test_frac=1.5, test_bars=0)])
def test_bad_settings_are_user_errors(bad):
  kw = dict(folds=2, purge=10, mode='expanding', test_bars=100)
  kw.update(bad)
  with pytest.raises(UserError):
    wf.plan_folds(5000, **kw)


def _bars(symbol, times):
  close = 1.0 + 0.001 * np.arange(len(times))
  return pd.DataFrame({'time': times, 'open': close, 'high': close, 'low': close, 'close': close,
                       'volume': 1.0, 'symbol': symbol})


def test_uneven_calendars_still_purge_and_never_overlap_for_every_symbol():
  full = pd.date_range('2024-01-01', periods=3000, freq='15min', tz='UTC')
  rng = np.random.default_rng(0)
  sparse = full[200:][np.sort(rng.choice(2800, 2200, replace=False))]   # later start, random holes
  frame = pd.concat([_bars('A', full), _bars('B', sparse)], ignore_index=True)
  timeline = wf.common_timeline(frame)
  assert timeline[0] == sparse[0].tz_localize(None).to_datetime64() and len(timeline) <= 2800
  purge = 40
  folds = wf.plan_folds(len(timeline), folds=3, purge=purge, test_bars=200, val_bars=100)
  dates = [wf.fold_dates(timeline, f) for f in folds]
  spans = [wf.symbol_spans(wf.fold_frame(frame, d), d, purge) for d in dates]
  wf.verify_spans(spans, purge)
  for k, s in enumerate(spans):
    for sym in ('A', 'B'):
      assert s[sym]['bars_between'] >= 2 * purge
      assert s[sym]['train_last'] < s[sym]['test_first']
      if k:
        assert spans[k - 1][sym]['test_last'] < s[sym]['test_first']
  assert dates[-1]['test_end'] is None
  cut = wf.fold_frame(frame, dates[0])
  assert cut['time'].max() < pd.Timestamp(dates[0]['test_end'], tz='UTC')   # nothing after the test block
  # An overlap (a fabricated plan) is caught.
  bad = [spans[0], {sym: {**v, 'test_first': spans[0][sym]['test_last']} for sym, v in spans[1].items()}]
  with pytest.raises(UserError, match='overlap'):
    wf.verify_spans(bad, purge)


def test_aggregate_compounds_returns_and_counts_wins():
  def fold(ppo, sup, bh):
    m = lambda r: {'total_return': r, 'sharpe': 10 * r, 'max_drawdown': 0.01, 'num_trades': 3}
    return {'backtest': {'X': {'ppo': m(ppo), 'supervised': m(sup), 'buy_and_hold': m(bh), 'flat': m(0.0)}},
            'supervised': {'buy': {'accuracy': 0.6, 'macro_f1': 0.5, 'majority_baseline': 0.5}}}
  rows = [{'fold': k, **fold(*r)} for k, r in enumerate([(0.10, -0.02, 0.05), (-0.05, 0.01, -0.10),
                                                         (0.20, 0.03, 0.30)])]
  agg = wf.aggregate(rows)
  ppo = agg['backtest']['X']['ppo']
  assert ppo['compounded_return'] == pytest.approx(1.10 * 0.95 * 1.20 - 1)
  assert ppo['total_return']['mean'] == pytest.approx(0.25 / 3)
  assert ppo['total_return']['std'] == pytest.approx(np.std([0.10, -0.05, 0.20], ddof=1))
  assert ppo['beat_flat'] == pytest.approx(2 / 3) and ppo['beat_buy_and_hold'] == pytest.approx(2 / 3)
  assert agg['backtest']['X']['supervised']['beat_buy_and_hold'] == pytest.approx(1 / 3)
  assert 'beat_flat' not in agg['backtest']['X']['buy_and_hold']
  assert agg['supervised']['buy']['accuracy']['mean'] == pytest.approx(0.6)
  text = wf.report_markdown({'plan': {'settings': {'mode': 'expanding', 'purge': 1, 'phases': ['backtest']},
                                      'bars': 10, 'folds': []}, 'folds': rows, 'aggregate': agg})
  assert '-5.00%' in text and f'{100 * (1.10 * 0.95 * 1.20 - 1):+.2f}%' in text   # losses shown as losses
  assert '| ppo | +25.40% |' in text and '| 2 of 3 | 2 of 3 |' in text
  assert 'No PPO policy' not in text and '-1.00%' in text                            # drawdown is a loss


def test_report_shows_baselines_intervals_and_verdicts_per_fold():
  def task(acc, margin, lo, hi):
    verdict = ('skill over momentum' if lo > 0 else 'no evidence of skill over momentum') + ': accuracy ...'
    return {'accuracy': acc, 'macro_f1': 0.5, 'majority_baseline': 0.4, 'majority_accuracy': 0.4,
            'momentum_accuracy': acc - margin, 'linear_accuracy': acc - margin - 0.01, 'accuracy_ci': [0.5, 0.7],
            'margin_over_best': margin, 'margin_ci': [lo, hi], 'best_baseline': 'momentum', 'verdict': verdict,
            'margin_over_momentum': margin, 'margin_over_linear': margin + 0.01, 'margin_over_majority': acc - 0.4}
  bt = {'ppo': {'total_return': 0.02, 'sharpe': 1.0, 'max_drawdown': 0.01, 'num_trades': 4,
                'total_return_ci': [-0.01, 0.05], 'psr': 0.8, 'dsr': 0.7, 'verdict': 'no evidence of skill over flat'}}
  rows = [{'fold': 0, 'backtest': {'X': bt}, 'supervised': {'direction': task(0.62, 0.02, 0.005, 0.04)}},
          {'fold': 1, 'backtest': {'X': bt}, 'supervised': {'direction': task(0.58, -0.01, -0.03, 0.01)}}]
  agg = wf.aggregate(rows)
  d = agg['supervised']['direction']
  assert d['margin_over_momentum']['mean'] == pytest.approx(0.005)
  assert d['margin_over_momentum']['std'] == pytest.approx(np.std([0.02, -0.01], ddof=1))
  assert d['folds_with_skill'] == 1 and d['folds_with_verdict'] == 2
  text = wf.report_markdown({'plan': {'settings': {'mode': 'expanding', 'purge': 1, 'phases': ['backtest']},
                                      'bars': 10, 'folds': []}, 'folds': rows, 'aggregate': agg})
  assert '| 0 | direction | 0.620 | 0.600 | 0.590 | 0.400 | +2.0 pts [+0.5 pts, +4.0 pts] vs momentum |' in text
  assert '| direction | +0.5 pts ± 2.1 pts | +1.5 pts ± 2.1 pts | 1 of 2 |' in text
  assert '[-1.00%, +5.00%] | 0.80 / 0.70 | no evidence of skill over flat |' in text


def test_report_states_each_folds_cost_model():
  cost = {'symbol': 'X', 'commission_bps': 1.0, 'commission_source': 'backtest.cost_bps',
          'spread_source': 'config backtest.spread: 1.2 points x point 1e-05', 'mean_spread': 1.2e-5,
          'mean_spread_points': 1.2, 'point': 1e-5, 'bars': 100}
  metrics = {'flat': {'total_return': 0.0, 'sharpe': 0.0, 'max_drawdown': 0.0, 'num_trades': 0}}
  rows = [{'fold': 0, 'backtest': {'X': metrics}, 'supervised': {}, 'costs': {'X': cost}},
          {'fold': 1, 'backtest': {'X': metrics}, 'supervised': {}}]   # a fold from before costs were recorded
  text = wf.report_markdown({'plan': {'settings': {'mode': 'expanding', 'purge': 1, 'phases': ['backtest']},
                                      'bars': 10, 'folds': []}, 'folds': rows, 'aggregate': wf.aggregate(rows)})
  assert '## Costs per fold' in text
  assert '| 0 | X | 1.0 | config backtest.spread: 1.2 points x point 1e-05 | 1.2e-05 | 1.20 |' in text
  assert '| 1 | X | cost model not recorded' in text


def test_a_market_without_spread_stops_before_any_fold_runs(tmp_path, monkeypatch):
  times = pd.date_range('2024-01-01', periods=3000, freq='15min', tz='UTC')
  frame = pd.concat([_bars('A', times)], ignore_index=True)   # no spread column, no backtest.spread
  monkeypatch.setattr(data_lib, 'load_market', lambda data_config: frame)
  monkeypatch.setattr(wf, '_run_phases', lambda *a: pytest.fail('a fold ran without a cost model'))
  config = walkforward_config.get_config('quick')
  with pytest.raises(UserError, match='never falls back to commission only'):
    wf.run_phase(config, str(tmp_path))
  assert not os.path.exists(tmp_path / 'walkforward' / 'fold_0')
  # Naming a spread is enough to get past the cost check: the folds start, and the plan records the costs.
  config.backtest.spread = '0.0002'

  class Reached(Exception):
    pass

  def reached(*args):
    raise Reached('folds reached')

  monkeypatch.setattr(wf, '_run_phases', reached)
  with pytest.raises(Reached):
    wf.run_phase(config, str(tmp_path))
  plan = json.loads(_read(str(tmp_path), 'plan.json'))
  assert plan['costs']['A']['spread_source'] == 'config backtest.spread: 0.0002 (price units)'
  # The mean of 3000 equal float64 values: pairwise summation is off by a few ulps at most.
  assert plan['costs']['A']['mean_spread'] == pytest.approx(0.0002, rel=1e-13)


def test_config_quick_variant_and_sections():
  config = walkforward_config.get_config('quick')
  assert config.phase == 'walkforward' and config.walkforward.folds == 3
  assert config.walkforward.mode == 'expanding' and tuple(config.walkforward.phases) == ('finetune', 'rl',
                                                                                         'backtest')
  assert config.model.d_model == 64 and config.finetune.epochs == 2
  assert config.rl.total_timesteps < walkforward_config.get_config().rl.total_timesteps


def test_folds_reuse_the_parent_pretrained_encoder_by_absolute_path(tmp_path):
  config = walkforward_config.get_config('quick')
  dates = {'val_start': '2020-01-02T00:00:00', 'test_split': '2020-01-03T00:00:00'}
  workdir = str(tmp_path / 'run')
  cfg = wf.fold_config(config, workdir, ['/x/A.parquet', '/x/B.parquet'], dates, ('finetune', 'backtest'))
  assert cfg.finetune.model_init == ''                     # no workdir/pretrain: scratch, not the fold's 'auto'
  assert cfg.data.path == '/x/A.parquet,/x/B.parquet'
  assert tuple(cfg.dataset.split_dates) == (dates['val_start'], dates['test_split'])
  assert config.finetune.model_init == 'auto' and config.data.path == ''   # the parent config is untouched
  os.makedirs(tmp_path / 'run' / 'pretrain' / 'checkpoints')
  cfg = wf.fold_config(config, workdir, ['/x/A.parquet'], dates, ('finetune', 'rl', 'backtest'))
  assert cfg.finetune.model_init == os.path.abspath(os.path.join(workdir, 'pretrain'))
  cfg = wf.fold_config(config, workdir, ['/x/A.parquet'], dates, ('pretrain', 'finetune'))
  assert cfg.finetune.model_init == 'auto'                 # each fold pretrains its own encoder
  with pytest.raises(UserError, match='walkforward section'):
    wf.run_phase(walkforward_config.base.get_base_config(), workdir)


# ==========================================================================================================
# End to end: 2 rolling folds of finetune + backtest on a tiny synthetic market, then a resume.
# ==========================================================================================================
FAST_COMPILE = True   # tests/conftest.py: skip most XLA optimisation in this module


def tiny_config():
  config = walkforward_config.get_config('quick')
  # Rolling: every fold's data has the same length (3800 - 300 = 3500 bars, as in test_finetune.py, whose
  # window and tiny model it shares), so the feature graph compiles once, or not at all with a warm cache.
  config.data.synthetic_bars = 3800
  config.dataset.window = 32
  config.model.update(d_model=16, num_heads=2, num_layers=1, d_ff=32, head_hidden=16)
  config.finetune.update(epochs=1, batch_size=64, eval_batch_size=256, log_every=100, patience=0)
  config.walkforward.update(folds=2, mode='rolling', test_bars=300, val_bars=300,
                            phases=('finetune', 'backtest'))
  return config


@pytest.fixture(scope='module')
def wf_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('wf'))
  config = tiny_config()
  return config, workdir, wf.run_phase(config, workdir)


def _read(workdir, *parts):
  with open(os.path.join(workdir, 'walkforward', *parts)) as f:
    return f.read()


def test_end_to_end_writes_per_fold_and_aggregate_metrics(wf_run):
  config, workdir, result = wf_run
  summary = json.loads(_read(workdir, 'summary.json'))
  assert result['folds'] == 2 and len(summary['folds']) == 2
  for row in summary['folds']:
    policies = row['backtest']['SYNTH']
    assert {'supervised', 'buy_and_hold', 'flat', 'random'} <= set(policies)
    assert policies['flat']['total_return'] == 0.0 and policies['flat']['num_trades'] == 0
    assert set(row['supervised']) == set(wf.TASKS)
    assert all(0.0 <= row['supervised'][t]['accuracy'] <= 1.0 for t in wf.TASKS)
  agg = summary['aggregate']['backtest']['SYNTH']
  returns = [r['backtest']['SYNTH']['buy_and_hold']['total_return'] for r in summary['folds']]
  assert agg['buy_and_hold']['compounded_return'] == pytest.approx(np.prod(1 + np.array(returns)) - 1)
  assert 0.0 <= agg['supervised']['beat_flat'] <= 1.0
  assert result['SYNTH.buy_and_hold.compounded_return'] == pytest.approx(agg['buy_and_hold']['compounded_return'])
  report = _read(workdir, 'report.md')
  assert '## Aggregate: SYNTH' in report and '| 1 | supervised |' in report
  # The cost model each fold's backtest applied: commission, the data's spread, its mean.
  assert '## Costs per fold' in report and summary['plan']['costs']['SYNTH']['spread_source'].startswith('data')
  for row in summary['folds']:
    cost = row['costs']['SYNTH']
    assert cost['commission_bps'] == config.backtest.cost_bps and cost['mean_spread'] > 0
    assert cost['spread_source'].startswith('data') and cost['bars'] == 300   # the test block
    assert f"| {row['fold']} | SYNTH | {cost['commission_bps']} | {cost['spread_source']} |" in report
  assert summary['pretrained_encoder'] is None   # no workdir/pretrain: each fold fine-tunes from scratch
  with open(os.path.join(workdir, 'walkforward', 'fold_0', 'config.json')) as f:
    assert json.load(f)['finetune']['model_init'] == ''


def test_each_fold_trains_before_and_tests_inside_its_own_block(wf_run):
  config, workdir, _ = wf_run
  plan = json.loads(_read(workdir, 'plan.json'))
  purge = dataset_lib.purge_of(config)
  firsts = []
  for f in plan['folds']:
    d, rows = f['dates'], f['rows']
    fold_dir = os.path.join(workdir, 'walkforward', f'fold_{rows["index"]}')
    with open(os.path.join(fold_dir, 'config.json')) as fh:
      fold_cfg = json.load(fh)
    assert tuple(fold_cfg['dataset']['split_dates']) == (d['val_start'], d['test_split'])
    # The fold's own data: nothing after its test block, and the dataset the phases built from it.
    cfg = config.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.data.path = fold_cfg['data']['path']
      cfg.dataset.split_dates = (d['val_start'], d['test_split'])
    frame = data_lib.load_market(cfg.data)
    if d['test_end'] is not None:
      assert frame['time'].max() < pd.Timestamp(d['test_end'], tz='UTC')
    ds = dataset_lib.build_dataset(frame, cfg)
    t = pd.DatetimeIndex(ds.time)
    train, test = ds.ends['train'], ds.ends['test']
    assert t[test].min() == pd.Timestamp(d['test_start'])    # the block starts as planned (UTC, naive)
    assert len(test) == rows['test_end'] - rows['test_start']
    assert test.min() - train.max() > 2 * purge                        # train | purge | val | purge | test
    firsts.append((t[test].min(), t[test].max()))
  assert firsts[0][1] < firsts[1][0]


def test_one_fold_per_invocation_then_a_gather_reproduce_the_whole_run(wf_run, tmp_path):
  """A cluster array (launch.py --fold=k, one task per fold) and a gather (--gather) build the tables of one
  process running every fold; the gather refuses missing folds, folds from another config and a bad index."""
  config, whole_dir, result = wf_run
  whole = json.loads(_read(whole_dir, 'summary.json'))
  workdir = str(tmp_path)

  def task(**keys):
    cfg = config.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.walkforward.update(**keys)
    return cfg

  assert wf.run_phase(task(fold=1), workdir) == {'fold': 1, 'folds': 2}   # the second task runs first
  assert sorted(os.listdir(os.path.join(workdir, 'walkforward'))) == ['fold_1', 'plan.json']
  with pytest.raises(UserError, match=r'fold_0 not run .*--fold=k'):
    wf.run_phase(task(gather=True), workdir)
  with pytest.raises(UserError, match='outside the plan'):
    wf.run_phase(task(fold=2), workdir)
  wf.run_phase(task(fold=0), workdir)
  changed = task(gather=True)
  changed.backtest.cost_bps = 3.0
  with pytest.raises(UserError, match='fold_0 ran with another config.*fold_1 ran with another config'):
    wf.run_phase(changed, workdir)
  assert not os.path.exists(os.path.join(workdir, 'walkforward', 'summary.json'))
  assert wf.run_phase(task(gather=True), workdir) == result
  gathered = json.loads(_read(workdir, 'summary.json'))
  assert gathered['folds'] == whole['folds'] and gathered['aggregate'] == whole['aggregate']
  assert _read(workdir, 'report.md') == _read(whole_dir, 'report.md')


def test_rerun_skips_finished_folds_and_reports_the_same(wf_run, monkeypatch):
  config, workdir, result = wf_run
  before = json.loads(_read(workdir, 'summary.json'))

  def must_not_run(*args, **kwargs):
    raise AssertionError('a finished fold was run again')

  monkeypatch.setattr(wf, '_run_phases', must_not_run)
  again = wf.run_phase(config, workdir)
  assert again == result
  assert json.loads(_read(workdir, 'summary.json')) == before
  # A changed setting invalidates the finished folds: their phases run again under the new config.
  ran = []
  monkeypatch.setattr(wf, '_run_phases', lambda cfg, fold_dir, phases: ran.append(cfg.backtest.cost_bps) or {})
  changed = config.copy_and_resolve_references()
  changed.backtest.cost_bps = 3.0
  wf.run_phase(changed, workdir)
  assert ran == [3.0, 3.0]
