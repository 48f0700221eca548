"""natron.seeds: N draws of the same phases, each figure's mean and spread, the baselines' margins per seed."""
import json
import os

import numpy as np
import pytest

from configs import seeds as seeds_config
from natron import seeds
from natron.errors import UserError

FAST_COMPILE = True   # tests/conftest.py: skip most XLA optimisation in this module


def tiny_config(n=2):
  config = seeds_config.get_config('quick')
  config.seeds.update(n=n, phases=('finetune',))
  config.data.synthetic_bars = 3500
  config.dataset.window = 32
  config.model.update(d_model=16, num_heads=2, num_layers=1, d_ff=32, head_hidden=16)
  config.finetune.update(epochs=1, batch_size=64, eval_batch_size=256, log_every=10, patience=0, rl_holdout=0.0)
  config.baselines.linear_epochs = 1
  config.evaluation.bootstrap = 200
  return config


def test_two_seeds_report_mean_spread_and_margins_per_seed(tmp_path):
  config = tiny_config()
  out = seeds.run_phase(config, str(tmp_path))
  assert out['seeds'] == 2
  with open(tmp_path / 'seeds' / 'summary.json') as f:
    summary = json.load(f)
  rows = summary['seeds']
  assert [r['synthetic_seed'] for r in rows] == [0, 1] and [r['seed'] for r in rows] == [0, 1]
  d = summary['aggregate']['supervised']['direction']
  accs = [r['supervised']['direction']['accuracy'] for r in rows]
  assert d['accuracy']['mean'] == pytest.approx(np.mean(accs)) and d['accuracy']['n'] == 2
  assert d['accuracy']['std'] == pytest.approx(np.std(accs, ddof=1))
  for key in ('momentum_accuracy', 'linear_accuracy', 'margin_over_momentum', 'margin_over_linear'):
    assert d[key]['n'] == 2
  text = (tmp_path / 'seeds' / 'report.md').read_text()
  assert '| direction |' in text and '±' in text and 'margin over momentum' in text
  # A rerun with the same config reuses both seeds.
  mtimes = [os.path.getmtime(tmp_path / 'seeds' / f'seed_{k}' / 'summary.json') for k in range(2)]
  seeds.run_phase(config, str(tmp_path))
  assert mtimes == [os.path.getmtime(tmp_path / 'seeds' / f'seed_{k}' / 'summary.json') for k in range(2)]


def test_varying_the_market_needs_the_synthetic_market():
  config = tiny_config()
  config.data.path = 'bars.csv'
  with pytest.raises(UserError, match='vary_data'):
    seeds.seed_config(config, 1)
  config.seeds.vary_data = False
  assert seeds.seed_config(config, 1).seed == config.seed + 1
