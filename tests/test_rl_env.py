"""TradingEnv invariants (costs, next-bar execution, no future data, training-span-only episodes, truncation)
and the rl phase end to end on a tiny bundle."""
import json
import os

import jax
import ml_collections
import jax.numpy as jnp
import numpy as np
import pytest

from configs import rl as rl_config
from natron import backtest
from natron import baselines
from natron import checkpoint
from natron import data as data_lib
from natron import dataset as dataset_lib
from natron.errors import UserError
from natron.rl import env as env_lib
from natron.rl import phase

SHORT, FLAT, LONG = 0, 1, 2


def _market(n=400, d=3, seed=0):
  rng = np.random.default_rng(seed)
  close = 100 * np.exp(np.cumsum(rng.normal(0, 2e-3, n)))
  spread = rng.uniform(0.0, 0.02, n)
  features = rng.normal(size=(n, d)).astype(np.float32)
  return features, close, spread


def _params(n=400, d=3, train_end=300, episode_length=16, **kw):
  features, close, spread = _market(n, d)
  return env_lib.make_params(features, close, spread=spread, train_end=train_end,
                             episode_length=episode_length, **kw), (features, close, spread)


def _walk(env, params, start, actions):
  """step_env from flat at `start` through `actions`; returns (obs list, rewards, infos)."""
  state = env_lib.initial_state(start, params)
  obs = [env.get_obs(state, params)]
  rewards, infos = [], []
  step = jax.jit(env.step_env)
  for a in actions:
    o, state, r, term, info = step(jax.random.key(0), state, jnp.int32(a), params)
    assert not bool(term)
    obs.append(o)
    rewards.append(float(r))
    infos.append(jax.tree.map(float, info))
  return obs, np.array(rewards), infos


def test_hand_example_costs_and_next_bar_execution():
  close = np.array([100.0, 101.0, 99.0, 99.0, 102.0, 103.0])
  spread = np.array([0.02, 0.04, 0.0, 0.02, 0.0, 0.0])
  features = np.zeros((6, 1), np.float32)
  params = env_lib.make_params(features, close, spread=spread, train_end=6, episode_length=4, cost_bps=2.0,
                               alpha=0.001)
  env = env_lib.TradingEnv(1)
  # long at bar 0, flip short at 1, flat at 2, flat at 3, long at 4
  _, rewards, infos = _walk(env, params, 0, [LONG, SHORT, FLAT, FLAT, LONG])
  pos = np.array([1, -1, 0, 0, 1.0])
  change = np.abs(np.diff(pos, prepend=0.0))                      # 1, 2, 1, 0, 1
  unit = 2e-4 + spread[:5] / close[:5] / 2
  cost = change * unit
  log_ret = np.log(close[1:] / close[:-1])                          # close t -> t+1
  simple = close[1:] / close[:-1] - 1
  expected_net = pos * simple - cost
  equity = np.cumprod(1 + expected_net)
  dd = 1 - equity / np.maximum.accumulate(np.r_[1.0, equity])[1:]
  dd_increase = np.maximum(0, np.diff(np.r_[0.0, dd]))
  expected_reward = pos * log_ret - cost - 0.001 * change - 0.0 * dd_increase
  np.testing.assert_allclose([i['cost'] for i in infos], cost, rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose([i['net_return'] for i in infos], expected_net, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose([i['gross_return'] for i in infos], pos * simple, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(rewards, expected_reward, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(infos[-1]['net_profit'], equity[-1] - 1, rtol=1e-4, atol=1e-6)
  # The no-trade step (bar 3) pays nothing; every position change paid.
  assert infos[3]['cost'] == 0.0 and all(infos[i]['cost'] > 0 for i in (0, 1, 2, 4))


def test_drawdown_penalty_only_on_increase():
  close = np.array([100.0, 98.0, 97.0, 99.0, 101.0])
  params = env_lib.make_params(np.zeros((5, 1), np.float32), close, train_end=5, episode_length=3,
                               cost_bps=0.0, beta=2.0)
  _, rewards, infos = _walk(env_lib.TradingEnv(1), params, 0, [LONG, LONG, LONG, LONG])
  equity = np.cumprod(1 + np.array([i['net_return'] for i in infos]))
  dd = 1 - equity / np.maximum.accumulate(np.r_[1.0, equity])[1:]
  penalty = 2.0 * np.maximum(0, np.diff(np.r_[0.0, dd]))
  np.testing.assert_allclose(rewards, np.log(close[1:] / close[:-1]) - penalty, rtol=1e-4, atol=1e-7)
  assert penalty[0] > 0 and penalty[1] > 0 and penalty[2] == 0 and penalty[3] == 0


def test_net_returns_match_backtest_engine():
  params, (_, close, spread) = _params(n=200, train_end=200, episode_length=8, cost_bps=1.5)
  actions = np.random.default_rng(1).integers(0, 3, 120)
  start = 40
  _, _, infos = _walk(env_lib.TradingEnv(3), params, start, actions)
  position = actions - 1.0
  # The engine's last bar earns nothing, so run it over one bar more than the walk.
  res = backtest.run(close[start:start + 121], np.r_[position, position[-1]], cost_bps=1.5,
                     spread=spread[start:start + 121])
  np.testing.assert_allclose([i['net_return'] for i in infos], res.net[:120], rtol=2e-4, atol=2e-7)
  np.testing.assert_allclose(infos[-1]['net_profit'], res.equity[119] - 1, rtol=1e-3, atol=1e-5)


def test_observation_uses_no_future_data():
  params, (features, close, spread) = _params(n=120, train_end=120, episode_length=8)
  env = env_lib.TradingEnv(3)
  actions = np.random.default_rng(2).integers(0, 3, 60)
  start = 10
  base_obs, _, _ = _walk(env, params, start, actions)
  rng = np.random.default_rng(3)
  for cut in (0, 7, 31, 59):
    bar = start + cut          # observation index `cut` is taken at this bar
    f2, c2, s2 = features.copy(), close.copy(), spread.copy()
    f2[bar + 1:] = rng.normal(size=f2[bar + 1:].shape)
    c2[bar + 1:] *= np.exp(rng.normal(0, 0.05, len(c2) - bar - 1))
    s2[bar + 1:] = rng.uniform(0, 1, len(s2) - bar - 1)
    altered = env_lib.make_params(f2, c2, spread=s2, train_end=120, episode_length=8)
    obs, _, _ = _walk(env, altered, start, actions[:cut])
    for k in range(cut + 1):
      np.testing.assert_array_equal(np.asarray(obs[k]), np.asarray(base_obs[k]))


def test_observation_layout():
  params, (features, close, _) = _params(n=60, train_end=60, episode_length=8, pnl_scale=0.01)
  env = env_lib.TradingEnv(3)
  obs, _, _ = _walk(env, params, 5, [LONG, LONG, LONG, SHORT])
  obs = [np.asarray(o) for o in obs]
  assert obs[0].shape == env.obs_shape == (8,)
  np.testing.assert_array_equal(obs[0][:3], features[5])
  np.testing.assert_array_equal(obs[0][3:6], [0, 1, 0])             # flat
  np.testing.assert_array_equal(obs[3][3:6], [0, 0, 1])             # long since bar 5
  np.testing.assert_allclose(obs[3][6], np.log(close[8] / close[5]) / 0.01, rtol=1e-4)
  np.testing.assert_allclose(obs[3][7], 3 / 8)                       # 3 bars in trade / episode length
  np.testing.assert_array_equal(obs[4][3:6], [1, 0, 0])             # flipped short at bar 8
  np.testing.assert_allclose(obs[4][6:], [-np.log(close[9] / close[8]) / 0.01, 1 / 8], rtol=1e-4)


def test_resets_stay_in_training_span_and_episodes_never_pass_train_end():
  params, _ = _params(n=400, train_end=300, episode_length=16, start_low=50)
  env = env_lib.TradingEnv(3)
  assert int(params.start_high) == 300 - 16 - 1
  _, states = jax.jit(jax.vmap(env.reset, in_axes=(0, None)))(jax.random.split(jax.random.key(0), 5000),
                                                              params)
  bars = np.asarray(states.bar)
  assert bars.min() == 50 and bars.max() == 283       # both ends reached, nothing outside
  assert len(np.unique(bars)) == 234

  num_envs = 1000

  @jax.jit
  def run(key, params):
    obs, state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(key, num_envs), params)

    def body(state, k):
      k1, k2 = jax.random.split(k)
      action = jax.random.randint(k1, (num_envs,), 0, 3)
      reached = state.bar + 1     # the bar whose close and features this step reads
      _, state, _, _, _, info = jax.vmap(env.step, in_axes=(0, 0, 0, None))(
          jax.random.split(k2, num_envs), state, action, params)
      return state, (reached, state.bar, info['truncated'])

    return jax.lax.scan(body, state, jax.random.split(key, 80))[1]

  reached, after, truncated = jax.device_get(run(jax.random.key(1), params))
  assert reached.max() <= 299 and reached.min() >= 51
  assert after.min() >= 50 and after.max() <= 299
  assert truncated.sum() == num_envs * (80 // 16)


def test_too_short_training_span_is_a_user_error():
  features, close, spread = _market(40)
  with pytest.raises(UserError, match='too short'):
    env_lib.make_params(features, close, spread=spread, train_end=20, episode_length=20)
  with pytest.raises(UserError, match='non-finite'):
    bad = features.copy()
    bad[5, 0] = np.nan
    env_lib.make_params(bad, close, train_end=40, episode_length=8)
  with pytest.raises(UserError, match='close'):
    env_lib.make_params(features, -close, train_end=40, episode_length=8)


def test_truncation_not_termination_and_final_observation():
  params, _ = _params(n=100, train_end=100, episode_length=5)
  env = env_lib.TradingEnv(3)
  obs, state = env.reset(jax.random.key(0), params)
  start = int(state.bar)
  for i in range(5):
    expected_final = env.get_obs(state.replace(time=state.time + 1, bar=state.bar + 1,
                                               position=jnp.float32(0.0), bars_in_trade=jnp.int32(0)), params)
    obs, state, reward, terminated, truncated, info = env.step(jax.random.key(10 + i), state, FLAT, params)
    assert not bool(terminated) and not bool(info['terminated'])
    assert bool(truncated) == (i == 4)
  # Final observation: bar start + 5 as reached by the step; the returned state is a fresh reset.
  np.testing.assert_array_equal(np.asarray(info['final_observation']), np.asarray(expected_final))
  assert int(state.time) == 0 and float(state.equity) == 1.0
  assert params.start_low <= int(state.bar) <= params.start_high
  np.testing.assert_array_equal(np.asarray(obs), np.asarray(env.get_obs(state, params)))
  assert start + 5 <= 99


def test_reset_and_step_states_have_identical_types():
  params, _ = _params()
  env = env_lib.TradingEnv(3)
  _, s0 = env.reset(jax.random.key(0), params)
  _, s1, *_ = env.step(jax.random.key(1), s0, LONG, params)
  _, s2, *_ = env.step_env(jax.random.key(1), s0, LONG, params)
  types = lambda s: jax.tree.map(lambda x: (x.shape, x.dtype), s)
  assert types(s0) == types(s1) == types(s2)


def test_jit_vmap_over_1000_envs_shares_market_arrays():
  params, _ = _params(n=400, train_end=300, episode_length=16)
  env = env_lib.TradingEnv(3)
  keys = jax.random.split(jax.random.key(0), 1000)
  obs, state = jax.vmap(env.reset, in_axes=(0, None))(keys, params)
  step = jax.jit(jax.vmap(env.step, in_axes=(0, 0, 0, None)))
  obs, state, reward, terminated, truncated, info = step(keys, state, jnp.full(1000, LONG), params)
  assert obs.shape == (1000, 8) and obs.dtype == jnp.float32
  assert reward.shape == terminated.shape == truncated.shape == (1000,)
  assert info['final_observation'].shape == (1000, 8)
  np.testing.assert_allclose(np.asarray(info['position']), 1.0)
  # Same shapes, other values (costs, market): no recompilation, the arrays are arguments.
  params2 = params.replace(cost_bps=5.0, close=params.close * 2)
  step(keys, state, jnp.full(1000, SHORT), params2)
  assert step._cache_size() == 1


def test_ppo_trains_where_the_bundle_says_fine_tuning_never_looked():
  meta = {'rl_holdout': {'fraction': 0.3, 'start_rows': {'SYNTH': 1700}}}
  assert phase.rl_first_row(meta, 'SYNTH', 200, 1100, 1800) == (1500, True)    # local row 1700 - 200
  assert phase.rl_first_row({}, 'SYNTH', 200, 1100, 1800) == (1100, False)     # an older bundle: in-sample
  with pytest.raises(UserError, match='too short'):
    phase.rl_first_row(meta, 'SYNTH', 0, 1100, 1701)


def test_rl_phase_end_to_end_and_resume(tmp_path, fast_compile):
  """The phase on a tiny bundle: writes its outputs, evaluates on the test span, resumes instead of retraining."""
  import test_predictor   # the session's shared tiny bundle (random weights), built once

  workdir = str(tmp_path)
  config = test_predictor.tiny_config()
  config.rl = rl_config.section(quick=True)
  # 1200 bars (the length test_predictor compiles features for); 1000 warm-up bars leave a short train span.
  config.data.synthetic_bars, config.data.synthetic_seed = 1200, 3
  config.dataset.split = (0.88, 0.06, 0.06)
  config.labels.regime_horizon = 12
  config.rl.update(episode_length=8, num_envs=8, num_steps=16, minibatch_size=64, update_epochs=1,
                   total_timesteps=8 * 16 * 4, log_every=2, checkpoint_every=2, num_seeds=2, random_seeds=3)
  # The bundle records the data and split settings of its (here: pretend) fine-tuning run; the rl and backtest
  # phases take them from there, whatever the user's config says.
  params, meta = checkpoint.load_bundle(test_predictor.bundle_dir())
  meta['config'] = config.to_dict()
  checkpoint.save_bundle(os.path.join(workdir, 'finetune', 'bundle'), params, meta)
  user = ml_collections.ConfigDict(config.to_dict())
  user.data.synthetic_seed = 99    # a forgotten override: ignored (with a warning), the bundle's seed is used
  config.baselines.linear_epochs = 1
  config.evaluation.bootstrap = 200
  # The finetune phase's baselines, fitted on this data's training span (what the rl and backtest tables trade).
  ds = dataset_lib.build_dataset(data_lib.load_market(config.data), config)
  preds, momentum, linear, _ = baselines.fit_and_predict(
      ds, config, {t: np.asarray(w, np.float32) for t, w in ds.class_weights.items()})
  baselines.save(os.path.join(workdir, 'finetune', 'baselines'), momentum, linear, {})
  summary = phase.run_phase(user, workdir)
  rl_dir = os.path.join(workdir, 'rl')
  saved = np.load(os.path.join(rl_dir, 'policy_test.npz'), allow_pickle=True)
  assert len(saved['position']) == len(saved['close']) == len(saved['time']) == summary['test_bars'] > 0
  assert set(np.unique(saved['position'])) <= {-1.0, 0.0, 1.0}
  # The bundle's data (seed 3), not the user's forgotten override (seed 99): the test span is its last bars.
  np.testing.assert_array_equal(saved['close'], ds.close[-len(saved['close']):])
  # The reported test return is the backtest of the saved positions, costs included.
  result = backtest.run(saved['close'], saved['position'], cost_bps=config.backtest.cost_bps,
                        spread=saved['spread'], time=saved['time'], periods_per_year=config.backtest.periods_per_year)
  # The same float64 arithmetic on the same arrays: equal up to summation order (~1e-16 per step).
  assert summary['test_total_return'] == pytest.approx(result.metrics['total_return'], abs=1e-12)
  assert summary['flat_total_return'] == 0.0 and summary['num_updates'] == 4
  with open(os.path.join(rl_dir, 'metrics.json')) as f:
    metrics = json.load(f)
  # The cost model used is stated: the data's spread over the test span, the commission, and its source.
  cost = metrics['cost_model']
  assert cost['spread_source'].startswith('data') and cost['commission_source'] == 'backtest.cost_bps'
  assert cost['bars'] == summary['test_bars'] and cost['commission_bps'] == config.backtest.cost_bps
  # Mean of test-span spreads in float64: a few ulps of summation error.
  assert cost['mean_spread'] == pytest.approx(float(np.mean(saved['spread'])), rel=1e-12) and cost['mean_spread'] > 0
  with open(os.path.join(rl_dir, 'test', 'table.md')) as f:
    assert 'Costs (' in f.read()
  assert len(metrics['val_total_return_per_seed']) == 2
  assert metrics['chosen_seed'] == int(np.argmax(metrics['val_total_return_per_seed']))
  with open(os.path.join(rl_dir, 'train_metrics.jsonl')) as f:
    lines = [json.loads(line) for line in f]
  assert [line['update'] for line in lines] == [2, 4]
  for name in ('metrics.json', 'table.md', 'equity.png'):
    assert os.path.exists(os.path.join(rl_dir, 'test', name))
  params, meta = phase.load_policy(os.path.join(rl_dir, 'policy'))
  assert meta['num_features'] == len(meta['obs_mean']) and 'actor_0' in params['params']

  # The backtest phase replays exactly these PPO positions on the same test span, beside the baselines.
  bt_summary = backtest.run_phase(user, workdir)
  (symbol, policies), = bt_summary.items()
  assert policies['ppo']['total_return'] == pytest.approx(summary['test_total_return'], abs=1e-9)
  assert policies['flat']['total_return'] == 0.0 and policies['flat']['num_trades'] == 0
  assert set(policies) == {'ppo', 'supervised', 'momentum', 'linear', 'buy_and_hold', 'flat', 'random'}
  for name in ('metrics.json', 'table.md', 'equity.png'):
    assert os.path.exists(os.path.join(workdir, 'backtest', symbol, name))
  # One evaluator: the rl phase's test table and the backtest phase's are the same figures.
  with open(os.path.join(workdir, 'backtest', symbol, 'metrics.json')) as f:
    bt_metrics = json.load(f)
  with open(os.path.join(rl_dir, 'test', 'metrics.json')) as f:
    rl_metrics = json.load(f)
  assert set(bt_metrics) == set(rl_metrics)
  for name, m in bt_metrics.items():
    for key in ('total_return_ci', 'sharpe_ci', 'psr', 'dsr', 'verdict'):
      assert key in m, (name, key)
    assert m['total_return'] == pytest.approx(rl_metrics[name]['total_return'], abs=1e-9)
    assert m['verdict'] == rl_metrics[name]['verdict']
  assert bt_metrics['ppo']['trials'] == 2 and bt_metrics['supervised']['trials'] == 1

  # Resume: the finished checkpoint is restored, nothing is retrained, the agents are the same.
  env = env_lib.TradingEnv(meta['num_features'])
  rows = np.zeros((1200, meta['num_features']), np.float32)
  env_params = env_lib.make_params(rows, saved['close'][0] * np.ones(1200), train_end=1056, episode_length=8,
                                   start_low=1015)
  runner, _, info = phase.train_agents(config, env, env_params, rl_dir)
  assert info['env_steps_per_s'] is None and np.all(np.asarray(runner.update) == 4)
  restored = jax.tree.map(lambda x: np.asarray(x[meta['seed_index']]), runner.train_state.params)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  config.rl.total_timesteps = 8 * 16 * 6
  with pytest.raises(checkpoint.CheckpointError, match='other settings'):
    phase.train_agents(config, env, env_params, rl_dir)
