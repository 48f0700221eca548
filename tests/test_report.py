"""report.md collects the phases' artefacts, names missing phases and never hides a loss."""
import json

from natron import report


def test_report_names_missing_phases(tmp_path):
  text = report.build_report(str(tmp_path))
  for phase in ('dataset', 'finetune', 'backtest', 'rl'):
    assert f'The {phase} phase did not run' in text


def test_report_shows_metrics_baselines_and_losses(tmp_path):
  (tmp_path / 'finetune').mkdir()
  task = {'accuracy': 0.61, 'macro_f1': 0.55, 'majority_baseline': 0.40, 'precision': [], 'recall': [],
          'confusion_matrix': []}
  (tmp_path / 'finetune' / 'report.json').write_text(json.dumps({'test': {'direction': task}}))
  sym = tmp_path / 'backtest' / 'SYNTH'
  sym.mkdir(parents=True)
  (sym / 'table.md').write_text('| policy | total_return |\n|---|---|\n| ppo | -3.00% |')
  (sym / 'metrics.json').write_text(json.dumps({
      'ppo': {'total_return': -0.03, 'days': 30}, 'flat': {'total_return': 0.0, 'days': 30},
      'buy_and_hold': {'total_return': 0.01, 'days': 30}}))
  text = report.build_report(str(tmp_path))
  assert '| test | direction | 61.0% | 40.0% | +21.0 pts | 0.550 |' in text
  assert 'ppo: LOST 3.00% after costs' in text
  assert 'backtest/SYNTH/equity.png' in text
  assert 'the test span is 30 trading days' in text
  out = report.run_phase(None, str(tmp_path))
  assert (tmp_path / 'report.md').read_text() == text and out['report'].endswith('report.md')


def test_report_shows_baselines_intervals_and_verdicts(tmp_path):
  (tmp_path / 'finetune').mkdir()
  task = {'accuracy': 0.61, 'accuracy_ci': [0.55, 0.66], 'macro_f1': 0.55, 'macro_f1_ci': [0.5, 0.6],
          'majority_baseline': 0.40,
          'baselines': {'majority': {'accuracy': 0.40, 'macro_f1': 0.2}, 'momentum': {'accuracy': 0.60, 'macro_f1': 0.5},
                        'linear': {'accuracy': 0.58, 'macro_f1': 0.52}},
          'margin_over_best_baseline': {'value': 0.01, 'ci': [-0.02, 0.04], 'baseline': 'momentum'},
          'verdict': 'no evidence of skill over momentum: accuracy +1.0 pts [-2.0, +4.0] (95% CI includes 0)'}
  (tmp_path / 'finetune' / 'report.json').write_text(json.dumps({'test': {'direction': task}}))
  sym = tmp_path / 'backtest' / 'SYNTH'
  sym.mkdir(parents=True)
  (sym / 'table.md').write_text('| policy | total_return |\n|---|---|\n| ppo | 2.00% |')
  (sym / 'metrics.json').write_text(json.dumps({
      'ppo': {'total_return': 0.02, 'days': 300, 'total_return_ci': [-0.01, 0.05], 'psr': 0.8, 'dsr': 0.6,
              'verdict': 'no evidence of skill over momentum: total return +1.0% [-2.0, +4.0] (95% CI includes 0)'},
      'momentum': {'total_return': 0.01, 'days': 300}, 'flat': {'total_return': 0.0, 'days': 300}}))
  text = report.build_report(str(tmp_path))
  assert '| direction | 0.610 [0.550, 0.660] | 0.400 | 0.600 | 0.580 |' in text
  assert 'test / direction: no evidence of skill over momentum' in text
  assert 'ppo: made 2.00% after costs [95% CI -1.0%, 5.0%]' in text and 'PSR 0.80, DSR 0.60' in text
  assert 'Verdict: no evidence of skill over momentum: total return' in text
