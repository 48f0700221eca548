"""launch.py: phases run from a config file, user mistakes are readable errors, sweeps write a table (whole, or one
task per run and a gather)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(*args, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, os.path.join(ROOT, 'launch.py'), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_features_phase_from_the_command_line(tmp_path):
  proc = launch('--config=configs/features.py:quick', f'--workdir={tmp_path}',
                '--config.data.synthetic_bars=1500')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (tmp_path / 'features' / 'features.npz').exists()
  config = json.loads((tmp_path / 'config.json').read_text())
  assert config['data']['synthetic_bars'] == 1500 and config['phase'] == 'features'
  assert 'features' in json.loads((tmp_path / 'summary.json').read_text())


def test_user_mistake_is_a_readable_error_not_a_traceback(tmp_path):
  bad = tmp_path / 'bars.csv'
  bad.write_text('time,open,high,low,close,volume\n2024-01-01 00:00,1.0,0.9,0.95,1.0,10\n')
  proc = launch('--config=configs/features.py:quick', f'--workdir={tmp_path / "out"}',
                f'--config.data.path={bad}')
  assert proc.returncode == 2
  assert proc.stderr.startswith('natron: error:') or '\nnatron: error:' in proc.stderr
  assert 'Traceback' not in proc.stderr
  assert 'high' in proc.stderr   # names the broken rule


def test_unknown_phase_is_rejected(tmp_path):
  sys.path.insert(0, ROOT)
  import launch as launch_module  # pylint: disable=g-import-not-at-top
  from configs import base  # pylint: disable=g-import-not-at-top
  config = base.get_base_config()
  config.phase = 'nonsense'
  with pytest.raises(ValueError, match='Unknown phase'):
    launch_module.phases_of(config)


def test_sweep_runs_every_override_and_writes_a_table(tmp_path):
  config_file = tmp_path / 'sweep_config.py'
  config_file.write_text(SWEEP_CONFIG)
  proc = launch(f'--config={config_file}', f'--workdir={tmp_path / "sw"}', '--sweep')
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads((tmp_path / 'sw' / 'sweep.json').read_text())
  assert [r['override.seed'] for r in rows] == [1, 2]
  sub = json.loads((tmp_path / 'sw' / 'sweep_1' / 'config.json').read_text())
  assert sub['seed'] == 2 and sub['backtest']['cost_bps'] == 3.0
  assert (tmp_path / 'sw' / 'sweep.md').read_text().startswith('| run |')


@pytest.mark.parametrize('args, message', [
    (('--config=configs/finetune.py:quik',), "unknown config variant 'quik' (did you mean quick?)"),
    (('--config=configs/finetune.py:quick=maybe',), "quick='maybe' is not a valid bool"),
    (('--config=configs/finetune.py:quick', '--config.finetune.epocs=3'),
     'unknown config key finetune.epocs (did you mean epochs?)'),
    (('--config=configs/finetune.py', '--config.finetune.epochs=many'), 'finetune.epochs=many'),
])
def test_config_mistakes_are_one_readable_line(tmp_path, args, message):
  """A typo in a variant or an override never runs another config and never ends in a traceback."""
  proc = launch(*args, f'--workdir={tmp_path}', timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.startswith('natron: error:') and message in proc.stderr, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr and not any(tmp_path.iterdir())


def test_config_variants_parse_strictly():
  sys.path.insert(0, ROOT)
  from configs import base, finetune  # pylint: disable=g-import-not-at-top
  assert finetune.get_config('quick').finetune.epochs < finetune.get_config('quick=False').finetune.epochs
  assert finetune.get_config('quick=False').finetune.epochs == finetune.get_config().finetune.epochs
  assert base.parse_arg('n=3,name=x', n=1, name='').to_dict() == {'n': 3, 'name': 'x'}
  with pytest.raises(ValueError, match='not a valid int'):
    base.parse_arg('n=three', n=1)


SWEEP_CONFIG = (
    'from configs import base\n'
    'def get_config(arg=None):\n'
    '  config = base.get_base_config()\n'
    '  config.phase = "report"\n'
    '  return config\n'
    'def sweep():\n'
    '  return [{"seed": 1}, {"seed": 2, "backtest.cost_bps": 3.0}]\n')


def test_sweep_index_runs_one_and_gather_builds_the_table_from_separate_runs(tmp_path):
  """A cluster array: each task runs one override (--sweep_index=i), a last job gathers; the gather refuses
  a missing run and runs made with another config, with a readable error."""
  sys.path.insert(0, ROOT)
  import launch as launch_module  # pylint: disable=g-import-not-at-top
  from natron.errors import UserError  # pylint: disable=g-import-not-at-top
  config_file = tmp_path / 'sweep_config.py'
  config_file.write_text(SWEEP_CONFIG)
  spec = importlib.util.spec_from_file_location('sweep_config', config_file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config, workdir = module.get_config(), str(tmp_path / 'sw')

  rows = launch_module.run_sweep(config, workdir, str(config_file), index=1)   # task 1 of the array
  assert [r['run'] for r in rows] == ['sweep_1'] and sorted(os.listdir(workdir)) == ['sweep_1']
  with pytest.raises(UserError, match=r'sweep_0: not run .*--sweep_index=i'):
    launch_module.gather_sweep(config, workdir, str(config_file))
  with pytest.raises(UserError, match='outside the sweep'):
    launch_module.run_sweep(config, workdir, str(config_file), index=2)

  # Task 0 as a separate process, then the gather from the command line.
  proc = launch(f'--config={config_file}', f'--workdir={workdir}', '--sweep_index=0')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert not os.path.exists(os.path.join(workdir, 'sweep.json'))   # one task writes no table
  proc = launch(f'--config={config_file}', f'--workdir={workdir}', '--sweep', '--gather')
  assert proc.returncode == 0, proc.stderr[-3000:]
  gathered = json.loads((tmp_path / 'sw' / 'sweep.json').read_text())
  assert [(r['run'], r['override.seed']) for r in gathered] == [('sweep_0', 1), ('sweep_1', 2)]
  assert gathered[1]['override.backtest.cost_bps'] == 3.0
  assert (tmp_path / 'sw' / 'sweep.md').read_text().startswith('| run |')
  # The same rows as one process running the whole sweep.
  whole = launch_module.run_sweep(config, str(tmp_path / 'whole'), str(config_file))
  same = lambda rows, root: [{k: str(v).replace(root, 'W') for k, v in r.items() if 'seconds' not in k}
                             for r in rows]
  assert same(whole, str(tmp_path / 'whole')) == same(gathered, workdir)

  # Runs from another config are refused, naming the key that differs.
  proc = launch(f'--config={config_file}', f'--workdir={workdir}', '--sweep', '--gather',
                '--config.evaluation.level=0.9')
  assert proc.returncode == 2 and proc.stderr.startswith('natron: error: cannot gather the sweep')
  assert 'evaluation.level (this config: 0.9, the run: 0.95)' in proc.stderr and 'Traceback' not in proc.stderr


def test_fold_and_gather_flags_need_a_walkforward_config(tmp_path):
  sys.path.insert(0, ROOT)
  import launch as launch_module  # pylint: disable=g-import-not-at-top
  from configs import walkforward  # pylint: disable=g-import-not-at-top
  config = walkforward.get_config('quick')
  task = launch_module.walkforward_task(config, 2, False)
  assert task.walkforward.fold == 2 and not task.walkforward.gather and config.walkforward.fold == -1
  assert launch_module.walkforward_task(config, None, True).walkforward.gather
  proc = launch('--config=configs/features.py:quick', f'--workdir={tmp_path}', '--fold=1', timeout=120)
  assert proc.returncode == 2 and '--fold needs a walk-forward config' in proc.stderr, proc.stderr[-2000:]
  proc = launch('--config=configs/walkforward.py:quick', f'--workdir={tmp_path}', '--fold=1', '--gather',
                timeout=120)
  assert proc.returncode == 2 and '--gather runs nothing' in proc.stderr, proc.stderr[-2000:]
