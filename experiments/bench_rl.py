r"""Speed of the trading environment and of the fully jitted PPO loop; prints one JSON document.

  python experiments/bench_rl.py                       # full run (~5-8 min on 2 cores)
  python experiments/bench_rl.py --envs=8,64 --updates=2 --features=77
  python experiments/bench_rl.py --cores=1,2 --envs=64 --raw_steps=0     # core scaling only

Core scaling (issue 12): each `--cores` count runs in its own process pinned to that many cores (taskset),
with as many XLA CPU devices (`--xla_force_host_platform_device_count`), and times, alternating rounds:
- `one_agent`: one PPO agent, `jax.jit(trainer.train)` (on one core: the 1-core figure);
- `agents_over_devices`: one agent per device, `ppo.jit_over_seeds` (seeds vmapped, the seed axis sharded
  over the devices, no collectives);
then `processes`: as many processes as cores at once, each pinned to one core with one XLA thread, each
training one agent (the sum of their rates). env steps/s count every agent's steps. Measured 2026-12-01 on
2 shared Intel Xeon vCPUs (AMX; load average ~4 from other jobs, this run at nice -15), 64 envs:
1 core 110.5k env steps/s; 2 cores one_agent 93k, agents_over_devices 108k (the two device programs barely
overlap in jaxlib 0.10: they share one intra-op pool); 2 processes 197.7k (1.79x the 1-core rate).

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
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

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


def _trainer(env, params, num_envs: int, updates: int):
  config = rl_config.section()
  config.num_envs = num_envs
  config.num_steps = 128
  config.update_epochs = 4
  config.minibatch_size = 256
  config.total_timesteps = num_envs * 128 * updates
  return config, ppo.make_trainer(config, env, params, logger=False)


def bench_ppo(env, params, num_envs: int, updates: int) -> dict:
  config, trainer = _trainer(env, params, num_envs, updates)
  train = jax.jit(trainer.train)
  first, times, cpu = timed(train, jax.random.key(0), params)
  steps = trainer.num_updates * trainer.batch_size
  run_s, cpu_s = float(np.median(times)), float(np.median(cpu))
  return {'num_envs': num_envs, 'updates': trainer.num_updates, 'env_steps': steps,
          'minibatches_per_update': trainer.num_minibatches * config.update_epochs,
          'compile_s': round(max(first - run_s, 0.0), 2), 'run_s': round(run_s, 3),
          'env_steps_per_s': round(steps / run_s), 'env_steps_per_cpu_s': round(steps / cpu_s)}


def bench_scaling(env, params, num_envs: int, updates: int, rounds: int) -> dict:
  """one_agent vs agents_over_devices in this process, timed in alternating rounds (median, best)."""
  _, trainer = _trainer(env, params, num_envs, updates)
  n_dev = len(jax.devices())
  modes = {'one_agent': (jax.jit(trainer.train), jax.random.key(0), 1)}
  if n_dev > 1:
    modes['agents_over_devices'] = (ppo.jit_over_seeds(trainer.train, n_dev),
                                    jax.random.split(jax.random.key(0), n_dev), n_dev)
  compile_s, rates, cpu_rates = {}, {m: [] for m in modes}, {m: [] for m in modes}
  for mode, (fn, key, _) in modes.items():
    t0 = time.perf_counter()
    jax.block_until_ready(fn(key, params))
    compile_s[mode] = time.perf_counter() - t0
  steps = trainer.num_updates * trainer.batch_size
  for _ in range(rounds):
    for mode, (fn, key, agents) in modes.items():
      t0, c0 = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn(key, params))
      rates[mode].append(agents * steps / (time.perf_counter() - t0))
      cpu_rates[mode].append(agents * steps / max(time.process_time() - c0, 1e-9))
  return {'num_envs': num_envs, 'updates': trainer.num_updates, 'devices': n_dev,
          'modes': {m: {'agents': modes[m][2], 'env_steps_per_s_median': round(float(np.median(rates[m]))),
                        'env_steps_per_s_best': round(max(rates[m])),
                        'env_steps_per_cpu_s_median': round(float(np.median(cpu_rates[m]))),
                        'first_call_s': round(compile_s[m], 1)} for m in modes}}


def _child_cmd(cpus: str, devices: int, args):
  flags = f'--xla_force_host_platform_device_count={devices}'
  if ',' not in cpus:
    flags += ' --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1'
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=flags,
             PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get('PYTHONPATH', '')) if p))
  cmd = ['taskset', '-c', cpus, sys.executable, os.path.abspath(__file__), '--child', '--envs', args.envs,
         '--updates', str(args.updates), '--features', str(args.features), '--rounds', str(args.rounds)]
  return cmd, env, flags


def run_child(cores: int, args) -> dict:
  """bench_scaling for every --envs in a process pinned to `cores` cores with `cores` XLA CPU devices."""
  cmd, env, flags = _child_cmd(','.join(str(i) for i in range(cores)), cores, args)
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  if out.returncode:
    return {'cores': cores, 'error': out.stderr[-3000:]}
  return {'cores': cores, 'xla_flags': flags, 'load_average': [round(x, 2) for x in os.getloadavg()],
          'results': json.loads(out.stdout.strip().splitlines()[-1])}


def run_processes(cores: int, args) -> dict:
  """`cores` processes at once, each pinned to its own core with one thread, each training one agent (the
  way to use several CPU cores for PPO with jaxlib 0.10, see the module docstring). The sum of their
  one_agent rates is the machine's rate while they overlap (they compile and time the same work)."""
  procs = []
  for core in range(cores):
    cmd, env, _ = _child_cmd(str(core), 1, args)
    procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  outs = [p.communicate() for p in procs]
  if any(p.returncode for p in procs):
    return {'cores': cores, 'error': [o[1][-2000:] for o in outs]}
  per = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
  total = {}
  for results in per:
    for r in results:
      mode = r['modes']['one_agent']
      total.setdefault(str(r['num_envs']), []).append(mode['env_steps_per_s_median'])
  return {'cores': cores, 'processes': cores, 'load_average': [round(x, 2) for x in os.getloadavg()],
          'env_steps_per_s_per_process': total,
          'env_steps_per_s_total': {n: sum(v) for n, v in total.items()}}


def scaling_summary(children: list) -> dict:
  """Per env count: the best mode's median rate per core count, and N-core / 1-core."""
  by_cores = {c['cores']: {r['num_envs']: r for r in c.get('results', [])} for c in children}
  if 1 not in by_cores:
    return {}
  out = {}
  for n, one in by_cores[1].items():
    base = one['modes']['one_agent']['env_steps_per_s_median']
    row = {'1_core': base}
    for cores, results in by_cores.items():
      if cores == 1 or n not in results:
        continue
      best = max(results[n]['modes'].values(), key=lambda m: m['env_steps_per_s_median'])
      row[f'{cores}_cores_best'] = best['env_steps_per_s_median']
      row[f'{cores}_cores_one_agent'] = results[n]['modes']['one_agent']['env_steps_per_s_median']
      row[f'{cores}_vs_1_core'] = round(best['env_steps_per_s_median'] / base, 2)
    out[str(n)] = row
  return out


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
  parser.add_argument('--cores', default='1,2', help="core counts for the scaling study ('' to skip)")
  parser.add_argument('--rounds', type=int, default=3, help='alternating rounds in the scaling study')
  parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args()

  params = synthetic_params(20_000, args.features)
  env = env_lib.TradingEnv(args.features)
  if args.child:
    results = []
    for n in [int(x) for x in args.envs.split(',')]:
      updates = args.updates or max(2, 262_144 // (n * 128))
      results.append(bench_scaling(env, params, n, updates, args.rounds))
      print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(json.dumps(results))
    return
  results = {'machine': {'cpu_count': os.cpu_count(), 'platform': platform.platform(),
                         'jax': jax.__version__, 'devices': [str(d) for d in jax.devices()],
                         'load_average_at_start': [round(x, 2) for x in os.getloadavg()]},
             'obs_dim': env.obs_shape[0], 'hidden': [64, 64], 'num_steps': 128, 'update_epochs': 4,
             'minibatch_size': 256, 'ppo': [], 'env': []}
  if args.cores:
    results['scaling'] = [run_child(int(c), args) for c in args.cores.split(',')]
    for child in results['scaling']:
      print(json.dumps(child), file=sys.stderr, flush=True)
    results['scaling_summary'] = scaling_summary(results['scaling'])
    top = max(int(c) for c in args.cores.split(','))
    if top > 1:
      results['processes'] = run_processes(top, args)
      print(json.dumps(results['processes']), file=sys.stderr, flush=True)
      for n, total in results['processes']['env_steps_per_s_total'].items():
        row = results['scaling_summary'].get(n, {})
        row[f'{top}_processes'] = total
        if row.get('1_core'):
          row[f'{top}_processes_vs_1_core'] = round(total / row['1_core'], 2)
  for n in [int(x) for x in args.envs.split(',')] if not args.cores else []:
    updates = args.updates or max(2, 262_144 // (n * 128))
    results['ppo'].append(bench_ppo(env, params, n, updates))
    print(json.dumps(results['ppo'][-1]), file=sys.stderr)
  for via in ('step', 'step_env') if args.raw_steps else ():
    results['env'].append(bench_env(env, params, 2048, args.raw_steps, via))
    print(json.dumps(results['env'][-1]), file=sys.stderr)
  results['machine']['load_average_at_end'] = [round(x, 2) for x in os.getloadavg()]
  print(json.dumps(results, indent=2))


if __name__ == '__main__':
  main()
