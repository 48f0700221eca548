"""The rl phase over CPU cores (natron.rl.workers): the same agents whatever the number of worker processes."""
import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from natron.errors import UserError
from natron.rl import env as env_lib
from natron.rl import phase
from natron.rl import ppo
from natron.rl import workers as rl_workers
from tests.test_ppo import TRAIN_END, _config, _toy_market

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_COMPILE = True   # tests/conftest.py; the workers inherit it (INHERITED_JAX_OPTIONS)


def _setup(num_seeds=3, updates=4, chunk=2):
  features, close, spread = _toy_market()
  env_params = env_lib.make_params(features, close, spread=spread, train_end=TRAIN_END, episode_length=16,
                                   cost_bps=1.0)
  config = ml_collections.ConfigDict({'seed': 7, 'rl': _config(
      num_envs=8, num_steps=16, minibatch_size=64, update_epochs=1, total_timesteps=8 * 16 * updates,
      log_every=chunk, checkpoint_every=chunk, num_seeds=num_seeds, episode_length=16, alpha=0.0, beta=0.0,
      use_head_probs=True)})
  return config, env_lib.TradingEnv(features.shape[1]), env_params


def _train(tmp_path, name, workers, **kw):
  config, env, env_params = _setup(**kw)
  config.rl.workers = str(workers)
  out = str(tmp_path / name)
  runner, _, info = phase.train_agents(config, env, env_params, out)
  with open(os.path.join(out, 'train_metrics.jsonl')) as f:
    lines = [json.loads(line) for line in f]
  return runner, info, lines


def _leaves(runner):
  return [np.asarray(x) for x in jax.tree.leaves(runner)]


def test_resolve_workers_and_worker_environment(monkeypatch):
  monkeypatch.setattr(rl_workers, 'usable_cores', lambda: [0, 1])
  assert rl_workers.resolve_workers('auto', 4, 'cpu') == 2        # one per core
  assert rl_workers.resolve_workers('auto', 1, 'cpu') == 0        # one seed: one worker would only add start-up
  big = rl_workers.AUTO_MIN_ENV_STEPS
  assert rl_workers.resolve_workers('auto', 4, 'cpu', env_steps=big) == 2
  assert rl_workers.resolve_workers('auto', 4, 'cpu', env_steps=big - 1) == 0   # too short to repay start-up
  assert rl_workers.resolve_workers('auto', 4, 'gpu') == 0        # the accelerator runs every seed at once
  assert rl_workers.resolve_workers(3, 2, 'cpu') == 2 and rl_workers.resolve_workers('0', 2, 'cpu') == 0
  for bad in ('many', -1):
    with pytest.raises(UserError, match='rl.workers'):
      rl_workers.resolve_workers(bad, 2, 'cpu')
  env = rl_workers.worker_env({'XLA_FLAGS': '--xla_force_host_platform_device_count=4 --xla_dump_to=/tmp/x'})
  assert env['XLA_FLAGS'].split() == ['--xla_dump_to=/tmp/x', *rl_workers.WORKER_XLA_FLAGS]
  assert env['JAX_PLATFORMS'] == 'cpu'


def test_a_run_stopped_on_one_worker_resumes_bit_identically_on_two():
  """3 seeds: one worker runs all three for two chunks; a run stopped after the first chunk resumes on two
  workers, which split the seeds {0, 2} / {1}. Every leaf of every seed's runner state and every metric of the
  second chunk are bit-identical (fresh runs on 1 and 2 workers: the next test)."""
  config, env, env_params = _setup()
  trainer = ppo.make_trainer(config.rl, env, env_params, logger=False)
  start = rl_workers.initial_leaves(trainer, jax.random.split(jax.random.PRNGKey(7), 3), env_params)
  with rl_workers.SeedWorkers(config.rl, env.num_features, workers=1) as pool:
    pool.start(env_params, start)
    one_a, met_a = pool.run(2)
    one_b, met_b = pool.run(2)
  with rl_workers.SeedWorkers(config.rl, env.num_features, workers=2) as pool:
    assert pool.seeds == [[0, 2], [1]]
    pool.start(env_params, one_a)
    resumed, met_resumed = pool.run(2)
  for seed in range(3):
    for x, y in zip(one_b[seed], resumed[seed]):
      np.testing.assert_array_equal(x, y)
    for key in met_b[seed]:
      np.testing.assert_array_equal(met_b[seed][key], met_resumed[seed][key])
  assert not all(np.array_equal(x, y) for x, y in zip(one_b[0], one_b[1]))     # the seeds are different agents
  assert met_a[0]['reward'].shape == (2,)


_FOUR_DEVICES = r'''
import json, sys
sys.path.insert(0, sys.argv[1])
import jax, numpy as np
jax.config.update('jax_disable_most_optimizations', True)
from tests.test_rl_phase_cores import _setup
from natron.rl import phase
from natron.rl import ppo
config, env, env_params = _setup()
config.rl.workers = '2'
runner, _, info = phase.train_agents(config, env, env_params, sys.argv[2])
np.savez(sys.argv[2] + '/runner.npz', *[np.asarray(x) for x in jax.tree.leaves(runner)])
print(json.dumps({'devices': len(jax.devices()), **info}))
'''


def test_phase_training_is_the_same_on_one_worker_and_on_two_under_four_host_devices(tmp_path):
  """The phase's training loop with 1 worker here, and with 2 workers from a process that sees 4 host devices
  (XLA_FLAGS): the same runner state bit for bit, the same train_metrics.jsonl, checkpoints and info."""
  runner, info, lines = _train(tmp_path, 'one', 1)
  assert info['workers'] == 1 and info['num_updates'] == 4 and info['env_steps_per_s'] > 0
  assert [line['update'] for line in lines] == [2, 4]
  assert np.all(np.asarray(runner.update) == 4)
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=4',
             PYTHONPATH=ROOT)
  out = tmp_path / 'two'
  out.mkdir()
  proc = subprocess.run([sys.executable, '-c', _FOUR_DEVICES, ROOT, str(out)], env=env, capture_output=True,
                        text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result['devices'] == 4 and result['workers'] == 2
  saved = np.load(out / 'runner.npz')
  for i, leaf in enumerate(_leaves(runner)):
    np.testing.assert_array_equal(saved[f'arr_{i}'], leaf)
  with open(out / 'train_metrics.jsonl') as f:
    assert [json.loads(line) for line in f] == lines
  # Resume after the end on yet another worker count: restored from the checkpoint, nothing retrained.
  again, info_again, _ = _train(tmp_path, 'two', 3)
  assert info_again['env_steps_per_s'] is None
  for a, b in zip(_leaves(again), _leaves(runner)):
    np.testing.assert_array_equal(a, b)


def test_in_process_path_keeps_the_same_outputs(tmp_path):
  """workers=0 (what a GPU runs: jax.vmap over seeds here): the same runner layout and metrics lines."""
  runner0, info0, lines0 = _train(tmp_path, 'vmap', 0, num_seeds=2)
  runner1, _, lines1 = _train(tmp_path, 'workers', 2, num_seeds=2)
  assert info0['workers'] == 0
  assert len(_leaves(runner0)) == len(_leaves(runner1))
  for a, b in zip(_leaves(runner0), _leaves(runner1)):
    assert a.shape == b.shape and a.dtype == b.dtype
  assert [sorted(line) for line in lines0] == [sorted(line) for line in lines1]
  # Before any update both paths hold the same agents: the same init program per seed, vmapped or not.
  config, env, env_params = _setup(num_seeds=2)
  keys = jax.random.split(jax.random.PRNGKey(7), 2)
  trainer = ppo.make_trainer(config.rl, env, env_params, logger=False)
  vmapped = jax.jit(jax.vmap(trainer.init, in_axes=(0, None)))(keys, env_params)
  single = jax.jit(trainer.init)(keys[1], env_params)
  for a, b in zip(_leaves(vmapped.train_state.params), _leaves(single.train_state.params)):
    np.testing.assert_array_equal(a[1], b)


def test_a_failing_worker_is_reported_with_its_traceback():
  config, env, env_params = _setup(num_seeds=1)
  trainer = ppo.make_trainer(config.rl, env, env_params, logger=False)
  start = rl_workers.initial_leaves(trainer, jax.random.split(jax.random.PRNGKey(0), 1), env_params)
  config.rl.activation = 'no-such-activation'     # the worker's network cannot be built
  with pytest.raises(rl_workers.WorkerError, match='no-such-activation'):
    with rl_workers.SeedWorkers(config.rl, env.num_features, workers=1) as pool:
      pool.start(env_params, start)
      pool.run(1)
  with rl_workers.SeedWorkers(config.rl, env.num_features, workers=1) as pool:
    pass                                          # closed before any work: the worker just exits
  assert pool.procs == []
