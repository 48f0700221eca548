r"""Runs one Natron phase, or a chain of them, from an ml_collections config.

  python launch.py --config=configs/pipeline.py:quick --workdir=runs/demo
  python launch.py --config=configs/finetune.py --workdir=runs/ft --config.finetune.epochs=20
  python launch.py --config=configs/finetune.py:quick --workdir=runs/sweep --sweep

Every output lands in --workdir: the resolved config (config.json), one sub-folder per phase, metrics as JSON
lines, checkpoints, reports. A config file may define `sweep()` returning a list of override dicts
({"finetune.lr": 1e-4, ...}); with --sweep each runs into workdir/sweep_<i>/ and a table of final metrics
is written to workdir/sweep.md and sweep.json.

On a cluster, one invocation runs one piece and a last one gathers (a SLURM array, Kubernetes jobs, Ray tasks):

  python launch.py --config=configs/finetune.py:quick --workdir=runs/sweep --sweep_index=$I   # I = 0..N-1
  python launch.py --config=configs/finetune.py:quick --workdir=runs/sweep --sweep --gather
  python launch.py --config=configs/walkforward.py:quick --workdir=runs/wf --fold=$K           # K = 0..folds-1
  python launch.py --config=configs/walkforward.py:quick --workdir=runs/wf --gather

The gather runs nothing: it checks that every run exists and ran with this config, then writes the tables.
Multi-host training (--config.distributed=True): every process runs the same command; process 0 alone writes.
"""
import importlib
import importlib.util
import json
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from natron import phases

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/<phase>.py[:variant]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for every output of the run.')
_SWEEP = flags.DEFINE_bool('sweep', False, "Run the config's sweep() overrides into sub-workdirs.")
_SWEEP_INDEX = flags.DEFINE_integer('sweep_index', None, "Run only override i of the config's sweep() into "
                                    'workdir/sweep_<i> (one cluster array task); implies --sweep.', lower_bound=0)
_FOLD = flags.DEFINE_integer('fold', None, 'Walk-forward: run only fold k (one cluster array task); '
                             'sets config.walkforward.fold.', lower_bound=0)
_GATHER = flags.DEFINE_bool('gather', False, 'Run nothing: build the sweep table (with --sweep) or the '
                            'walk-forward tables from the runs already in --workdir.')
flags.mark_flags_as_required(['config', 'workdir'])

PHASES = phases.PHASES   # name -> module exposing run_phase(config, workdir) -> dict


def phases_of(config) -> list[str]:
  names = list(config.get('phases', ())) or ([config.phase] if config.get('phase') else [])
  if not names:
    raise ValueError('The config names no phase: set config.phase or config.phases.')
  unknown = [n for n in names if n not in PHASES]
  if unknown:
    raise ValueError(f'Unknown phase(s) {unknown}; known: {sorted(PHASES)}')
  return names


SECRET_KEYS = ('api_key',)   # config keys whose values are never written to disk (natron/serve/app.py)


def _redact(node):
  if isinstance(node, dict):
    return {k: ('<redacted>' if k in SECRET_KEYS and v else _redact(v)) for k, v in node.items()}
  if isinstance(node, list):
    return [_redact(v) for v in node]
  return node


def config_json(config) -> str:
  """The resolved config as JSON for workdir/config.json, with secrets (SECRET_KEYS) replaced."""
  return json.dumps(_redact(json.loads(config.to_json_best_effort())), indent=2)


def is_main_process() -> bool:
  """Process 0 of a multi-host run (or the only process) writes; the others compute beside it."""
  from natron.train import state as train_state  # pylint: disable=g-import-not-at-top  (after jax.distributed)
  return train_state.is_main_process()


def _sync(name: str) -> None:
  from natron.train import state as train_state  # pylint: disable=g-import-not-at-top
  train_state.sync(name)


def write_text(path: str, text: str) -> None:
  """Writes a file atomically (cluster tasks sharing a workdir may write the same file at the same time)."""
  tmp = f'{path}.{os.getpid()}.tmp'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def run_config(config, workdir: str) -> dict:
  """Runs every phase of `config` into `workdir`; returns {phase: summary}."""
  main = is_main_process()
  names = phases_of(config)
  text = config_json(config)
  # workdir/config.json records the run that made the workdir (a pipeline, or its first phase); a later single
  # phase (serve, backtest on a pipeline workdir) never overwrites it. Each phase keeps its own resolved config
  # in its own directory.
  top = os.path.join(workdir, 'config.json')
  if main:
    os.makedirs(workdir, exist_ok=True)
    if len(names) > 1 or not os.path.exists(top):
      write_text(top, text)
  results = {}
  for name in names:
    if main:
      os.makedirs(os.path.join(workdir, name), exist_ok=True)
      write_text(os.path.join(workdir, name, 'config.json'), text)
    logging.info('=== phase %s -> %s', name, workdir)
    start = time.time()
    module = importlib.import_module(PHASES[name])
    results[name] = module.run_phase(config, workdir) or {}
    _sync(f'natron_phase_{name}')   # multi-host: what process 0 wrote is there before any process reads it
    logging.info('=== phase %s done in %.1f s', name, time.time() - start)
  if main:
    write_text(os.path.join(workdir, 'summary.json'), json.dumps(results, indent=2, default=str))
  return results


def _sweep_overrides(config_path: str) -> list[dict]:
  spec = importlib.util.spec_from_file_location('natron_sweep_config', config_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'sweep'):
    raise ValueError(f'{config_path} defines no sweep(); nothing to run with --sweep.')
  return list(module.sweep())


def _flatten(d, prefix=''):
  out = {}
  for k, v in (d or {}).items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    elif isinstance(v, (int, float, str, bool)) or v is None:
      out[f'{prefix}{k}'] = v
  return out


def sweep_configs(config, config_path: str) -> list[tuple[dict, object]]:
  """[(override, config of that run)] for every override of the config file's sweep(), in order."""
  from natron import sweeps  # pylint: disable=g-import-not-at-top
  overrides = _sweep_overrides(config_path)
  out = []
  for override in overrides:
    cfg = config.copy_and_resolve_references()
    with cfg.unlocked():
      for key, value in override.items():
        node = cfg
        *parents, leaf = key.split('.')
        for p in parents:
          node = node[p]
        node[leaf] = value
      sweeps.trials_config(cfg, len(overrides))
    out.append((override, cfg))
  return out


def _sweep_row(i: int, override: dict, results: dict) -> dict:
  return {'run': f'sweep_{i}', **{f'override.{k}': v for k, v in override.items()}, **_flatten(results)}


def write_sweep_table(workdir: str, rows: list[dict]) -> None:
  """workdir/sweep.json and sweep.md: ranked by a validation metric only, test figures for the chosen run alone
  (natron.sweeps)."""
  from natron import sweeps  # pylint: disable=g-import-not-at-top
  if not is_main_process():
    return
  os.makedirs(workdir, exist_ok=True)
  write_text(os.path.join(workdir, 'sweep.json'), json.dumps(rows, indent=2, default=str))
  write_text(os.path.join(workdir, 'sweep.md'), sweeps.markdown(rows))


def run_sweep(config, workdir: str, config_path: str, index: int | None = None) -> list[dict]:
  """Runs every override (or only override `index`, one cluster task) into workdir/sweep_<i>; each run's
  Deflated Sharpe counts the sweep size. All of them: also writes the table (else `gather_sweep` does)."""
  runs = sweep_configs(config, config_path)
  if index is not None and not 0 <= index < len(runs):
    from natron.errors import UserError  # pylint: disable=g-import-not-at-top
    raise UserError(f'--sweep_index={index} is outside the sweep: {config_path} defines {len(runs)} runs '
                    f'(indices 0..{len(runs) - 1}).')
  rows = []
  for i, (override, cfg) in enumerate(runs):
    if index is not None and i != index:
      continue
    logging.info('=== sweep %d/%d %s', i + 1, len(runs), override)
    rows.append(_sweep_row(i, override, run_config(cfg, os.path.join(workdir, f'sweep_{i}'))))
  if index is None:
    write_sweep_table(workdir, rows)
  return rows


def _differences(expected, found, prefix='') -> list[str]:
  """Dotted keys whose values differ between two parsed config.json trees."""
  if isinstance(expected, dict) and isinstance(found, dict):
    out = []
    for key in sorted(set(expected) | set(found)):
      out += _differences(expected.get(key), found.get(key), f'{prefix}{key}.')
    return out
  return [] if expected == found else [f'{prefix[:-1]} (this config: {expected!r}, the run: {found!r})']


def check_run(workdir: str, config, name: str) -> str | None:
  """Why the finished run in `workdir` cannot be gathered under `config` (None when it can): no summary.json,
  or a phase whose config.json differs from `config`."""
  if not os.path.isfile(os.path.join(workdir, 'summary.json')):
    return f'{name}: not run (no {os.path.join(workdir, "summary.json")})'
  expected = json.loads(config_json(config))
  for phase in phases_of(config):
    path = os.path.join(workdir, phase, 'config.json')
    if not os.path.isfile(path):
      return f'{name}: phase {phase} not run (no {path})'
    with open(path) as f:
      found = _redact(json.load(f))
    diff = _differences(expected, found)
    if diff:
      more = f' and {len(diff) - 3} more' if len(diff) > 3 else ''
      return f'{name}: ran with another config: {"; ".join(diff[:3])}{more}'
  return None


def gather_sweep(config, workdir: str, config_path: str) -> list[dict]:
  """Builds sweep.md / sweep.json from runs made separately (--sweep_index); refuses when one is missing or
  ran with another config."""
  from natron.errors import UserError  # pylint: disable=g-import-not-at-top
  runs = sweep_configs(config, config_path)
  problems = [p for i, (_, cfg) in enumerate(runs)
              if (p := check_run(os.path.join(workdir, f'sweep_{i}'), cfg, f'sweep_{i}'))]
  if problems:
    raise UserError(f'cannot gather the sweep in {workdir}: ' + '; '.join(problems) + '. Run the missing '
                    'indices with --sweep_index=i and the same --config and overrides, or gather with the '
                    'config the runs used.')
  rows = []
  for i, (override, _) in enumerate(runs):
    with open(os.path.join(workdir, f'sweep_{i}', 'summary.json')) as f:
      rows.append(_sweep_row(i, override, json.load(f)))
  write_sweep_table(workdir, rows)
  return rows


class _QuietLibraries:
  """Drops INFO lines from libraries (Orbax logs every checkpoint step) so progress lines stay readable."""
  NOISY = ('/orbax/', '/etils/', '/jax/_src/')

  def filter(self, record) -> bool:
    return record.levelno >= 30 or not any(n in record.pathname for n in self.NOISY)


def main(argv):
  del argv
  import logging as std_logging  # pylint: disable=g-import-not-at-top
  std_logging.getLogger('absl').addFilter(_QuietLibraries())
  from natron.errors import UserError  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  if 'serve' not in phases_of(config):
    # Batch jobs keep freed host memory mapped for reuse (glibc would unmap XLA's tens-of-MB buffers every step:
    # ~670k page faults per seed-scale step). Not for the server, which must give memory back after bursts.
    from natron.train import state as state_lib  # pylint: disable=g-import-not-at-top
    state_lib.keep_host_memory_mapped()
  if config.get('distributed', False):
    initialize_distributed(config)
  try:
    config_path = config_flags.get_config_filename(flags.FLAGS['config'])
    sweep = _SWEEP.value or _SWEEP_INDEX.value is not None
    if _GATHER.value and (_SWEEP_INDEX.value is not None or _FOLD.value is not None):
      raise UserError('--gather runs nothing: give it without --sweep_index / --fold, after every run is done.')
    if _FOLD.value is not None or (_GATHER.value and not sweep):
      config = walkforward_task(config, _FOLD.value, _GATHER.value)
    if sweep and _GATHER.value:
      gather_sweep(config, _WORKDIR.value, config_path)
    elif sweep:
      run_sweep(config, _WORKDIR.value, config_path, _SWEEP_INDEX.value)
    else:
      run_config(config, _WORKDIR.value)
  except UserError as e:
    # A mistake the user can fix: say what it is, without a traceback.
    print(f'natron: error: {e}', file=sys.stderr)
    sys.exit(2)


def initialize_distributed(config) -> None:
  """jax.distributed.initialize(): from config.cluster when set, else detected from the cluster's environment."""
  import jax  # pylint: disable=g-import-not-at-top
  cluster = config.get('cluster') or {}
  kwargs = {}
  if cluster.get('coordinator_address'):
    kwargs['coordinator_address'] = str(cluster.coordinator_address)
  if int(cluster.get('num_processes', 0) or 0) > 0:
    kwargs['num_processes'] = int(cluster.num_processes)
  if int(cluster.get('process_id', -1)) >= 0:
    kwargs['process_id'] = int(cluster.process_id)
  jax.distributed.initialize(**kwargs)
  logging.info('jax.distributed: process %d of %d, %d local / %d global devices', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def walkforward_task(config, fold: int | None, gather: bool):
  """The config with walkforward.fold / walkforward.gather set from --fold / --gather."""
  from natron.errors import UserError  # pylint: disable=g-import-not-at-top
  if 'walkforward' not in config or 'walkforward' not in phases_of(config):
    flag = '--fold' if fold is not None else '--gather'
    raise UserError(f'{flag} needs a walk-forward config (configs/walkforward.py); to gather a sweep, add '
                    '--sweep.')
  config = config.copy_and_resolve_references()
  with config.unlocked():
    if fold is not None:
      config.walkforward.fold = int(fold)
    config.walkforward.gather = bool(gather)
  return config


def parse_flags(argv):
  """absl's flag parsing, with the user's config mistakes (an unknown key in --config.a.b=v, an unknown
  `:variant`, a value of the wrong type) reported as one readable line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError, TypeError, ValueError, flags.Error) as e:
    print(f'natron: error: {_config_error(e)}', file=sys.stderr)
    sys.exit(2)


def _config_error(e: Exception) -> str:
  text = str(e.args[0]) if isinstance(e, (AttributeError, KeyError)) and e.args else str(e)
  text = text.replace('\\n', '\n').replace("\\'", "'")   # ml_collections nests a KeyError's repr
  if 'Traceback (most recent call last)' in text:   # an error raised inside the config file: its last line
    lines = [l for l in text.splitlines() if l.strip()]
    return f'{lines[0].split(":")[0]}: {lines[-1]}'
  if isinstance(e, (AttributeError, KeyError)):
    # ml_collections says "'epocs'\nDid you mean "epochs" instead of "epocs"?": name the full key instead.
    bad = text.split('\n')[0].strip('\'"')
    hint = next((l for l in text.split('\n') if l.startswith('Did you mean')), '')
    suggestion = hint.split('"')[1] if hint.count('"') >= 2 else ''
    keys = [a[len('--config.'):].split('=', 1)[0] for a in sys.argv[1:] if a.startswith('--config.')]
    key = next((k for k in keys if bad in k.split('.')), bad)
    return (f'unknown config key {key}' + (f' (did you mean {suggestion}?)' if suggestion else '') +
            '; see the config file for the keys it defines')
  return text


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
