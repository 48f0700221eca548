r"""Runs one Natron phase, or a chain of them, from an ml_collections config.

  python launch.py --config=configs/pipeline.py:quick --workdir=runs/demo
  python launch.py --config=configs/finetune.py --workdir=runs/ft --config.finetune.epochs=20
  python launch.py --config=configs/finetune.py:quick --workdir=runs/sweep --sweep

Every output lands in --workdir: the resolved config (config.json), one sub-folder per phase, metrics as JSON
lines, checkpoints, reports. A config file may define `sweep()` returning a list of override dicts
({"finetune.lr": 1e-4, ...}); with --sweep each runs into workdir/sweep_<i>/ and a table of final metrics
is written to workdir/sweep.md and sweep.json.
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


def run_config(config, workdir: str) -> dict:
  """Runs every phase of `config` into `workdir`; returns {phase: summary}."""
  os.makedirs(workdir, exist_ok=True)
  names = phases_of(config)
  text = config_json(config)
  # workdir/config.json records the run that made the workdir (a pipeline, or its first phase); a later single
  # phase (serve, backtest on a pipeline workdir) never overwrites it. Each phase keeps its own resolved config
  # in its own directory.
  top = os.path.join(workdir, 'config.json')
  if len(names) > 1 or not os.path.exists(top):
    with open(top, 'w') as f:
      f.write(text)
  results = {}
  for name in names:
    os.makedirs(os.path.join(workdir, name), exist_ok=True)
    with open(os.path.join(workdir, name, 'config.json'), 'w') as f:
      f.write(text)
    logging.info('=== phase %s -> %s', name, workdir)
    start = time.time()
    module = importlib.import_module(PHASES[name])
    results[name] = module.run_phase(config, workdir) or {}
    logging.info('=== phase %s done in %.1f s', name, time.time() - start)
  with open(os.path.join(workdir, 'summary.json'), 'w') as f:
    json.dump(results, f, indent=2, default=str)
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


def run_sweep(config, workdir: str, config_path: str) -> list[dict]:
  """Runs every override into workdir/sweep_<i>; sweep.md ranks them by a validation metric only and shows test
  figures for the chosen configuration alone (natron.sweeps); each run's Deflated Sharpe counts the sweep size."""
  from natron import sweeps  # pylint: disable=g-import-not-at-top
  rows = []
  overrides = _sweep_overrides(config_path)
  for i, override in enumerate(overrides):
    cfg = config.copy_and_resolve_references()
    with cfg.unlocked():
      for key, value in override.items():
        node = cfg
        *parents, leaf = key.split('.')
        for p in parents:
          node = node[p]
        node[leaf] = value
      sweeps.trials_config(cfg, len(overrides))
    sub = os.path.join(workdir, f'sweep_{i}')
    logging.info('=== sweep %d/%d %s', i + 1, len(overrides), override)
    results = run_config(cfg, sub)
    rows.append({'run': f'sweep_{i}', **{f'override.{k}': v for k, v in override.items()},
                 **_flatten(results)})
  with open(os.path.join(workdir, 'sweep.json'), 'w') as f:
    json.dump(rows, f, indent=2, default=str)
  with open(os.path.join(workdir, 'sweep.md'), 'w') as f:
    f.write(sweeps.markdown(rows))
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
    import jax  # pylint: disable=g-import-not-at-top
    jax.distributed.initialize()
  try:
    if _SWEEP.value:
      run_sweep(config, _WORKDIR.value, config_flags.get_config_filename(flags.FLAGS['config']))
    else:
      run_config(config, _WORKDIR.value)
  except UserError as e:
    # A mistake the user can fix: say what it is, without a traceback.
    print(f'natron: error: {e}', file=sys.stderr)
    sys.exit(2)


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
