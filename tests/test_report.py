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
