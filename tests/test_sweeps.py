"""natron.sweeps: sweep tables rank on validation only and show test figures for the chosen run alone."""
import ml_collections

from configs import base
from natron import sweeps


def rows():
  return [{'run': 'sweep_0', 'override.finetune.lr': 1e-3, 'finetune.val_mean_macro_f1': 0.70,
           'finetune.test_direction_accuracy': 0.91},
          {'run': 'sweep_1', 'override.finetune.lr': 3e-4, 'finetune.val_mean_macro_f1': 0.74,
           'finetune.test_direction_accuracy': 0.55}]


def test_ranked_by_validation_and_test_shown_only_for_the_chosen_run():
  ordered, chosen, key = sweeps.rank(rows())
  assert key == 'finetune.val_mean_macro_f1' and chosen['run'] == 'sweep_1'
  assert [r['run'] for r in ordered] == ['sweep_1', 'sweep_0']
  text = sweeps.markdown(rows())
  assert '0.91' not in text                       # the better TEST figure of the other run is never shown
  assert '| finetune.test_direction_accuracy | 0.55 |' in text
  assert text.index('sweep_1') < text.index('sweep_0')


def test_trials_multiply_by_the_sweep_size():
  config = base.get_base_config()
  config.evaluation.trials = 2
  with config.unlocked():
    sweeps.trials_config(config, 4)
  assert config.evaluation.trials == 8
  sweeps.trials_config(ml_collections.ConfigDict({'seed': 0}), 4)   # no evaluation section: nothing to do
