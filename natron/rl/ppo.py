"""PPO in one `jax.jit` (PureJaxRL structure) for `natron.rl.env.TradingEnv`.

  trainer = make_trainer(config.rl, env, env_params)        # sizes derived here, outside any trace
  out = jax.jit(trainer.train)(jax.random.key(0), env_params)
  outs = jax.jit(jax.vmap(trainer.train, in_axes=(0, None)))(jax.random.split(key, 4), env_params)  # 4 seeds
  outs = jit_over_seeds(trainer.train, 4)(jax.random.split(key, 4), env_params)   # seeds over GPUs

Inside `train`: one `lax.scan` over updates; each update is a scan over `num_steps` vectorised env steps, a
reverse scan for GAE, and a scan over `update_epochs` epochs holding a scan over shuffled minibatches.
gymnax 1.x auto-resets and reports `terminated` and `truncated` separately plus `info['final_observation']`:
at a truncation (the episode's time limit) the return is bootstrapped with the value of the final
observation; only a true termination cuts the bootstrap (`compute_gae`).

Parallelism (issue 12): one agent's PPO is a long chain of tiny ops (64-unit MLPs on minibatches of 256),
too small to split across threads: XLA's CPU runtime hands ready ops to its other pool threads, and those
hand-offs cost more than the ops, so one process with 2 threads ran slower than with 1 (0.79-0.9x measured).
Cores pay off across agents instead. On CPU the rl phase runs seeds in worker processes, one per core, each
pinned with one XLA thread (`natron.rl.workers`; 'rl.workers'): ~1.9x the 1-core rate on 2 cores.
`jit_over_seeds` vmaps seeds and shards the seed axis over devices (no collectives: each device runs whole
agents): that spreads seeds over GPUs, but on CPU with jaxlib 0.10 fake host devices
(`--xla_force_host_platform_device_count`) share one intra-op pool and their PPO programs barely overlap
(measured ~1x), so it is not the CPU path.

Market arrays reach the jitted function as the `env_params` argument (not closed over: closed-over arrays
would become constants of the compiled program). `make_train(config, env, env_params)` returns
`train(rng, env_params=None)`; with None it falls back to the params given here, which is fine for small
arrays and tests.
"""
from __future__ import annotations

import functools
import time
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax.training import train_state as flax_train_state

from natron.errors import UserError
from natron.rl import env as env_lib


# ============================================================================================= network
class ActorCritic(nn.Module):
  """Separate actor and critic MLPs over the observation [.., obs_dim] -> (logits [.., A], value [..])."""
  num_actions: int
  hidden: Sequence[int] = (64, 64)
  activation: str = 'tanh'

  def setup(self):
    act = {'tanh': nn.tanh, 'relu': nn.relu, 'gelu': nn.gelu}[self.activation]
    zeros = nn.initializers.zeros_init()

    def scaled(gain):
      # PureJaxRL uses orthogonal(gain); its LAPACK QR, batched by vmap over seeds inside the jitted
      # training, deadlocks jaxlib's CPU thread pool on 2-core machines (both pool threads wait in
      # ParallelBatchMap for work only they could run). Variance scaling with the same gain gives weights of
      # the same scale (E[W W^T] = gain^2 I / fan_in ~ the orthogonal init's) and needs no QR.
      return nn.initializers.variance_scaling(gain**2, 'fan_in', 'truncated_normal')

    def mlp(out, out_scale, name):
      layers = []
      for i, h in enumerate(self.hidden):
        layers += [nn.Dense(h, kernel_init=scaled(np.sqrt(2)), bias_init=zeros, name=f'{name}_{i}'), act]
      layers.append(nn.Dense(out, kernel_init=scaled(out_scale), bias_init=zeros, name=f'{name}_out'))
      return nn.Sequential(layers)

    # Small final actor init: the initial policy is near uniform (standard PPO practice).
    self.actor = mlp(self.num_actions, 0.01, 'actor')
    self.critic = mlp(1, 1.0, 'critic')

  def __call__(self, obs):
    return self.actor(obs), self.critic(obs)[..., 0]

  def value(self, obs):
    return self.critic(obs)[..., 0]


def make_network(config) -> ActorCritic:
  return ActorCritic(num_actions=env_lib.NUM_ACTIONS, hidden=tuple(config.hidden),
                     activation=config.activation)


# ================================================================================================ GAE
def compute_gae(rewards, values, next_values, terminated, dones, gamma: float, gae_lambda: float):
  """Generalised advantage estimation over a rollout, truncation-aware.

  All inputs are [T, N] (time-major). `next_values[t]` is the value of the observation reached by step t
  BEFORE any auto-reset (gymnax's `info['final_observation']`): at a truncation it bootstraps the cut-off
  return, and it is ignored only at a true termination. `dones` (terminated or truncated) stops the
  advantage from flowing back across an episode boundary.

    delta[t] = r[t] + gamma * (1 - terminated[t]) * next_values[t] - values[t]
    A[t]     = delta[t] + gamma * lambda * (1 - dones[t]) * A[t+1],   A[T] = 0

  Returns (advantages [T, N], value targets = advantages + values [T, N]).
  """
  not_term = 1.0 - terminated.astype(values.dtype)
  not_done = 1.0 - dones.astype(values.dtype)

  def body(gae, x):
    r, v, nv, nt, nd = x
    delta = r + gamma * nt * nv - v
    gae = delta + gamma * gae_lambda * nd * gae
    return gae, gae

  _, advantages = jax.lax.scan(body, jnp.zeros_like(values[0]),
                               (rewards, values, next_values, not_term, not_done), reverse=True)
  return advantages, advantages + values


# ============================================================================================ trainer
class Transition(NamedTuple):
  obs: jax.Array         # [N, obs_dim]
  action: jax.Array      # [N] int32
  log_prob: jax.Array    # [N]
  value: jax.Array       # [N]
  next_value: jax.Array  # [N] value of the final observation of the step (before auto-reset)
  reward: jax.Array      # [N]
  terminated: jax.Array  # [N] bool
  done: jax.Array        # [N] bool: terminated or truncated
  net_return: jax.Array  # [N] net-of-cost simple return of the step
  net_profit: jax.Array  # [N] episode's net return so far (read where done)


class Batch(NamedTuple):
  """What the PPO loss reads, per sample ([B, ...] after flattening time and envs)."""
  obs: jax.Array
  action: jax.Array
  log_prob: jax.Array     # behaviour policy's log-probability of `action`
  value: jax.Array        # critic's value at collection time (for value clipping)
  advantage: jax.Array
  target: jax.Array       # value target = advantage + value


class RunnerState(NamedTuple):
  train_state: flax_train_state.TrainState
  env_state: env_lib.EnvState
  obs: jax.Array
  rng: jax.Array
  update: jax.Array      # updates done so far (int32 scalar)


class Trainer(NamedTuple):
  """The pieces of one PPO run, all pure; `train` = `init` then `run` over every update."""
  network: ActorCritic
  num_updates: int
  num_minibatches: int
  batch_size: int
  init: Callable[..., RunnerState]           # (rng, env_params) -> RunnerState
  run: Callable[..., tuple]                  # (runner, env_params, num_updates) -> (runner, metrics)
  train: Callable[..., dict]                 # (rng, env_params=None) -> {'runner_state', 'metrics'}
  evaluate: Callable[..., jax.Array]         # (params, env_params, start, end) -> greedy positions


def _sizes(config) -> tuple[int, int, int]:
  for key in ('num_envs', 'num_steps', 'minibatch_size', 'update_epochs', 'log_every'):
    if int(config[key]) < 1:
      raise UserError(f'rl.{key} must be a positive integer, got {config[key]}.')
  batch = int(config.num_envs) * int(config.num_steps)
  if batch % int(config.minibatch_size):
    raise UserError(f'rl.num_envs * rl.num_steps = {batch} must be a multiple of rl.minibatch_size = '
                    f'{config.minibatch_size}.')
  num_updates = int(config.total_timesteps) // batch
  if num_updates < 1:
    raise UserError(f'rl.total_timesteps = {config.total_timesteps} is less than one update '
                    f'(num_envs * num_steps = {batch}).')
  return batch, batch // int(config.minibatch_size), num_updates


def make_optimizer(config, num_updates: int, num_minibatches: int) -> optax.GradientTransformation:
  steps = num_updates * int(config.update_epochs) * num_minibatches
  lr = (optax.linear_schedule(float(config.lr), 0.0, steps) if config.anneal_lr else float(config.lr))
  return optax.chain(optax.clip_by_global_norm(float(config.max_grad_norm)), optax.adam(lr, eps=1e-5))


def make_trainer(config, env: env_lib.TradingEnv, env_params: env_lib.EnvParams | None = None,
                 *, logger: Callable | None = None) -> Trainer:
  """Builds the pure PPO functions for `config` (the `config.rl` block; keys in configs/rl.py).

  `logger(update, metrics)` runs on the host every `config.log_every` updates (via `jax.debug.callback`);
  the default logs a progress line with env steps/s and ETA. Pass `logger=False` for silence.
  """
  batch, num_minibatches, num_updates = _sizes(config)
  num_envs, num_steps = int(config.num_envs), int(config.num_steps)
  epochs, mb_size = int(config.update_epochs), int(config.minibatch_size)
  gamma, lam = float(config.gamma), float(config.gae_lambda)
  clip_eps, vf_coef, ent_coef = float(config.clip_eps), float(config.vf_coef), float(config.ent_coef)
  clip_value = bool(config.clip_value)
  log_every = int(config.log_every)
  network = make_network(config)
  tx = make_optimizer(config, num_updates, num_minibatches)
  if logger is None:
    logger = ProgressLogger(num_updates=num_updates, steps_per_update=batch,
                            num_seeds=int(config.get('num_seeds', 1)))
  default_env_params = env_params
  vstep = jax.vmap(env.step, in_axes=(0, 0, 0, None))
  vreset = jax.vmap(env.reset, in_axes=(0, None))

  def init(rng, env_params) -> RunnerState:
    rng, k_net, k_env = jax.random.split(rng, 3)
    params = network.init(k_net, jnp.zeros(env.obs_shape, jnp.float32))
    ts = flax_train_state.TrainState.create(apply_fn=network.apply, params=params, tx=tx)
    obs, env_state = vreset(jax.random.split(k_env, num_envs), env_params)
    return RunnerState(ts, env_state, obs, rng, jnp.zeros((), jnp.int32))

  # --- loss -------------------------------------------------------------------------------------------
  def loss_fn(params, mb: Batch):
    logits, value = network.apply(params, mb.obs)
    log_probs = jax.nn.log_softmax(logits)
    log_prob = jnp.take_along_axis(log_probs, mb.action[:, None], axis=1)[:, 0]
    adv, targets = mb.advantage, mb.target
    entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1).mean()
    if clip_value:
      v_clipped = mb.value + jnp.clip(value - mb.value, -clip_eps, clip_eps)
      v_loss = 0.5 * jnp.maximum((value - targets) ** 2, (v_clipped - targets) ** 2).mean()
    else:
      v_loss = 0.5 * ((value - targets) ** 2).mean()
    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    log_ratio = log_prob - mb.log_prob
    ratio = jnp.exp(log_ratio)
    pg_loss = -jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - clip_eps, 1 + clip_eps) * adv).mean()
    total = pg_loss + vf_coef * v_loss - ent_coef * entropy
    stats = {'loss/policy': pg_loss, 'loss/value': v_loss, 'entropy': entropy,
             'approx_kl': ((ratio - 1) - log_ratio).mean(),
             'clip_frac': (jnp.abs(ratio - 1) > clip_eps).mean()}
    return total, stats

  def minibatch_step(ts, mb):
    grads, stats = jax.grad(loss_fn, has_aux=True)(ts.params, mb)
    stats['grad_norm'] = optax.global_norm(grads)
    return ts.apply_gradients(grads=grads), stats

  def epoch_step(carry, _):
    ts, rng, data = carry
    rng, k = jax.random.split(rng)
    perm = jax.random.permutation(k, batch)
    mbs = jax.tree.map(lambda x: jnp.take(x, perm, axis=0).reshape((num_minibatches, mb_size) + x.shape[1:]),
                       data)
    ts, stats = jax.lax.scan(minibatch_step, ts, mbs)
    return (ts, rng, data), stats

  def run(runner: RunnerState, env_params, n_updates: int):
    """Runs `n_updates` (a Python int) updates; returns (runner, metrics dict of [n_updates] arrays).

    Chunks compose: `run(run(r, p, a)[0], p, b)` equals `run(r, p, a + b)` (the learning-rate schedule reads
    the optimizer's step count, which lives in the runner state). Logging fires on chunk-local update
    numbers, so keep chunk sizes multiples of `log_every`.
    """

    # --- rollout: num_steps vectorised env steps ------------------------------------------------------
    def env_step(carry, _):
      ts, env_state, obs, rng = carry
      rng, k_act, k_env = jax.random.split(rng, 3)
      logits, value = network.apply(ts.params, obs)
      action = jax.random.categorical(k_act, logits)
      log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits), action[:, None], axis=1)[:, 0]
      next_obs, env_state, reward, terminated, truncated, info = vstep(
          jax.random.split(k_env, num_envs), env_state, action, env_params)
      # Value of the observation the step reached before gymnax's auto-reset: the truncation bootstrap.
      next_value = network.apply(ts.params, info['final_observation'], method='value')
      tr = Transition(obs, action, log_prob, value, next_value, reward, terminated,
                      terminated | truncated, info['net_return'], info['net_profit'])
      return (ts, env_state, next_obs, rng), tr

    # --- one update: rollout, GAE, epochs of minibatch steps -------------------------------------------
    def update_step(runner, local_idx):
      (ts, env_state, obs, rng), traj = jax.lax.scan(
          env_step, (runner.train_state, runner.env_state, runner.obs, runner.rng), None, num_steps)
      adv, targets = compute_gae(traj.reward, traj.value, traj.next_value, traj.terminated, traj.done,
                                 gamma, lam)
      # Only what the loss reads is shuffled into minibatches.
      flat = jax.tree.map(lambda x: x.reshape((batch,) + x.shape[2:]),
                          Batch(traj.obs, traj.action, traj.log_prob, traj.value, adv, targets))
      rng, k_epochs = jax.random.split(rng)
      (ts, _, _), stats = jax.lax.scan(epoch_step, (ts, k_epochs, flat), None, epochs)
      metrics = {k: v.mean() for k, v in stats.items()}
      metrics.update(rollout_metrics(traj))
      runner = RunnerState(ts, env_state, obs, rng, runner.update + 1)
      if logger:
        # `local_idx` comes from the scan's xs, never batched under vmap over seeds, so `cond` stays a real
        # branch and the host is only called every `log_every` updates.
        jax.lax.cond((local_idx + 1) % log_every == 0,
                     lambda: jax.debug.callback(logger, runner.update, metrics),
                     lambda: None)
      return runner, metrics

    return jax.lax.scan(update_step, runner, jnp.arange(n_updates, dtype=jnp.int32))

  def train(rng, env_params=None) -> dict:
    env_params = env_params if env_params is not None else _require(default_env_params)
    runner = init(rng, env_params)
    runner, metrics = run(runner, env_params, num_updates)
    return {'runner_state': runner, 'metrics': metrics}

  return Trainer(network=network, num_updates=num_updates, num_minibatches=num_minibatches,
                 batch_size=batch, init=init, run=run, train=train,
                 evaluate=functools.partial(evaluate, network, env))


def seed_mesh(num_seeds: int, devices=None) -> jax.sharding.Mesh:
  """1-D mesh ('seed') over the largest number of `devices` (default: all) that divides `num_seeds`."""
  devices = list(devices if devices is not None else jax.devices())
  n = max(d for d in range(1, min(len(devices), num_seeds) + 1) if num_seeds % d == 0)
  return jax.sharding.Mesh(np.array(devices[:n]), ('seed',))


def jit_over_seeds(fn: Callable, num_seeds: int, *, devices=None, donate: bool = False) -> Callable:
  """`jax.jit(jax.vmap(fn, in_axes=(0, None)))` with the seed axis sharded over devices.

  `fn(per_seed, shared)`, e.g. `trainer.train(rng, env_params)` or `lambda r, p: trainer.run(r, p, n)`:
  the first argument carries a leading seed axis (split over the 'seed' mesh axis), the second (the market)
  is replicated, and every output keeps the seed axis, sharded. Seeds are independent, so the partitioned
  program has no collectives. Results equal the single-device vmap's (the same per-seed program). With one
  device this is the plain jit(vmap). Use it for several GPUs; on CPU see natron.rl.workers (processes).
  """
  mesh = seed_mesh(num_seeds, devices)
  per_seed = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('seed'))
  shared = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(jax.vmap(fn, in_axes=(0, None)), in_shardings=(per_seed, shared), out_shardings=per_seed,
                 donate_argnums=(0,) if donate else ())


def _require(env_params):
  if env_params is None:
    raise UserError('train(rng, env_params): no env_params given here nor to make_train.')
  return env_params


def make_train(config, env: env_lib.TradingEnv, env_params: env_lib.EnvParams | None = None,
               **kwargs) -> Callable[..., dict]:
  """PureJaxRL-style entry point: `train(rng, env_params=None) -> {'runner_state', 'metrics'}`."""
  return make_trainer(config, env, env_params, **kwargs).train


def rollout_metrics(traj: Transition) -> dict:
  """Per-update means over the rollout [T, N]: reward, net return per step, finished episodes' net profit."""
  done = traj.done.astype(jnp.float32)
  n_done = done.sum()
  pos = traj.action - 1
  return {
      'reward': traj.reward.mean(),
      'net_return_per_step': traj.net_return.mean(),
      'episode_net_profit': jnp.where(n_done > 0, (traj.net_profit * done).sum() / jnp.maximum(n_done, 1),
                                      jnp.nan),
      'episodes': n_done,
      'long_frac': (pos > 0).mean(),
      'short_frac': (pos < 0).mean(),
  }


# ========================================================================================== evaluation
def evaluate(network: ActorCritic, env: env_lib.TradingEnv, params, env_params: env_lib.EnvParams,
             start: int, end: int) -> jax.Array:
  """Greedy positions [end - start] (float32 in {-1, 0, 1}) walking bars start..end-1 from flat.

  positions[i] is decided at the close of bar start + i from observations of bars <= start + i only, and held
  to the next close (feed `close[start:end]` and these to `natron.backtest.run`). No episodes, no resets:
  the walk carries position, entry price and time in trade exactly as the environment does in training.
  `end` may be T (the series length): the last step's reward then reads a clamped index, but rewards are
  discarded here and each position depends only on observations of bars <= its own.
  Jit with `start`/`end` static (the scan length is end - start).
  """
  if not 0 <= start < end:
    raise UserError(f'evaluate needs 0 <= start < end, got [{start}, {end}).')

  def body(state, _):
    obs = env.get_obs(state, env_params)
    logits, _ = network.apply(params, obs)
    action = jnp.argmax(logits)
    _, state, _, _, info = env.step_env(jax.random.key(0), state, action, env_params)
    return state, info['position']

  _, positions = jax.lax.scan(body, env_lib.initial_state(start, env_params), None, end - start)
  return positions


# ============================================================================================= logging
class ProgressLogger:
  """Host-side progress lines from inside the jitted loop: update, env steps/s, ETA and the key metrics.

  Under `jax.vmap` over seeds the callback runs once per seed; calls for one update are averaged and
  logged once all `num_seeds` have arrived.
  """

  def __init__(self, num_updates: int, steps_per_update: int, num_seeds: int = 1, sink=None):
    self.num_updates, self.steps_per_update, self.num_seeds = num_updates, steps_per_update, num_seeds
    self.sink = sink or logging.info
    self.pending: dict[int, list] = {}
    self.t0 = None
    self.u0 = 0
    self.history: list[dict] = []

  def __call__(self, update, metrics: dict[str, Any]):
    update = int(update)
    self.pending.setdefault(update, []).append({k: float(v) for k, v in metrics.items()})
    if len(self.pending[update]) < self.num_seeds:
      return
    rows = self.pending.pop(update)
    mean = {k: float(np.nanmean([r[k] for r in rows])) if any(np.isfinite(r[k]) for r in rows) else
            float('nan') for k in rows[0]}
    now = time.time()
    if self.t0 is None:   # the first call comes after compilation: rates are measured from here
      self.t0, self.u0 = now, update
      rate, eta = float('nan'), float('nan')
    else:
      rate = (update - self.u0) * self.steps_per_update * self.num_seeds / max(now - self.t0, 1e-9)
      eta = (self.num_updates - update) * self.steps_per_update * self.num_seeds / rate
    self.history.append({'update': update, 'env_steps_per_s': rate, **mean})
    speed = (f'{rate:,.0f} env steps/s | ETA {eta:.0f} s' if np.isfinite(rate) else
             'env steps/s from the next line on (this one follows compilation)')
    self.sink(f'rl update {update}/{self.num_updates} | {speed} | '
              f'reward {mean["reward"]:.4f} | episode net profit {mean["episode_net_profit"]:+.4f} | '
              f'long {mean["long_frac"]:.2f} short {mean["short_frac"]:.2f} | '
              f'entropy {mean["entropy"]:.3f} kl {mean["approx_kl"]:.4f}')
