r"""Speed of the trading environment, of the fully jitted PPO loop, and of the rl phase's training loop on
1 and 2 cores; prints one JSON document.

  python experiments/bench_rl.py                                  # phase loop on 1 and 2 cores (~3-5 min)
  python experiments/bench_rl.py --envs=8,64,512,2048 --raw_steps=500   # plus the loop per env count and the env
  python experiments/bench_rl.py --cores=1,2 --phase_cores=         # the older thread/device scaling study

`phase` (issue 12): the rl phase's own training loop, `natron.rl.phase.train_agents` (checkpointed chunks,
metrics lines, the progress logger), on a synthetic market with the quick config's PPO (64 envs x 128 steps,
4 epochs, minibatches of 256, 2 seeds, chunks of 32 updates), timed with `rl.workers` = 1 (one worker process
on one core: the 1-core figure) and 2 (a worker per core), in alternating rounds in one run; plus
`in_process` (`rl.workers=0`: jax.vmap over seeds in this process with XLA's default threading, what the phase
did before). The rate is the phase's own `env_steps_per_s` (chunks after the first, which compiles), env steps
of every seed counted; the ratio is 2 cores / 1 core. Measured 2026-12-01 on 2 shared Intel Xeon vCPUs
(AVX-512, AMX), 3 alternating rounds, load average 4.2-5.8 from other jobs: 1 core 84.7k env steps/s, 2 cores
174.5k (2.06x), in_process 99.6k (medians; rounds 67.7-85.5k, 123.0-191.2k, 84.5-132.8k).

`scaling` (`--cores`, off by default): the study that found why 2 cores were slower than 1: each core count in
its own process pinned to that many cores (taskset) with as many XLA CPU devices, timing one agent
(`jax.jit(trainer.train)`) and one agent per device (`ppo.jit_over_seeds`), then one process per core.
One agent ran 0.8-0.9x as fast on 2 threads as on 1 (XLA hands its tiny ops to the second pool thread at a
loss); fake devices share one pool and barely overlap (~1x); separate processes scale (1.8-1.9x).

`ppo` (`--envs`): the full PPO loop (env + network + GAE + updates; MLP 2x64 tanh) in env steps per second at
each env count, compile time reported separately (the first call), the rate from a second, compiled call.
`env` (`--raw_steps`): the raw environment at 2048 envs through gymnax's `step` (auto-reset computed every
step) and through `step_env` (no reset), random actions, inside one jitted scan.
The market is a synthetic random walk with `--features` feature columns (77 = the quick model's 64-dim
embedding + 13 head probabilities; 269 for the full model's 256-dim one). Wall-clock rates are reported with
the machine's load average (shared machines: repeat when it is high).
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

import ml_collections  # pylint: disable=wrong-import-position

from configs import rl as rl_config  # pylint: disable=wrong-import-position
from experiments import machine  # pylint: disable=wrong-import-position
from natron.rl import phase as rl_phase  # pylint: disable=wrong-import-position
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
    # One thread: the pin (taskset) sizes XLA's pool; this makes dots single-threaded too. (jaxlib 0.10 has
    # no XLA flag for the pool size: `intra_op_parallelism_threads` is not one, XLA_FLAGS rejects it.)
    flags += ' --xla_cpu_multi_thread_eigen=false'
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=flags,
             PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get('PYTHONPATH', '')) if p))
  cmd = ['taskset', '-c', cpus, sys.executable, os.path.abspath(__file__), '--child', '--envs', args.envs or '64',
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


def bench_phase_once(env, params, workers: int, num_seeds: int, updates: int, chunk: int) -> dict:
  """One `train_agents` run (the rl phase's loop) into a fresh directory; its own env steps/s figure."""
  config = ml_collections.ConfigDict({'seed': 0, 'rl': rl_config.section(quick=True)})
  config.rl.update(num_envs=64, num_steps=128, update_epochs=4, minibatch_size=256, num_seeds=num_seeds,
                   total_timesteps=64 * 128 * updates, checkpoint_every=chunk, log_every=chunk,
                   workers=str(workers))
  load = machine.load_average()
  with tempfile.TemporaryDirectory() as out:
    t0 = time.perf_counter()
    _, _, info = rl_phase.train_agents(config, env, params, out)
    total = time.perf_counter() - t0
  return {'env_steps_per_s': info['env_steps_per_s'], 'total_s': round(total, 1), 'workers': info['workers'],
          'load_average_before': load, 'load_average_after': machine.load_average()}


def bench_phase(env, params, cores: list[int], rounds: int, updates: int, chunk: int, in_process: bool) -> dict:
  """The rl phase's loop with one worker per core for each count in `cores` (alternating rounds), plus the
  in-process vmap path; medians, every round kept."""
  num_seeds = max(cores)
  modes = {f'{c}_core{"s" if c > 1 else ""}': c for c in cores}
  if in_process:
    modes['in_process'] = 0
  runs = {m: [] for m in modes}
  for _ in range(rounds):
    for mode, workers in modes.items():
      runs[mode].append(bench_phase_once(env, params, workers, num_seeds, updates, chunk))
      print(json.dumps({mode: runs[mode][-1]}), file=sys.stderr, flush=True)
  out = {'num_envs': 64, 'num_steps': 128, 'num_seeds': num_seeds, 'updates_per_seed': updates,
         'chunk_updates': chunk, 'timed_env_steps': (updates - chunk) * 64 * 128 * num_seeds,
         'modes': {m: {'env_steps_per_s_median': round(float(np.median([r['env_steps_per_s'] for r in v]))),
                       'runs': v} for m, v in runs.items()}}
  if '1_core' in out['modes']:
    base = out['modes']['1_core']['env_steps_per_s_median']
    for mode, row in out['modes'].items():
      row['vs_1_core'] = round(row['env_steps_per_s_median'] / base, 2)
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
  parser.add_argument('--envs', default='', help='env counts for the PPO loop timing (e.g. 8,64,512,2048)')
  parser.add_argument('--updates', type=int, default=0, help='PPO updates per timing (0: ~262k env steps)')
  parser.add_argument('--features', type=int, default=77)
  parser.add_argument('--raw_steps', type=int, default=0, help='raw env steps at 2048 envs (e.g. 500)')
  parser.add_argument('--cores', default='', help='core counts for the thread/device scaling study (1,2)')
  parser.add_argument('--phase_cores', default='1,2', help="worker counts for the rl phase loop ('' to skip)")
  parser.add_argument('--phase_updates', type=int, default=128, help='updates per seed in each phase run')
  parser.add_argument('--phase_chunk', type=int, default=32, help='updates per chunk (the first compiles)')
  parser.add_argument('--phase_rounds', type=int, default=2)
  parser.add_argument('--in_process', type=int, default=1, help='also time rl.workers=0 (vmap, this process)')
  parser.add_argument('--rounds', type=int, default=3, help='alternating rounds in the scaling study')
  parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args()

  params = synthetic_params(20_000, args.features)
  env = env_lib.TradingEnv(args.features)
  if args.child:
    results = []
    for n in [int(x) for x in (args.envs or '64').split(',')]:
      updates = args.updates or max(2, 262_144 // (n * 128))
      results.append(bench_scaling(env, params, n, updates, args.rounds))
      print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(json.dumps(results))
    return
  results = {'machine': {'cpu_model': machine.cpu_model(), 'cpu_flags': machine.cpu_flags(),
                         'cpu_count': os.cpu_count(), 'platform': platform.platform(),
                         'jax': jax.__version__, 'devices': [str(d) for d in jax.devices()],
                         'load_average_at_start': [round(x, 2) for x in os.getloadavg()]},
             'obs_dim': env.obs_shape[0], 'hidden': [64, 64], 'num_steps': 128, 'update_epochs': 4,
             'minibatch_size': 256, 'ppo': [], 'env': []}
  if args.phase_cores:
    results['phase'] = bench_phase(env, params, [int(c) for c in args.phase_cores.split(',')],
                                   args.phase_rounds, args.phase_updates, args.phase_chunk, bool(args.in_process))
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
  for n in [int(x) for x in args.envs.split(',') if x]:
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
