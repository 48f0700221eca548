"""Fine-tuning end to end at a tiny size: report + bundle, exact resume, pretrain init, early stopping, inspect.

One module-scoped uninterrupted run is shared by several tests (the feature pipeline compiles once per
process and dominates the cost); every run uses ~3500 synthetic bars and a one-layer, d_model 16 model.
"""
import json
import os

import flax
import jax
import numpy as np
import pytest

from configs import finetune as finetune_config
from configs import inspect as inspect_config
from natron import checkpoint
from natron.model import NatronModel
from natron.model import NatronPretrain
from natron.train import finetune
from natron.train import inspect as inspect_phase

TASKS = ('buy', 'sell', 'direction', 'regime')
REQUIRED = ('accuracy', 'macro_f1', 'majority_baseline', 'precision', 'recall', 'confusion_matrix')
CLASSES = {'buy': 2, 'sell': 2, 'direction': 3, 'regime': 6}


FAST_COMPILE = True   # tests/conftest.py: skip most XLA optimisation in this module


def tiny_config(**finetune_overrides):
  config = finetune_config.get_config('quick')
  config.data.synthetic_bars = 3500
  config.dataset.window = 32
  config.model.update(d_model=16, num_heads=2, num_layers=1, d_ff=32, head_hidden=16)
  config.finetune.update(epochs=2, batch_size=64, eval_batch_size=256, log_every=10, model_init='',
                         patience=0)
  config.finetune.update(**finetune_overrides)
  config.baselines.linear_epochs = 2
  config.evaluation.bootstrap = 300
  config.inspect = inspect_config.section(quick=True)
  return config


def flat(tree):
  return flax.traverse_util.flatten_dict(tree, sep='/')


def read_report(workdir):
  with open(os.path.join(workdir, 'finetune', 'report.json')) as f:
    return json.load(f)


@pytest.fixture(scope='module')
def full_run(tmp_path_factory):
  """An uninterrupted 2-epoch run: (workdir, summary)."""
  workdir = str(tmp_path_factory.mktemp('full'))
  summary = finetune.run_phase(tiny_config(), workdir)
  return workdir, summary


def test_run_writes_report_with_every_required_key_and_a_loadable_bundle(full_run):
  workdir, summary = full_run
  report = read_report(workdir)
  for split in ('val', 'test'):
    for task in TASKS:
      m = report[split][task]
      for key in REQUIRED:
        assert key in m, (split, task, key)
      n = CLASSES[task]
      assert np.array(m['confusion_matrix']).shape == (n, n)
      assert len(m['precision']) == n and len(m['recall']) == n
      assert 0.0 <= m['accuracy'] <= 1.0 and 0.0 <= m['majority_baseline'] <= 1.0
      assert np.array(m['confusion_matrix']).sum() == m['n'] > 0
      assert m['accuracy'] == pytest.approx(np.trace(np.array(m['confusion_matrix'])) / m['n'])
  assert summary['test_regime_accuracy'] == report['test']['regime']['accuracy']
  assert report['run']['epochs_run'] == 2
  with open(os.path.join(workdir, 'finetune', 'report.md')) as f:
    assert 'majority baseline' in f.read()

  params, meta = checkpoint.load_bundle(os.path.join(workdir, 'finetune', 'bundle'))
  assert set(params) == {'encoder', 'heads'}
  for key in ('config', 'feature_names', 'feature_schema_hash', 'scaler', 'window', 'warmup',
              'required_candles', 'label_classes', 'thresholds', 'model_version', 'metrics'):
    assert key in meta, key
  assert meta['required_candles'] == meta['window'] + meta['warmup'] and meta['window'] == 32
  assert meta['label_classes']['regime'][0] == 'BULL_STRONG' and meta['thresholds']['signal'] == 0.6
  checkpoint.check_feature_schema(meta)
  # The bundle holds the best epoch's parameters: the model reproduces the reported test accuracy.
  assert meta['metrics']['test_buy_accuracy'] == report['test']['buy']['accuracy']
  # metrics.jsonl has training log lines with rate/ETA and one validation record per epoch.
  with open(os.path.join(workdir, 'finetune', 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  assert any('samples_per_sec' in r and 'eta_sec' in r for r in records)
  assert sum('val/mean_macro_f1' in r for r in records) == 2


def test_report_fills_the_baseline_and_interval_contract(full_run):
  """finetune/report.json: per split and task accuracy(+ci), macro_f1(+ci), baselines majority/momentum/linear,
  margin_over_best_baseline {value, ci, baseline} and a verdict consistent with that interval."""
  workdir, summary = full_run
  report = read_report(workdir)
  for split in ('val', 'test'):
    for task in TASKS:
      m = report[split][task]
      for key in ('accuracy', 'accuracy_ci', 'macro_f1', 'macro_f1_ci', 'baselines', 'margin_over_best_baseline',
                  'verdict'):
        assert key in m, (split, task, key)
      for key in ('accuracy_ci', 'macro_f1_ci'):
        lo, hi = m[key]
        assert 0.0 <= lo <= hi <= 1.0
      for name in ('majority', 'momentum', 'linear'):
        assert 0.0 <= m['baselines'][name]['accuracy'] <= 1.0
        assert 0.0 <= m['baselines'][name]['macro_f1'] <= 1.0
      # The majority baseline is the one the report always had.
      assert m['baselines']['majority']['accuracy'] == pytest.approx(m['majority_baseline'], abs=1e-12)
      best = m['margin_over_best_baseline']
      assert best['baseline'] in m['baselines']
      assert best['baseline'] == max(m['baselines'], key=lambda n: m['baselines'][n]['accuracy'])
      # Differences of float64 ratios of the same integer counts: a few ulps.
      assert best['value'] == pytest.approx(m['accuracy'] - m['baselines'][best['baseline']]['accuracy'], abs=1e-12)
      lo, hi = best['ci']
      assert lo <= hi
      assert m['verdict'].startswith('skill over' if lo > 0 else 'no evidence of skill over')
      assert best['baseline'] in m['verdict']
  assert os.path.exists(os.path.join(workdir, 'finetune', 'baselines', 'linear.npz'))
  with open(os.path.join(workdir, 'finetune', 'report.md')) as f:
    text = f.read()
  assert 'margin over best' in text and 'momentum' in text and 'linear' in text and '95%' in text
  assert 'test_direction_margin_over_best' in summary


def test_interrupted_run_resumes_to_the_same_final_metrics(full_run, tmp_path, monkeypatch):
  """Killed in the middle of epoch 2, then resumed: same report, same parameters as never interrupted."""
  workdir_full, _ = full_run
  workdir = str(tmp_path)
  real_build = finetune.dataset_lib.build_dataset

  class Interrupted(Exception):
    pass

  def build_dying_dataset(frame, config):
    """The dataset of the run, whose training batches stop (as if the process were killed) in epoch 2."""
    ds = real_build(frame, config)
    real_batches, served = ds.batches, {'n': 0}

    def batches(split, *args, **kwargs):
      for batch in real_batches(split, *args, **kwargs):
        if split == 'train':
          served['n'] += 1
          if served['n'] == 30:      # epoch 1 has 23 steps
            raise Interrupted()
        yield batch
    ds.batches = batches
    return ds

  monkeypatch.setattr(finetune.dataset_lib, 'build_dataset', build_dying_dataset)
  with pytest.raises(Interrupted):
    finetune.run_phase(tiny_config(), workdir)
  assert not os.path.exists(os.path.join(workdir, 'finetune', 'report.json'))
  monkeypatch.setattr(finetune.dataset_lib, 'build_dataset', real_build)

  resumed = finetune.run_phase(tiny_config(), workdir)
  full, again = read_report(workdir_full), read_report(workdir)
  for split in ('val', 'test'):
    for task in TASKS:
      for key in ('accuracy', 'macro_f1', 'majority_baseline'):
        assert again[split][task][key] == pytest.approx(full[split][task][key], abs=1e-6)
      assert again[split][task]['confusion_matrix'] == full[split][task]['confusion_matrix']
    assert again[split]['loss'] == pytest.approx(full[split]['loss'], abs=1e-6)
  assert [h['score'] for h in again['run']['history']] == pytest.approx(
      [h['score'] for h in full['run']['history']], abs=1e-6)
  a, _ = checkpoint.load_bundle(os.path.join(workdir_full, 'finetune', 'bundle'))
  b, _ = checkpoint.load_bundle(os.path.join(workdir, 'finetune', 'bundle'))
  for key, value in flat(a).items():
    np.testing.assert_allclose(flat(b)[key], value, atol=1e-6, err_msg=key)
  assert resumed['test_mean_macro_f1'] == pytest.approx(full['test']['mean_macro_f1'], abs=1e-6)


def random_params(model, num_features, seed):
  """A parameter tree of `model`'s structure filled with seeded noise (eval_shape: nothing is compiled)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((2, 32, num_features), np.float32),
                                             train=False)['params'])
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)


def test_merge_params_loads_the_encoder_and_keeps_dont_load_heads_fresh():
  model = NatronModel(tiny_config().model)
  fresh, other = random_params(model, 5, 0), random_params(model, 5, 1)
  merged, info = finetune.merge_params(fresh, other, ('^heads/',))
  for key, value in flat(merged).items():
    expected = flat(fresh)[key] if key.startswith('heads/') else flat(other)[key]
    np.testing.assert_array_equal(value, expected, err_msg=key)
  assert all(k.startswith('heads/') for k in info['fresh']) and info['loaded']
  assert len(info['fresh']) + len(info['loaded']) == len(flat(fresh))
  # Missing or mis-shaped parameters are an error, never a silent re-initialisation.
  with pytest.raises(ValueError, match='shape'):
    finetune.merge_params(fresh, random_params(model, 7, 1), ('^heads/',))
  with pytest.raises(ValueError, match='missing'):
    finetune.merge_params(fresh, {'heads': other['heads']}, ())


@pytest.fixture(scope='module')
def pretrained_run(tmp_path_factory, full_run):
  """A run initialised from a saved pretrain checkpoint with lr 0 (parameters never move), patience 1."""
  workdir = str(tmp_path_factory.mktemp('from_pretrain'))
  config = tiny_config(model_init='auto', lr=0.0, epochs=5, patience=1, early_stopping_metric='loss')
  _, meta = checkpoint.load_bundle(os.path.join(full_run[0], 'finetune', 'bundle'))
  x = np.zeros((2, config.dataset.window, len(meta['feature_names'])), np.float32)
  pretrain_params = NatronPretrain(config.model).init(jax.random.key(123), x, None, train=False)['params']
  manager = checkpoint.make_manager(os.path.join(workdir, 'pretrain', 'checkpoints'))
  checkpoint.save(manager, 7, {'step': np.int32(7), 'params': pretrain_params}, {'phase': 'pretrain'})
  manager.close()
  summary = finetune.run_phase(config, workdir)
  return workdir, config, x, jax.device_get(pretrain_params), summary


def test_model_init_loads_the_pretrained_encoder_and_reinitialises_heads(pretrained_run):
  workdir, config, x, pretrain_params, _ = pretrained_run
  params, _ = checkpoint.load_bundle(os.path.join(workdir, 'finetune', 'bundle'))
  for key, value in flat(params['encoder']).items():
    np.testing.assert_array_equal(value, flat(pretrain_params['encoder'])[key], err_msg=key)
  # Heads: exactly the fresh initialisation of this seed (nothing to take from the pretrain checkpoint).
  init_rng, _ = finetune.init_rngs(config.seed)
  fresh = NatronModel(config.model).init(init_rng, x, train=False)['params']
  for key, value in flat(params['heads']).items():
    np.testing.assert_allclose(value, flat(fresh['heads'])[key], rtol=1e-6, err_msg=key)
  report = read_report(workdir)
  assert report['run']['init']['source'].endswith('pretrain')
  assert report['run']['init']['fresh'] and all(p.startswith('heads/') for p in report['run']['init']['fresh'])


def test_early_stopping_stops_after_patience_epochs_without_improvement(pretrained_run):
  workdir, *_ = pretrained_run
  run = read_report(workdir)['run']
  # lr 0: the validation loss is identical every epoch, so epoch 2 is the first without improvement.
  assert run['stopped_early'] and run['epochs_run'] == 2 and run['epochs'] == 5
  assert run['best_epoch'] == 1
  scores = [h['score'] for h in run['history']]
  assert len(scores) == 2 and scores[0] == scores[1]


def test_inspect_writes_attention_and_confusion_pngs(full_run):
  workdir, _ = full_run
  summary = inspect_phase.run_phase(tiny_config(), workdir)
  out = os.path.join(workdir, 'inspect')
  pngs = sorted(f for f in os.listdir(out) if f.endswith('.png'))
  assert {f'confusion_{t}.png' for t in TASKS} <= set(pngs)
  # quick: 2 windows x 1 layer x (head-averaged + per-head).
  assert {'attention_w0_layer0_mean.png', 'attention_w0_layer0_heads.png',
          'attention_w1_layer0_mean.png', 'attention_w1_layer0_heads.png'} <= set(pngs)
  assert summary['pngs'] == len(pngs) == 8
  for name in pngs:
    with open(os.path.join(out, name), 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  with open(os.path.join(out, 'index.json')) as f:
    index = json.load(f)
  report = read_report(workdir)
  assert index['test']['regime']['accuracy'] == pytest.approx(report['test']['regime']['accuracy'])


def test_early_stopping_bookkeeping_modes_min_delta_and_round_trip():
  stop = finetune.EarlyStopping('max', patience=2, min_delta=0.01)
  assert stop.update(0, 0.50)                   # first value is always the best
  assert not stop.update(1, 0.505)              # not more than min_delta better
  assert not stop.should_stop
  resumed = finetune.EarlyStopping('max', 2, 0.01, stop.state())   # as restored from checkpoint meta
  assert not resumed.update(2, 0.40) and resumed.should_stop and resumed.best_epoch == 0
  low = finetune.EarlyStopping(finetune.metric_mode('loss'), patience=0)
  assert low.update(0, 2.0) and low.update(1, 1.5) and not low.update(2, 1.7)
  assert low.best == 1.5 and not low.should_stop              # patience 0 never stops
  assert finetune.metric_mode('mean_macro_f1') == 'max' and finetune.metric_mode('loss') == 'min'


def test_tempered_class_weights_interpolate_between_unweighted_and_balanced():
  weights = {'buy': [0.5, 1.5], 'regime': [2.0, 0.0, 1.0]}    # regime class 1 absent from training
  full = finetune.tempered_class_weights(weights, 1.0)
  np.testing.assert_allclose(full['buy'], [0.5, 1.5])
  np.testing.assert_allclose(finetune.tempered_class_weights(weights, 0.0)['buy'], [1.0, 1.0])
  half = finetune.tempered_class_weights(weights, 0.5)['regime']
  assert half[1] == 0.0 and half[[0, 2]].mean() == pytest.approx(1.0)
  assert half[0] / half[2] == pytest.approx(np.sqrt(2.0))
  assert finetune.epoch_seed(0, 1) != finetune.epoch_seed(0, 2) != finetune.epoch_seed(1, 1)
  assert finetune.epoch_seed(3, 4) == finetune.epoch_seed(3, 4)
