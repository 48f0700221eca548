"""A gymnax trading environment over per-bar market features (frozen encoder embeddings + head probabilities).

This module hides gymnax (1.0.1) from the rest of Natron: PPO talks to `TradingEnv`, `EnvParams`, `EnvState`
and `make_params` only.

Timing and costs (DESIGN.md rule 3, the same conventions as `natron.backtest.run`):
- At bar t the agent sees the market row `features[t]` (computed from bars <= t only), its position, the
  unrealised PnL of the open trade and the time spent in it, and picks a target position in {-1, 0, +1}
  (action 0 = short, 1 = flat, 2 = long).
- The trade executes at the close of bar t; the new position is held from close t to close t+1 and earns
  `position * log(close[t+1] / close[t])` (`log_ret[t+1]`).
- Every change of position pays, per unit traded, `cost_bps * 1e-4 + spread[t] / close[t] / 2` (commission
  plus half the quoted spread: a round trip crosses one spread), charged at bar t.
- reward = reward_scale * (position * log_ret[t+1] - cost * |change| - alpha * |change|
                          - beta * max(0, drawdown[t+1] - drawdown[t]))
  where drawdown = 1 - equity / peak equity of the episode. `reward_scale` only rescales (it does not change
  the optimal policy); it keeps per-bar rewards near unit size for the value network.
- `info['net_return']` is the simple return of the step net of costs, excluding the alpha/beta penalties:
  `position * (close[t+1]/close[t] - 1) - cost`, exactly `natron.backtest.run(...).net[t]`; `gross_return`
  and `cost` are its parts; `net_profit` is the episode's compounded net return so far (equity - 1).

Episodes start at a uniformly random bar in [start_low, start_high] and last `episode_length` steps; the
time limit is truncation (gymnax reports it as `truncated`, never `terminated`). `make_params` checks that
`start_high + episode_length + 1 <= train_end`, so a training episode never reads a bar at or past
`train_end` (its last reward uses close[start + episode_length], its final observation that bar's row).

Market arrays live in `EnvParams` and are passed to every call (never closed over, which would bake them into
the compiled program as constants); under `jax.vmap` over environments pass params with `in_axes=None` so
all environments share one copy.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from gymnax.environments import environment
from gymnax.environments import spaces

from natron.errors import UserError

ACTION_POSITIONS = (-1, 0, 1)   # action index -> target position
NUM_ACTIONS = len(ACTION_POSITIONS)
NUM_AGENT_FEATURES = 5          # position one-hot (3), unrealised PnL, time in trade
PNL_CLIP = 10.0                 # unrealised PnL in units of `pnl_scale`, clipped: keeps observations bounded


@struct.dataclass(kw_only=True)
class EnvParams:
  """Market data and the reward's knobs. Arrays are [T] or [T, D] over the whole series (all splits).

  features: [T, D] float32 market row per bar (normalised with training-span statistics by the caller).
  close: [T] float32 close prices (> 0).
  spread: [T] float32 quoted spread in price units (the rl phase passes natron.backtest.resolve_costs' spread;
    `make_params(spread=None)` means zero, for library callers only).
  log_ret: [T] float32 backward log returns, log_ret[t] = log(close[t] / close[t-1]), log_ret[0] = 0,
    computed in float64 on the host (float32 differences of log prices lose digits).
  """
  features: jax.Array
  close: jax.Array
  spread: jax.Array
  log_ret: jax.Array
  cost_bps: float = 1.0
  alpha: float = 0.0           # turnover penalty per unit traded (return units)
  beta: float = 0.0            # penalty per unit increase of the episode's fractional drawdown
  reward_scale: float = 1.0
  pnl_scale: float = 1.0       # unrealised log PnL is observed in these units (e.g. per-bar sigma)
  episode_length: int = 256
  start_low: int = 0
  start_high: int = 0

  @property
  def max_steps_in_episode(self):
    """gymnax's name for the time limit (read by `Environment.is_truncated`)."""
    return self.episode_length


@struct.dataclass
class EnvState:
  """One environment's state; every field is a scalar."""
  time: jax.Array            # steps taken in this episode (gymnax's time limit reads it)
  bar: jax.Array             # current bar index t into the market arrays
  position: jax.Array        # float32 in {-1, 0, 1}: position held from close t-1 to close t
  entry_price: jax.Array     # close at which the open trade was entered (close[t] when flat)
  bars_in_trade: jax.Array   # bars since the open trade was entered (0 when flat)
  equity: jax.Array          # compounded net equity of the episode, starting at 1
  peak_equity: jax.Array
  net_profit: jax.Array      # equity - 1: the episode's net return so far


def make_params(features, close, *, spread=None, train_end: int, episode_length: int, start_low: int = 0,
                cost_bps: float = 1.0, alpha: float = 0.0, beta: float = 0.0, reward_scale: float = 1.0,
                pnl_scale: float = 1.0) -> EnvParams:
  """Validates host arrays and builds `EnvParams` for training episodes inside [start_low, train_end).

  Args:
    features: [T, D] market rows; rows in [start_low, train_end) must be finite.
    close: [T] close prices > 0.
    spread: optional [T] spread in price units.
    train_end: first bar NOT available to training episodes (exclusive end of the training span).
    episode_length: steps per episode; episodes start in [start_low, train_end - episode_length - 1].
  """
  features = np.asarray(features, dtype=np.float32)
  close64 = np.asarray(close, dtype=np.float64)
  if features.ndim != 2 or close64.ndim != 1 or features.shape[0] != close64.shape[0]:
    raise UserError(f'features must be [T, D] and close [T] with the same T; got {features.shape} and '
                    f'{close64.shape}.')
  t = close64.shape[0]
  if not np.all(np.isfinite(close64)) or (close64 <= 0).any():
    raise UserError('close must be finite and > 0 everywhere.')
  spread64 = np.zeros(t) if spread is None else np.asarray(spread, dtype=np.float64)
  if spread64.shape != (t,) or not np.all(np.isfinite(spread64)) or (spread64 < 0).any():
    raise UserError(f'spread must be [T]={t} finite values >= 0.')
  if not 0 < train_end <= t:
    raise UserError(f'train_end={train_end} must be in (0, {t}].')
  if episode_length < 1:
    raise UserError(f'episode_length must be >= 1, got {episode_length}.')
  start_high = train_end - episode_length - 1
  if start_high < start_low:
    raise UserError(f'The training span [{start_low}, {train_end}) has {train_end - start_low} bars: too '
                    f'short for episodes of {episode_length} steps (needs episode_length + 1 bars).')
  if not np.all(np.isfinite(features[start_low:train_end])):
    raise UserError(f'features have non-finite values inside the training span [{start_low}, {train_end}).')
  log_ret = np.zeros(t)
  log_ret[1:] = np.log(close64[1:] / close64[:-1])
  return EnvParams(features=jnp.asarray(features), close=jnp.asarray(close64, jnp.float32),
                   spread=jnp.asarray(spread64, jnp.float32), log_ret=jnp.asarray(log_ret, jnp.float32),
                   cost_bps=float(cost_bps), alpha=float(alpha), beta=float(beta),
                   reward_scale=float(reward_scale), pnl_scale=float(pnl_scale),
                   episode_length=int(episode_length), start_low=int(start_low), start_high=int(start_high))


class TradingEnv(environment.Environment[EnvState, EnvParams]):
  """Discrete(3) target-position trading over shared market arrays (see the module docstring)."""

  def __init__(self, num_features: int):
    super().__init__()
    self.num_features = int(num_features)
    self.obs_shape = (self.num_features + NUM_AGENT_FEATURES,)

  @property
  def default_params(self) -> EnvParams:
    raise UserError('TradingEnv has no default market: build params with natron.rl.env.make_params(...).')

  # --- transitions ------------------------------------------------------------------------------------
  @functools.partial(jax.jit, static_argnames=('self',))
  def step(self, key: jax.Array, state: EnvState, action: int | jax.Array, params: EnvParams | None = None
           ) -> tuple[jax.Array, EnvState, jax.Array, jax.Array, jax.Array, dict[str, Any]]:
    """gymnax 1.x `Environment.step`, same contract, cheaper: (obs, state, reward, terminated, truncated, info).

    Steps, then auto-resets where the episode ended (terminated or truncated); `info['final_observation']` is
    the observation the step reached before any reset (what PPO bootstraps from at a truncation). Unlike the
    base class it selects between the stepped and the reset STATE (a few scalars) and builds the observation
    once from the selected state, instead of building both observations and selecting between vectors; and
    it hands the whole key to the reset, since `step_env` is deterministic. Results are identical in law.
    """
    if params is None:
      params = self.default_params
    obs_st, state_st, reward, terminated, info = self.step_env(key, state, action, params)
    truncated = self.is_truncated(state_st, params)
    done = jnp.logical_or(terminated, truncated)
    state_re = self.reset_state(key, params)
    state = jax.tree.map(lambda re, st: jax.lax.select(done, re, st), state_re, state_st)
    obs = self.get_obs(state, params)
    info = {**info, 'terminated': terminated, 'truncated': truncated, 'final_observation': obs_st}
    return obs, state, reward, terminated, truncated, info

  def step_env(self, key: jax.Array, state: EnvState, action: int | jax.Array, params: EnvParams
               ) -> tuple[jax.Array, EnvState, jax.Array, jax.Array, dict[str, Any]]:
    """One bar: trade to the target at close t, hold to close t+1; returns (obs, state, reward, term, info)."""
    del key
    t = state.bar
    new_pos = jnp.asarray(action, jnp.float32) - 1.0
    change = jnp.abs(new_pos - state.position)
    close_t = params.close[t]
    unit_cost = params.cost_bps * 1e-4 + 0.5 * params.spread[t] / close_t
    cost = change * unit_cost
    next_log_ret = params.log_ret[t + 1]
    gross_log = new_pos * next_log_ret
    gross_return = new_pos * jnp.expm1(next_log_ret)
    net_return = gross_return - cost
    equity = state.equity * (1.0 + net_return)
    peak = jnp.maximum(state.peak_equity, equity)
    drawdown_increase = jnp.maximum(0.0, state.equity / state.peak_equity - equity / peak)
    reward = params.reward_scale * (gross_log - cost - params.alpha * change
                                    - params.beta * drawdown_increase)
    entered = (new_pos != state.position) & (new_pos != 0)
    state = EnvState(
        time=state.time + 1,
        bar=t + 1,
        position=new_pos,
        entry_price=jnp.where(entered | (new_pos == 0), close_t, state.entry_price),
        bars_in_trade=jnp.where(new_pos == 0, 0, jnp.where(entered, 1, state.bars_in_trade + 1)),
        equity=equity,
        peak_equity=peak,
        net_profit=equity - 1.0)
    info = {'net_return': net_return, 'gross_return': gross_return, 'cost': cost,
            'net_profit': state.net_profit, 'position': new_pos}
    return self.get_obs(state, params), state, reward, jnp.asarray(False), info

  def reset_env(self, key: jax.Array, params: EnvParams) -> tuple[jax.Array, EnvState]:
    """Flat at a uniformly random bar in [start_low, start_high] (the training span)."""
    state = self.reset_state(key, params)
    return self.get_obs(state, params), state

  def reset_state(self, key: jax.Array, params: EnvParams) -> EnvState:
    """The reset state without its observation. Cheap on purpose: `step` computes it for every env on every
    step. One 32-bit draw modulo the span (bias < span / 2**32, negligible for spans of millions of bars)
    instead of `randint`'s two draws."""
    span = jnp.asarray(params.start_high - params.start_low + 1).astype(jnp.uint32)
    offset = jax.random.bits(key, (), jnp.uint32) % span
    return initial_state(params.start_low + offset.astype(jnp.int32), params)

  def get_obs(self, state: EnvState, params: EnvParams = None, key=None) -> jax.Array:
    """[D + 5]: market row at the current bar, position one-hot, unrealised PnL, time in trade."""
    del key
    t = state.bar
    close_t = params.close[t]
    upnl = state.position * jnp.log(close_t / state.entry_price) / params.pnl_scale
    one_hot = (state.position == jnp.asarray(ACTION_POSITIONS, jnp.float32)).astype(jnp.float32)
    agent = jnp.concatenate([
        one_hot,
        jnp.clip(upnl, -PNL_CLIP, PNL_CLIP)[None],
        jnp.minimum(state.bars_in_trade / params.episode_length, 1.0)[None].astype(jnp.float32)])
    return jnp.concatenate([params.features[t], agent])

  def is_terminated(self, state: EnvState, params: EnvParams) -> jax.Array:
    """No natural end: an episode only ever ends by truncation (its time limit)."""
    del state, params
    return jnp.asarray(False)

  # --- spaces -----------------------------------------------------------------------------------------
  @property
  def name(self) -> str:
    return 'NatronTrading-v0'

  @property
  def num_actions(self) -> int:
    return NUM_ACTIONS

  def action_space(self, params: EnvParams | None = None) -> spaces.Discrete:
    return spaces.Discrete(NUM_ACTIONS)

  def observation_space(self, params: EnvParams | None = None) -> spaces.Box:
    return spaces.Box(-jnp.inf, jnp.inf, self.obs_shape, dtype=jnp.float32)


def initial_state(bar, params: EnvParams) -> EnvState:
  """Flat, equity 1 at `bar` (an int32 scalar); also the starting point of deterministic evaluation."""
  bar = jnp.asarray(bar, jnp.int32)
  zero = jnp.zeros((), jnp.float32)
  one = jnp.ones((), jnp.float32)
  return EnvState(time=jnp.zeros((), jnp.int32), bar=bar, position=zero, entry_price=params.close[bar],
                  bars_in_trade=jnp.zeros((), jnp.int32), equity=one, peak_equity=one, net_profit=zero)
