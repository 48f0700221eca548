r"""Speed of the trading environment and of the fully jitted PPO loop; prints one JSON document.

  python experiments/bench_rl.py                       # full run (~3-5 min on 2 cores)
  python experiments/bench_rl.py --envs=8,64 --updates=2 --features=77

Measures (issue 6 section 5):
- full PPO loop (env + network + GAE + updates; MLP 2x64 tanh; 128 steps per env per update, 4 epochs,
  minibatches of 256) in env steps per second at 8, 64, 512 and 2048 parallel envs, with the compile time
  reported separately (the first call) and the rate taken from a second, already compiled call;
- the raw environment at 2048 envs: through gymnax's `step` (auto-reset computed every step) and through
  `step_env` (no reset), random actions, inside one jitted scan.
The market is a synthetic random walk with `--features` feature columns (77 = the quick model's 64-dim
embedding + 13 head probabilities; 269 for the full model's 256-dim one). Timings are medians; wall-clock rates
and process-CPU-time rates are both reported, with the machine's load average (shared machines).
"""
import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from configs import rl as rl_config  # pylint: disable=wrong-import-position
from natron.rl import env as env_lib  # pylint: disable=wrong-import-position
from natron.rl import ppo  # pylint: disable=wrong-import-position


def synthetic_params(num_bars: int, num_features: int, episode_length: int = 256) -> env_lib.EnvParams:
  rng = np.random.default_rng(0)
  close = 100 * np.exp(np.cumsum(rng.normal(0, 1e-3, num_bars)))
  features = rng.normal(size=(num_bars, num_features)).astype(np.float32)
  return env_lib.make_params(features, close, spread=np.full(num_bars, 0.005),
                             train_end=int(num_bars * 0.7), episode_length=episode_length,
                             reward_scale=1e3, pnl_scale=1e-3)


def timed(fn, *args, repeats: int = 1) -> tuple[float, list[float], list[float]]:
  """(first call incl. compile, [later wall times], [later process CPU times]) in seconds.

  CPU time (all threads of this process) is reported beside wall time because these machines are shared:
  under load, wall-clock rates fall while the CPU seconds the work needs stay roughly put.
  """
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  times, cpu = [], []
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  return first, times, cpu


def bench_ppo(env, params, num_envs: int, updates: int) -> dict:
  config = rl_config.section()
  config.num_envs = num_envs
  config.num_steps = 128
  config.update_epochs = 4
  config.minibatch_size = 256
  config.total_timesteps = num_envs * 128 * updates
  trainer = ppo.make_trainer(config, env, params, logger=False)
  train = jax.jit(trainer.train)
  first, times, cpu = timed(train, jax.random.key(0), params)
  steps = trainer.num_updates * trainer.batch_size
  run_s, cpu_s = float(np.median(times)), float(np.median(cpu))
  return {'num_envs': num_envs, 'updates': trainer.num_updates, 'env_steps': steps,
          'minibatches_per_update': trainer.num_minibatches * config.update_epochs,
          'compile_s': round(max(first - run_s, 0.0), 2), 'run_s': round(run_s, 3),
          'env_steps_per_s': round(steps / run_s), 'env_steps_per_cpu_s': round(steps / cpu_s)}


def bench_env(env, params, num_envs: int, num_steps: int, via: str) -> dict:
  step = env.step if via == 'step' else env.step_env

  @jax.jit
  def roll(key, params):
    obs, state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(key, num_envs), params)

    def body(carry, k):
      state, acc = carry
      k_act, k_env = jax.random.split(k)
      action = jax.random.randint(k_act, (num_envs,), 0, env_lib.NUM_ACTIONS)
      out = jax.vmap(step, in_axes=(0, 0, 0, None))(jax.random.split(k_env, num_envs), state, action, params)
      # Consume observation and reward so XLA cannot drop their computation.
      return (out[1], acc + out[2].sum() + out[0].sum()), None

    (state, acc), _ = jax.lax.scan(body, (state, jnp.zeros(())), jax.random.split(key, num_steps))
    return acc

  first, times, cpu = timed(roll, jax.random.key(1), params, repeats=3)
  run_s, cpu_s = float(np.median(times)), float(np.median(cpu))
  steps = num_envs * num_steps
  return {'via': via, 'num_envs': num_envs, 'steps': steps, 'compile_s': round(first - run_s, 2),
          'env_steps_per_s': round(steps / run_s), 'env_steps_per_cpu_s': round(steps / cpu_s)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--envs', default='8,64,512,2048')
  parser.add_argument('--updates', type=int, default=0, help='PPO updates per timing (0: ~262k env steps)')
  parser.add_argument('--features', type=int, default=77)
  parser.add_argument('--raw_steps', type=int, default=500)
  args = parser.parse_args()

  params = synthetic_params(20_000, args.features)
  env = env_lib.TradingEnv(args.features)
  results = {'machine': {'cpu_count': os.cpu_count(), 'platform': platform.platform(),
                         'jax': jax.__version__, 'devices': [str(d) for d in jax.devices()],
                         'load_average_at_start': [round(x, 2) for x in os.getloadavg()]},
             'obs_dim': env.obs_shape[0], 'hidden': [64, 64], 'num_steps': 128, 'update_epochs': 4,
             'minibatch_size': 256, 'ppo': [], 'env': []}
  for n in [int(x) for x in args.envs.split(',')]:
    updates = args.updates or max(2, 262_144 // (n * 128))
    results['ppo'].append(bench_ppo(env, params, n, updates))
    print(json.dumps(results['ppo'][-1]), file=sys.stderr)
  for via in ('step', 'step_env'):
    results['env'].append(bench_env(env, params, 2048, args.raw_steps, via))
    print(json.dumps(results['env'][-1]), file=sys.stderr)
  results['machine']['load_average_at_end'] = [round(x, 2) for x in os.getloadavg()]
  print(json.dumps(results, indent=2))


if __name__ == '__main__':
  main()
