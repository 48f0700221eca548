"""PPO seeds in worker processes, one per CPU core: how the rl phase uses several cores (issue 12).

  with SeedWorkers(config.rl, env.num_features, workers=2) as pool:     # processes start importing jax
    pool.start(env_params, initial_leaves(trainer, keys, env_params))   # (the init runs here meanwhile)
    runners, metrics = pool.run(32)          # every seed advanced 32 updates; lists indexed by seed

Why processes: one agent's PPO is a long chain of tiny ops (64-unit MLPs on minibatches of 256). In one process
XLA's CPU runtime hands ready ops to its other intra-op pool threads, and on 2 cores those hand-offs cost more
than the ops: one agent ran 0.8-0.9x as fast with 2 threads as with 1. Fake host devices
(`--xla_force_host_platform_device_count`, `ppo.jit_over_seeds`) share that one pool and their programs barely
overlap in jaxlib 0.10 (~1x). Whole agents on separate cores do scale: each worker here is pinned to one core
before jax starts (the CPU client sizes its thread pool from the affinity mask: one thread) and runs XLA with
`--xla_cpu_multi_thread_eigen=false` (single-threaded dots). Seeds are dealt round-robin to the workers.

Determinism: every seed starts from `jax.jit(trainer.init)` on ONE seed, computed by the parent (elementwise
random draws: the same bits whatever the parent's threads or devices), and runs the same program in every
worker (`jax.jit(lambda r, p: trainer.run(r, p, n))` on one seed, no vmap, one thread, the same XLA flags), so a
seed's numbers do not depend on how many workers there are nor which worker ran it: 1 or N workers give
bit-identical agents on the same machine (tests/test_rl_phase_cores.py). The in-process path (`workers=0`:
`jax.vmap` over seeds, the parent's threads) computes the same training with other float32 roundings.

Protocol: pickled messages; parent -> worker on the worker's stdin, worker -> parent on its original stdout
(the worker points fd 1 at stderr so a stray print cannot corrupt a message). A worker imports jax before it
reads anything, so its start-up overlaps the parent's initialisation. Parent: a 'setup' dict, then
('run', n) per chunk and ('stop',). Worker: ('ready',), then ('done', [per-seed runner leaves], [per-seed
metrics]) per chunk; ('error', traceback text) if anything raises. The runner state crosses as the flat list
of its numpy leaves: both sides build the same tree from the same config.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import traceback
from typing import Any, Sequence

import numpy as np

from natron.errors import UserError

# XLA flags every worker runs with (on top of the user's XLA_FLAGS, minus any host device count).
WORKER_XLA_FLAGS = ('--xla_cpu_multi_thread_eigen=false',)
# jax.config options copied from the parent to the workers (tests compile with fewer optimisations).
INHERITED_JAX_OPTIONS = ('jax_disable_most_optimizations',)


def usable_cores() -> list[int]:
  """The CPU cores this process may run on (its affinity mask; all of them where that is unknown)."""
  try:
    return sorted(os.sched_getaffinity(0))
  except AttributeError:   # not Linux
    return list(range(os.cpu_count() or 1))


# 'auto' starts workers only for runs long enough to repay their start-up: each worker imports jax and compiles
# its one-seed program single-threaded (~10-15 s on 2 cores). Measured on the 2-core Intel Xeon: in this process
# ~130k env steps/s, two workers ~175k together, so workers finish first once steps * (1/130k - 1/175k) > ~12 s,
# i.e. from ~6M env steps; 8M leaves a margin. The quick config (2 seeds x 1M) therefore trains in this process.
AUTO_MIN_ENV_STEPS = 8_000_000


def resolve_workers(setting: Any, num_seeds: int, backend: str, env_steps: int | None = None) -> int:
  """How many worker processes `rl.workers` asks for; 0 = train in this process (`jax.vmap` over seeds).

  'auto': on CPU one worker per usable core, at most one per seed (more cores than seeds cannot help: one
  agent does not speed up with threads), when that is at least two workers and the run (`env_steps` over all
  seeds; None: unknown, taken as long) has at least AUTO_MIN_ENV_STEPS; otherwise, and on a GPU/TPU, 0 (the
  accelerator runs all seeds in one program). An integer: that many CPU workers, capped at num_seeds (0: in
  this process, whatever the backend).
  """
  if setting is None or str(setting).strip().lower() in ('auto', ''):
    if backend != 'cpu':
      return 0
    n = min(len(usable_cores()), num_seeds)
    long_run = env_steps is None or env_steps >= AUTO_MIN_ENV_STEPS
    return n if n >= 2 and long_run else 0
  try:
    n = int(setting)
  except (TypeError, ValueError):
    raise UserError(f"rl.workers must be 'auto' or an integer >= 0, got {setting!r}.") from None
  if n < 0:
    raise UserError(f"rl.workers must be 'auto' or an integer >= 0, got {n}.")
  return min(n, num_seeds)


def worker_env(base_env: dict | None = None) -> dict:
  """The environment of a worker: CPU only, one host device, single-threaded dots, the user's other flags."""
  env = dict(os.environ if base_env is None else base_env)
  user = [f for f in env.get('XLA_FLAGS', '').split()
          if not f.startswith('--xla_force_host_platform_device_count') and f not in WORKER_XLA_FLAGS
          and not f.startswith('--xla_cpu_multi_thread_eigen')]
  env['XLA_FLAGS'] = ' '.join(user + list(WORKER_XLA_FLAGS))
  env['JAX_PLATFORMS'] = 'cpu'
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env['PYTHONPATH'] = os.pathsep.join(p for p in (root, env.get('PYTHONPATH', '')) if p)
  return env


def _host(tree):
  """jax arrays -> numpy (picklable without a device); Python scalars stay as they are (weak types kept)."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.map(lambda x: np.asarray(x) if isinstance(x, jax.Array) else x, tree)


class WorkerError(RuntimeError):
  """A PPO worker process failed; the message carries its traceback or exit status."""


def initial_leaves(trainer, keys, env_params) -> list[list[np.ndarray]]:
  """Per seed, the flat numpy leaves of `jax.jit(trainer.init)(key, env_params)` (one seed per call)."""
  import jax  # pylint: disable=g-import-not-at-top
  init = jax.jit(trainer.init)
  return [[np.asarray(x) for x in jax.tree.leaves(init(key, env_params))] for key in np.asarray(keys)]


class SeedWorkers:
  """`workers` processes training `num_seeds` PPO seeds between them, chunk by chunk, each pinned to a core.

  The constructor starts the processes (they import jax meanwhile); `start(env_params, runner_leaves)` hands
  them the market and each seed's runner state (per-seed lists of leaves: `initial_leaves`, or a resumed
  checkpoint's); `run(n)` advances every seed n updates and returns (per-seed runner leaves, per-seed metrics
  {name: [n]}), both as lists in seed order. rl_config: the `config.rl` block (a ConfigDict or dict).
  """

  def __init__(self, rl_config, num_features: int, *, workers: int, num_seeds: int | None = None,
               cores: Sequence[int] | None = None):
    import jax  # pylint: disable=g-import-not-at-top
    self.num_seeds = int(num_seeds if num_seeds is not None else rl_config['num_seeds'])
    if not 1 <= workers <= self.num_seeds:
      raise ValueError(f'workers must be in [1, {self.num_seeds}], got {workers}.')
    cores = list(cores if cores is not None else usable_cores())
    self.seeds = [list(range(w, self.num_seeds, workers)) for w in range(workers)]
    # Pin only when there is a core per worker; otherwise let the OS share the cores out (still one thread
    # per worker: the affinity at start-up sizes the pool, see worker_main).
    self.cores = [cores[w] if workers <= len(cores) else cores[w % len(cores)] for w in range(workers)]
    self.rl = rl_config.to_dict() if hasattr(rl_config, 'to_dict') else dict(rl_config)
    self.num_features = int(num_features)
    self.options = {k: jax.config.read(k) for k in INHERITED_JAX_OPTIONS}
    self.procs = []
    try:
      for core in self.cores:
        self.procs.append(subprocess.Popen([sys.executable, '-m', 'natron.rl.workers', str(core)],
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=worker_env()))
    except BaseException:
      self.close()
      raise

  def start(self, env_params, runner_leaves: Sequence[list]) -> None:
    """Sends each worker the market and its seeds' runner leaves; returns once all are ready to train."""
    if len(runner_leaves) != self.num_seeds:
      raise ValueError(f'{len(runner_leaves)} runner states for {self.num_seeds} seeds.')
    params = _host(env_params)
    for proc, seeds in zip(self.procs, self.seeds):
      self._send(proc, {'rl': self.rl, 'num_features': self.num_features, 'env_params': params,
                        'jax_options': self.options, 'runners': [runner_leaves[s] for s in seeds]})
    for proc in self.procs:
      self._expect(proc, 'ready')

  # --- messages -----------------------------------------------------------------------------------------
  @staticmethod
  def _send(proc, message) -> None:
    try:
      pickle.dump(message, proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
      proc.stdin.flush()
    except (BrokenPipeError, OSError):
      raise WorkerError(f'rl: PPO worker {proc.pid} exited (status {proc.poll()}); see its messages above.'
                        ) from None

  @staticmethod
  def _expect(proc, tag: str):
    try:
      message = pickle.load(proc.stdout)
    except (EOFError, pickle.UnpicklingError, OSError):
      raise WorkerError(f'rl: PPO worker {proc.pid} exited (status {proc.wait()}); see its messages above.'
                        ) from None
    if message[0] == 'error':
      raise WorkerError(f'rl: PPO worker {proc.pid} failed:\n{message[1]}')
    if message[0] != tag:
      raise WorkerError(f'rl: PPO worker {proc.pid} sent {message[0]!r}, expected {tag!r}.')
    return message[1:]

  # --- training -----------------------------------------------------------------------------------------
  def run(self, updates: int) -> tuple[list, list]:
    """Every seed advances `updates` updates (the workers in parallel); (runner leaves, metrics) per seed."""
    for proc in self.procs:
      self._send(proc, ('run', int(updates)))
    runners, metrics = [None] * self.num_seeds, [None] * self.num_seeds
    for proc, seeds in zip(self.procs, self.seeds):
      leaves, mets = self._expect(proc, 'done')
      for s, r, m in zip(seeds, leaves, mets):
        runners[s], metrics[s] = r, m
    return runners, metrics

  def close(self) -> None:
    for proc in self.procs:
      try:
        if proc.poll() is None:
          self._send(proc, ('stop',))
          proc.stdin.close()
      except (WorkerError, OSError):
        pass
    for proc in self.procs:
      try:
        proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
      for f in (proc.stdin, proc.stdout):
        try:
          f.close()
        except OSError:
          pass
    self.procs = []

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# ================================================================================================= worker
def worker_main(core: int) -> None:
  """A worker's life: pin to `core`, start jax (one pool thread), build the trainer, run chunks on request."""
  try:
    os.sched_setaffinity(0, {core})   # before jax starts: the CPU client sizes its pool from this mask
  except (AttributeError, OSError):
    pass
  out = os.fdopen(os.dup(1), 'wb')
  os.dup2(2, 1)                       # stray prints go to stderr, never into the message stream
  stdin = sys.stdin.buffer

  def send(message):
    pickle.dump(message, out, protocol=pickle.HIGHEST_PROTOCOL)
    out.flush()

  try:
    import jax  # pylint: disable=g-import-not-at-top
    import ml_collections  # pylint: disable=g-import-not-at-top
    from natron.rl import env as env_lib  # pylint: disable=g-import-not-at-top
    from natron.rl import ppo  # pylint: disable=g-import-not-at-top
    try:
      setup = pickle.load(stdin)
    except EOFError:   # the parent gave up before handing over any work
      return
    if not isinstance(setup, dict):   # ('stop',) before any work
      return
    for key, value in setup['jax_options'].items():
      jax.config.update(key, value)
    env = env_lib.TradingEnv(setup['num_features'])
    trainer = ppo.make_trainer(ml_collections.ConfigDict(setup['rl']), env, logger=False)
    env_params = jax.device_put(setup['env_params'])
    treedef = jax.tree.structure(jax.eval_shape(trainer.init, jax.random.PRNGKey(0), env_params))
    runners = [jax.tree.unflatten(treedef, [jax.device_put(x) for x in leaves]) for leaves in setup['runners']]
    send(('ready',))
    compiled = {}
    while True:
      try:
        command = pickle.load(stdin)
      except EOFError:
        return
      if command[0] == 'stop':
        return
      n = int(command[1])
      if n not in compiled:
        compiled[n] = jax.jit(lambda r, p, n=n: trainer.run(r, p, n))
      metrics = []
      for i, runner in enumerate(runners):
        runners[i], m = compiled[n](runner, env_params)
        metrics.append(m)
      send(('done', [[np.asarray(x) for x in jax.tree.leaves(r)] for r in runners], jax.device_get(metrics)))
  except BaseException:   # pylint: disable=broad-except
    try:
      send(('error', traceback.format_exc()))
    except Exception:   # pylint: disable=broad-except
      pass
    raise


if __name__ == '__main__':
  worker_main(int(sys.argv[1]))
