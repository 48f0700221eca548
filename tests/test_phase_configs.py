"""Each phase keeps its resolved config in its own directory; later phases read data settings from the bundle."""
import json
import os
import sys

import ml_collections

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import launch  # noqa: E402  pylint: disable=g-import-not-at-top
from configs import base  # noqa: E402  pylint: disable=g-import-not-at-top
from natron import bundle_settings  # noqa: E402  pylint: disable=g-import-not-at-top
from natron import checkpoint  # noqa: E402  pylint: disable=g-import-not-at-top


def report_config(seed):
  config = base.get_base_config()
  config.phase = 'report'
  config.seed = seed
  return config


def test_a_later_phase_does_not_overwrite_the_workdirs_config(tmp_path):
  pipeline = report_config(1)
  pipeline.phase = ''
  pipeline.phases = ('report', 'report')   # a pipeline (several phases) always records its config
  launch.run_config(pipeline, str(tmp_path))
  assert json.loads((tmp_path / 'config.json').read_text())['seed'] == 1
  launch.run_config(report_config(7), str(tmp_path))      # e.g. `serve` on a pipeline workdir
  assert json.loads((tmp_path / 'config.json').read_text())['seed'] == 1
  assert json.loads((tmp_path / 'report' / 'config.json').read_text())['seed'] == 7


def test_bundle_settings_replace_the_users_data_sections(tmp_path):
  trained = base.get_base_config()
  trained.data.synthetic_bars = 4321
  trained.dataset.split = (0.6, 0.2, 0.2)
  meta = {'config': trained.to_dict()}
  checkpoint.save_bundle(str(tmp_path / 'finetune' / 'bundle'), {'w': [0.0]}, meta)
  user = base.get_base_config()
  user.backtest.cost_bps = 3.0
  got = bundle_settings.resolve(user, str(tmp_path), 'backtest')
  assert got.data.synthetic_bars == 4321 and tuple(got.dataset.split) == (0.6, 0.2, 0.2)
  assert got.backtest.cost_bps == 3.0                       # the user's own sections stay
  assert user.data.synthetic_bars == 20_000                 # the caller's config is untouched
  user.data_from = 'config'
  assert bundle_settings.resolve(user, str(tmp_path), 'backtest') is user
  assert isinstance(got, ml_collections.ConfigDict)
