"""PPO: truncation-aware GAE by hand, learning a toy market after costs, seeds via vmap, chunked resume."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import rl as rl_config
from natron import backtest
from natron.errors import UserError
from natron.rl import env as env_lib
from natron.rl import ppo

TRAIN_END = 1500
N_BARS = 2000
STEP = 2e-3


def _toy_market(seed=0):
  """Returns of +-STEP; feature column 0 at bar t reveals the sign of the NEXT return (t -> t+1).

  Perfectly learnable: the right policy is long when the feature is +1 and short when it is -1; every bar
  earns STEP against 1 bp + a small spread of cost per change, so it clearly beats flat and random.
  """
  rng = np.random.default_rng(seed)
  ret = rng.choice([-STEP, STEP], N_BARS)
  close = 100 * np.exp(np.cumsum(ret))
  next_sign = np.r_[np.sign(ret[1:]), 0.0]
  features = np.stack([next_sign, rng.normal(size=N_BARS)], axis=1).astype(np.float32)
  return features, close, np.full(N_BARS, 0.002)


def _config(**kw):
  config = rl_config.section(quick=True)
  config.num_envs = 16
  config.num_steps = 32
  config.minibatch_size = 128
  config.update_epochs = 2
  config.total_timesteps = 16 * 32 * 48
  config.lr = 1e-3
  config.log_every = 16
  config.num_seeds = 2
  config.update(kw)
  return config


FAST_COMPILE = True   # tests/conftest.py: skip most XLA optimisation in this module


@pytest.fixture(scope='module')
def trained():
  features, close, spread = _toy_market()
  params = env_lib.make_params(features, close, spread=spread, train_end=TRAIN_END, episode_length=32,
                               cost_bps=1.0, reward_scale=1 / STEP, pnl_scale=STEP)
  env = env_lib.TradingEnv(2)
  calls = []
  trainer = ppo.make_trainer(_config(), env, params, logger=lambda u, m: calls.append((int(u), dict(m))))
  out = jax.jit(jax.vmap(trainer.train, in_axes=(0, None)))(jax.random.split(jax.random.key(0), 2), params)
  jax.block_until_ready(out)
  return dict(env=env, params=params, trainer=trainer, out=out, calls=list(calls), close=close, spread=spread,
              features=features)


def test_gae_by_hand_with_truncation_bootstrap_and_termination():
  gamma, lam = 0.9, 0.8
  # One env, 4 steps: step 1 is truncated (bootstrap from its final observation), step 3 terminates.
  rewards = jnp.array([[1.0], [2.0], [0.5], [3.0]])
  values = jnp.array([[0.5], [1.0], [0.2], [0.4]])
  next_values = jnp.array([[1.0], [7.0], [0.4], [9.0]])   # step 0's next state is step 1's (value 1.0)
  terminated = jnp.array([[False], [False], [False], [True]])
  dones = jnp.array([[False], [True], [False], [True]])
  adv, targets = ppo.compute_gae(rewards, values, next_values, terminated, dones, gamma, lam)
  d3 = 3.0 - 0.4                                # terminal: no bootstrap
  d2 = 0.5 + gamma * 0.4 - 0.2
  d1 = 2.0 + gamma * 7.0 - 1.0                  # truncated: bootstrap with V(final observation) = 7
  d0 = 1.0 + gamma * 1.0 - 0.5
  a3 = d3
  a2 = d2 + gamma * lam * a3
  a1 = d1                                       # episode boundary: nothing flows back across it
  a0 = d0 + gamma * lam * a1
  np.testing.assert_allclose(np.asarray(adv[:, 0]), [a0, a1, a2, a3], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(targets[:, 0]), np.array([a0, a1, a2, a3]) + [0.5, 1.0, 0.2, 0.4],
                             rtol=1e-6)


def test_ppo_learns_toy_market_and_beats_flat_and_random_after_costs(trained):
  env, params, trainer, out = trained['env'], trained['params'], trained['trainer'], trained['out']
  close, spread = trained['close'], trained['spread']
  start, end = TRAIN_END + 10, N_BARS - 1      # held-out bars, never sampled by training episodes
  evaluate = jax.jit(trainer.evaluate, static_argnums=(2, 3))
  kw = dict(cost_bps=1.0, spread=spread[start:end])
  random = np.mean([backtest.run(close[start:end], backtest.random_policy(end - start, seed=s),
                                 **kw).metrics['total_return'] for s in range(5)])
  flat = backtest.run(close[start:end], np.zeros(end - start), **kw).metrics['total_return']
  for seed in range(2):
    seed_params = jax.tree.map(lambda x, s=seed: x[s], out['runner_state'].train_state.params)
    position = np.asarray(evaluate(seed_params, params, start, end))
    assert set(np.unique(position)) <= {-1.0, 0.0, 1.0}
    result = backtest.run(close[start:end], position, **kw)
    assert result.metrics['total_return'] > flat + 0.2
    assert result.metrics['total_return'] > random + 0.2
    hit = np.mean(position[:-1] == trained['features'][start:end - 1, 0])
    assert hit > 0.8
  episode_profit = np.asarray(out['metrics']['episode_net_profit'])
  assert episode_profit.shape == (2, trainer.num_updates)
  assert np.nanmean(episode_profit[:, -5:]) > np.nanmean(episode_profit[:, :3])


def test_two_seeds_differ_and_logger_fires_every_log_every(trained):
  p = trained['out']['runner_state'].train_state.params
  leaf = jax.tree.leaves(p)[0]
  assert leaf.shape[0] == 2 and not np.allclose(np.asarray(leaf[0]), np.asarray(leaf[1]))
  calls = trained['calls']
  updates = sorted(u for u, _ in calls)
  assert updates == [16, 16, 32, 32, 48, 48]     # once per seed, every 16 updates
  assert {'reward', 'loss/value', 'entropy', 'approx_kl', 'episode_net_profit'} <= set(calls[0][1])


def test_evaluate_positions_are_causal(trained):
  env, params, trainer = trained['env'], trained['params'], trained['trainer']
  seed_params = jax.tree.map(lambda x: x[0], trained['out']['runner_state'].train_state.params)
  evaluate = jax.jit(ppo.evaluate, static_argnums=(0, 1, 4, 5))
  base = np.asarray(evaluate(trainer.network, env, seed_params, params, 1600, 1700))
  cut = 1650
  features, close = trained['features'].copy(), trained['close'].copy()
  features[cut + 1:] = -features[cut + 1:]
  close[cut + 1:] *= 1.3
  altered = env_lib.make_params(features, close, spread=trained['spread'], train_end=TRAIN_END,
                                episode_length=32, cost_bps=1.0, reward_scale=1 / STEP, pnl_scale=STEP)
  other = np.asarray(evaluate(trainer.network, env, seed_params, altered, 1600, 1700))
  np.testing.assert_array_equal(other[:cut - 1600 + 1], base[:cut - 1600 + 1])
  assert not np.array_equal(other, base)


def test_chunked_run_equals_one_run(trained):
  """Resume relies on it: two chunks of 24 updates from init give the one-call run of 48 (same seeds)."""
  trainer, params, out = trained['trainer'], trained['params'], trained['out']
  keys = jax.random.split(jax.random.key(0), 2)
  runner = jax.vmap(trainer.init, in_axes=(0, None))(keys, params)
  chunk = jax.jit(jax.vmap(lambda r, p: trainer.run(r, p, 24), in_axes=(0, None)))
  runner, first = chunk(runner, params)
  runner, second = chunk(runner, params)
  np.testing.assert_array_equal(np.asarray(runner.update), [48, 48])
  for a, b in zip(jax.tree.leaves(runner.train_state.params),
                  jax.tree.leaves(out['runner_state'].train_state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(second['reward']), np.asarray(out['metrics']['reward'][:, 24:]),
                             rtol=1e-4, atol=1e-5)


def test_bad_sizes_are_user_errors():
  params = env_lib.make_params(*_toy_market()[:2], train_end=TRAIN_END, episode_length=8)
  with pytest.raises(UserError, match='multiple of rl.minibatch_size'):
    ppo.make_trainer(_config(minibatch_size=100), env_lib.TradingEnv(2), params)
  with pytest.raises(UserError, match='less than one update'):
    ppo.make_trainer(_config(total_timesteps=10), env_lib.TradingEnv(2), params)



def test_progress_logger_averages_seeds_and_reports_rate():
  lines = []
  logger = ppo.ProgressLogger(num_updates=16, steps_per_update=100, num_seeds=2, sink=lines.append)
  metrics = {'reward': 1.0, 'episode_net_profit': np.nan, 'long_frac': 0.5, 'short_frac': 0.25,
             'entropy': 1.0, 'approx_kl': 0.0}
  logger(8, metrics)
  assert not lines                                   # waits for the second seed of update 8
  logger(8, dict(metrics, reward=3.0, episode_net_profit=0.02))
  logger(16, metrics)
  logger(16, metrics)
  assert len(lines) == 2 and lines[0].startswith('rl update 8/16')
  assert 'reward 2.0000' in lines[0] and 'episode net profit +0.0200' in lines[0]
  assert 'env steps/s' in lines[1] and 'ETA 0 s' in lines[1]
  assert logger.history[1]['env_steps_per_s'] > 0


_SEEDS_OVER_DEVICES = r'''
import json, sys
import jax, numpy as np
jax.config.update('jax_disable_most_optimizations', True)
sys.path.insert(0, sys.argv[1])
from tests.test_ppo import _config, _toy_market, TRAIN_END
from natron.rl import env as env_lib, ppo
features, close, spread = _toy_market()
params = env_lib.make_params(features, close, spread=spread, train_end=TRAIN_END, episode_length=32,
                             cost_bps=1.0)
trainer = ppo.make_trainer(_config(total_timesteps=16 * 32 * 4), env_lib.TradingEnv(2), params, logger=False)
keys = jax.random.split(jax.random.key(0), 2)
sharded = ppo.jit_over_seeds(trainer.train, 2)(keys, params)
plain = jax.jit(jax.vmap(trainer.train, in_axes=(0, None)))(keys, params)
leaf = jax.tree.leaves(sharded['runner_state'].train_state.params)[0]
print(json.dumps({
    'devices': len(jax.devices()), 'sharded_over': len(leaf.sharding.device_set),
    'max_param_diff': max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(
        jax.tree.leaves(sharded['runner_state'].train_state.params),
        jax.tree.leaves(plain['runner_state'].train_state.params))),
    'reward_equal': bool(np.allclose(np.asarray(sharded['metrics']['reward']),
                                     np.asarray(plain['metrics']['reward']), rtol=1e-4, atol=1e-5))}))
'''


def test_jit_over_seeds_shards_agents_over_devices_with_the_same_results():
  """Two fake CPU devices (a fresh process: the device count is fixed at start): one agent per device."""
  import json
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=2',
             PYTHONPATH=root)
  out = subprocess.run([sys.executable, '-c', _SEEDS_OVER_DEVICES, root], env=env, capture_output=True,
                       text=True, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result['devices'] == 2 and result['sharded_over'] == 2
  # The same per-seed program on each device: equal up to float32 reassociation over 4 updates of Adam.
  assert result['max_param_diff'] < 1e-4 and result['reward_equal'], result
