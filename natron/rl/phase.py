"""The rl phase: PPO over the fine-tuned encoder's frozen embeddings, trained on the training span only.

  python launch.py --config=configs/rl.py:quick --workdir=runs/demo      (after finetune in that workdir)

Stages:
1. Data and splits: `natron.data.load_market` + `natron.dataset.build_dataset` (the same purged chronological
   splits every phase uses). One symbol is traded (`rl.symbol`, default the first).
2. Market rows: the bundle's `Predictor.predict_series` embeds every bar once (pooled encoder output, plus the
   heads' probabilities when `rl.use_head_probs`); rows are standardised with mean/std of the TRAINING span.
   Multi-host: every process embeds the series itself (the same bundle, program and bars: the same rows on
   identical hosts, which multi-host training assumes anyway; nothing to broadcast).
3. PPO (`natron.rl.ppo`): `rl.num_seeds` agents, in jitted chunks of `rl.checkpoint_every` updates; on CPU in
   worker processes, one per core (`rl.workers`, natron.rl.workers: cores scale across agents, not inside
   one), on a GPU in this process (`jax.vmap` over seeds); after each chunk an Orbax checkpoint in
   workdir/rl/checkpoints (a rerun resumes from the latest one; a finished run is not retrained). The
   progress log and metrics.json (`env_steps_per_s`, `workers`, `processes`) state the training speed.
   Multi-host (jax.distributed, P processes): the SEEDS are spread, process p training seeds p, p + P, ...
   (`process_seeds`) with its own cores (its own workers, `rl.workers` resolved for its share) or
   accelerator; after each chunk every seed's runner state and metrics are all-gathered (`_gather_seeds`, as
   raw bytes), so every process holds the stacked runner of one process, every process takes part in the Orbax
   save (the checkpoint holds all seeds: a run resumes on any number of processes) and process 0 alone appends
   train_metrics.jsonl. With workers a seed's numbers are bit-identical to a one-process run (each seed runs
   alone, tests/test_multihost.py); in this process (`jax.vmap` over a process's share of the seeds) XLA may
   round a different vmap width differently: the same training with other float32 roundings, not bit for bit
   (a tiny CPU run matched for 10 updates and differed in the last bits from update 12). A process with no
   seed (num_seeds < P) trains nothing and waits at each gather (logged).
   Costs come from `natron.backtest.resolve_costs` (commission rl.cost_bps or backtest.cost_bps; the data's
   spread, else backtest.spread, else a UserError): the same spread in the environment's reward and in
   every evaluation, and stated (commission, spread source, mean spread) in metrics.json and the test table.
4. Evaluation, costs included (`natron.backtest.run`): each seed's greedy policy on the validation span picks
   the seed; that policy is then run once on the test span and compared with always-flat, buy-and-hold, the
   supervised signal and random policies. Writes workdir/rl/policy_test.npz (position, close, time, symbol),
   workdir/rl/metrics.json, workdir/rl/test/{metrics.json, table.md, equity.png}, train_metrics.jsonl, and the
   chosen policy as a bundle in workdir/rl/policy/ (params + observation statistics). Multi-host: every
   process evaluates (the same gathered agents: the same seed choice and summary), process 0 alone writes;
   every process calls the policy bundle's save (Orbax's multi-host save needs them all).
"""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from natron import backtest
from natron import bundle_settings
from natron import checkpoint
from natron.errors import UserError
from natron.rl import env as env_lib
from natron.rl import ppo
from natron.rl import workers as rl_workers
from natron.train import state as train_state

HEAD_KEYS = ('buy_prob', 'sell_prob', 'direction_probs', 'regime_probs')


# ============================================================================================ market rows
def market_rows(pred: dict, use_head_probs: bool) -> np.ndarray:
  """float32 [T, D]: pooled embedding (+ buy, sell, direction[3], regime[6] probabilities) per bar."""
  parts = [np.asarray(pred['encoded'], np.float32)]
  if use_head_probs:
    for key in HEAD_KEYS:
      value = np.asarray(pred[key], np.float32)
      parts.append(value[:, None] if value.ndim == 1 else value)
  return np.concatenate(parts, axis=1)


def standardise(rows: np.ndarray, first: int, train_end: int, clip: float = 10.0):
  """(rows - mean) / std with statistics of rows [first, train_end) only; NaN rows (no prediction) -> 0.

  Returns (standardised float32 [T, D], mean [D], std [D]). Constant columns keep std 1.
  """
  train = rows[first:train_end].astype(np.float64)
  mean = train.mean(axis=0)
  std = train.std(axis=0)
  std = np.where(std > 1e-8, std, 1.0)
  out = np.clip((rows - mean) / std, -clip, clip)
  return np.nan_to_num(out, nan=0.0).astype(np.float32), mean.astype(np.float32), std.astype(np.float32)


def _pick_bound(bounds: list[dict], symbol: str, excluded=()) -> dict:
  if not symbol:
    usable = [b for b in bounds if b['symbol'] not in excluded] or bounds
    if len(bounds) > 1:
      logging.warning('rl: %d symbols; trading the first with a training span (%s). Set rl.symbol to choose.',
                      len(bounds), usable[0]['symbol'])
    return usable[0]
  for b in bounds:
    if str(b['symbol']) == symbol:
      return b
  raise UserError(f'rl.symbol={symbol!r} is not in the data; symbols: {[b["symbol"] for b in bounds]}.')


def rl_first_row(meta: dict, symbol: str, lo: int, first: int, train_end: int) -> tuple[int, bool]:
  """(first row of PPO's training episodes within the symbol, whether its observations are out-of-sample).

  With finetune.rl_holdout > 0 the bundle records where each symbol's bars unseen by fine-tuning begin
  (meta['rl_holdout']['start_rows'], global rows): PPO trains from there, on encoder outputs for bars whose
  labels the encoder never trained on. Without it PPO trains on the whole training span, whose encoder outputs
  partly memorise those bars' forward labels (logged as a warning; the test span stays out-of-sample).
  """
  holdout = meta.get('rl_holdout') or {}
  start = (holdout.get('start_rows') or {}).get(symbol)
  if not holdout.get('fraction') or start is None:
    logging.warning('rl: the bundle was fine-tuned on the whole training span (finetune.rl_holdout=0): PPO '
                    'learns from in-sample encoder outputs. Set finetune.rl_holdout (e.g. 0.3) to train it on '
                    'bars the encoder never saw labels of.')
    return first, False
  start = int(start) - lo
  if train_end - max(first, start) < 2:
    raise UserError(f'rl: the held-out RL part of {symbol} ({train_end - start} bars before train_end) is too '
                    'short; raise finetune.rl_holdout or use more bars.')
  logging.info('rl: PPO trains on rows [%d, %d) of %s, held out of fine-tuning (out-of-sample observations).',
               max(first, start), train_end, symbol)
  return max(first, start), True


# ================================================================================================ phase
def run_phase(config, workdir: str) -> dict:
  from natron import data as data_lib          # pylint: disable=g-import-not-at-top
  from natron import dataset as dataset_lib    # pylint: disable=g-import-not-at-top
  from natron.predictor import Predictor       # pylint: disable=g-import-not-at-top

  rl = config.rl
  out_dir = os.path.join(workdir, 'rl')
  main = train_state.is_main_process()   # multi-host: every process computes, process 0 alone writes files
  if main:
    os.makedirs(out_dir, exist_ok=True)

  # --- 1. Data and splits --------------------------------------------------------------------------------
  # Data, labels and splits as the fine-tuning run recorded them in its bundle (natron.bundle_settings).
  config = bundle_settings.resolve(config, workdir, 'rl')
  frame = data_lib.load_market(config.data)
  ds = dataset_lib.build_dataset(frame, config)
  bound = _pick_bound(ds.bounds, str(rl.get('symbol', '') or ''), ds.info.get('excluded', {}))
  symbol, lo, hi = str(bound['symbol']), int(bound['start']), int(bound['stop'])
  part = frame.iloc[lo:hi].reset_index(drop=True)
  train_ends = ds.ends['train'][(ds.ends['train'] >= lo) & (ds.ends['train'] < hi)] - lo
  if len(train_ends) == 0:
    raise UserError(f'rl: symbol {symbol} has no training windows.')
  override = float(rl.cost_bps) >= 0
  costs = backtest.resolve_costs(part, symbol, config, frame.attrs.get('points'),
                                 spread_sources=frame.attrs.get('spread_sources'),
                                 cost_bps=float(rl.cost_bps) if override else None,
                                 commission_source='rl.cost_bps' if override else 'backtest.cost_bps')

  # --- 2. Market rows: embeddings once, standardised on the training span --------------------------------
  t0 = time.perf_counter()
  predictor = Predictor.load(workdir, buckets=(), series_chunk=0)
  pred = predictor.predict_series(part, with_encoded=True, progress=True, desc='rl: embed bars')
  first = max(int(train_ends.min()), predictor.required_candles - 1)
  train_end = int(bound['train_end']) - lo
  first, oos = rl_first_row(predictor.meta, symbol, lo, first, train_end)
  val = (int(bound['val_start']) - lo, int(bound['val_end']) - lo)
  test = (int(bound['test_start']) - lo, hi - lo)
  rows, obs_mean, obs_std = standardise(market_rows(pred, bool(rl.use_head_probs)), first, train_end)
  close = part['close'].to_numpy(np.float64)
  spread = costs.spread
  times = part['time'].to_numpy() if 'time' in part else None
  sigma = float(np.std(np.diff(np.log(close[first:train_end]))))
  cost_bps = costs.commission_bps
  env_params = env_lib.make_params(
      rows, close, spread=spread, train_end=train_end, episode_length=int(rl.episode_length),
      start_low=first, cost_bps=cost_bps, alpha=float(rl.alpha), beta=float(rl.beta),
      reward_scale=float(rl.reward_scale) if float(rl.reward_scale) > 0 else 1.0 / sigma, pnl_scale=sigma)
  env = env_lib.TradingEnv(rows.shape[1])
  logging.info('rl: %s, %d bars; train episodes in [%d, %d), val [%d, %d), test [%d, %d); obs dim %d; '
               'embedding took %.1f s', symbol, len(close), first, train_end, *val, *test, env.obs_shape[0],
               time.perf_counter() - t0)

  # --- 3. PPO in checkpointed chunks -----------------------------------------------------------------------
  runner, trainer, train_info = train_agents(config, env, env_params, out_dir)

  # --- 4. Evaluation on validation (seed choice) and test (the report) ------------------------------------
  params = runner.train_state.params
  bt_kw = dict(cost_bps=cost_bps, periods_per_year=float(config.backtest.periods_per_year),
               timeframe=str(config.data.timeframe),
               trading_day=str(config.backtest.get('trading_day', None) or backtest.TRADING_DAY))

  def backtest_span(position, span):
    s, e = span
    return backtest.run(close[s:e], position, spread=spread[s:e], time=None if times is None else times[s:e],
                        **bt_kw)

  def positions(span):
    s, e = span
    if e - s < 2:
      raise UserError(f'rl: the span [{s}, {e}) of {symbol} is too short to evaluate; use more data.')
    fn = jax.jit(jax.vmap(lambda p, ep: trainer.evaluate(p, ep, s, e), in_axes=(0, None)))
    return np.asarray(fn(params, env_params), np.float64)

  val_returns = [backtest_span(p, val).metrics['total_return'] for p in positions(val)]
  best = int(np.argmax(val_returns))
  test_positions = positions(test)
  test_returns = [backtest_span(p, test).metrics['total_return'] for p in test_positions]
  position = test_positions[best]
  s, e = test
  test_time = None if times is None else times[s:e]
  test_costs = costs.span(s, e)
  # One evaluator for the test-span table (natron.backtest.test_policies / evaluate_policies), the same as the
  # backtest phase's: PPO beside the supervised signal, momentum, the linear model, buy-and-hold, flat, random.
  policies, trials = backtest.test_policies(workdir, ds, bound, np.arange(s, e), pred['signal'][s:e], config,
                                            ppo_position=position, ppo_trials=int(rl.num_seeds))
  results, found = backtest.evaluate_policies(close[s:e], policies, test_costs, config, time=test_time,
                                              trials=trials)
  random_returns = [backtest_span(backtest.random_policy(e - s, seed=int(config.seed) + k), test)
                    .metrics['total_return'] for k in range(int(rl.random_seeds))]
  title = f'{symbol} test span, net of costs (PPO seed {best} chosen on validation)'
  if main:
    table = backtest.save_results(results, os.path.join(out_dir, 'test'), time=test_time, title=title,
                                  cost=test_costs, evidence_=found)
    np.savez(os.path.join(out_dir, 'policy_test.npz'), position=position, close=close[s:e], spread=spread[s:e],
             time=np.asarray([]) if test_time is None else test_time, symbol=symbol, start_row=lo + s,
             trials=int(rl.num_seeds))
  else:
    table = backtest.results_table(results, cost=test_costs, evidence_=found)
  # Every process calls save_bundle (Orbax's multi-host save needs them all); process 0 alone writes it.
  save_policy(os.path.join(out_dir, 'policy'), jax.tree.map(lambda x: np.asarray(x[best]), params), {
      'symbol': symbol, 'seed_index': best, 'obs_mean': obs_mean, 'obs_std': obs_std, 'obs_clip': 10.0,
      'use_head_probs': bool(rl.use_head_probs), 'num_features': int(rows.shape[1]),
      'hidden': list(rl.hidden), 'activation': str(rl.activation), 'cost_bps': cost_bps,
      'pnl_scale': sigma, 'episode_length': int(rl.episode_length),
      'actions': {'0': 'short', '1': 'flat', '2': 'long'}, 'bundle': getattr(predictor, 'bundle_dir', '')})

  ppo_m = results['ppo'].metrics
  summary = {
      'symbol': symbol,
      'test_bars': e - s,
      'test_total_return': ppo_m['total_return'],
      'test_sharpe': ppo_m['sharpe'],
      'test_max_drawdown': ppo_m['max_drawdown'],
      'test_num_trades': ppo_m['num_trades'],
      'test_total_cost': ppo_m['total_cost'],
      'flat_total_return': results['flat'].metrics['total_return'],
      'buy_and_hold_total_return': results['buy_and_hold'].metrics['total_return'],
      'supervised_total_return': results['supervised'].metrics['total_return'],
      'random_total_return_mean': float(np.mean(random_returns)),
      'random_total_return_std': float(np.std(random_returns)),
      'beats_flat': bool(ppo_m['total_return'] > results['flat'].metrics['total_return']),
      'beats_random': bool(ppo_m['total_return'] > np.mean(random_returns)),
      'test_total_return_ci': found['ppo']['total_return_ci'],
      'test_sharpe_ci': found['ppo']['sharpe_ci'],
      'test_psr': found['ppo']['psr'],
      'test_dsr': found['ppo']['dsr'],
      'verdict': found['ppo']['verdict'],
      'verdicts': found['ppo']['verdicts'],
      'momentum_total_return': results['momentum'].metrics['total_return'] if 'momentum' in results else None,
      'linear_total_return': results['linear'].metrics['total_return'] if 'linear' in results else None,
      'chosen_seed': best,
      'observations': 'out-of-sample (finetune.rl_holdout)' if oos else 'in-sample encoder outputs',
      'train_rows': [first, train_end],
      'val_total_return_per_seed': [float(v) for v in val_returns],
      'test_total_return_per_seed': [float(v) for v in test_returns],
      'cost_bps': cost_bps,
      'cost_model': test_costs.describe(),
      **train_info,
  }
  if main:
    with open(os.path.join(out_dir, 'metrics.json'), 'w') as f:
      json.dump(summary, f, indent=2, default=float)
  logging.info('rl: test span of %s, net of costs:\n%s', symbol, table)
  return {k: v for k, v in summary.items() if not isinstance(v, (list, dict))}


# =========================================================================================== training
def _fingerprint(config, env: env_lib.TradingEnv) -> dict:
  """What a checkpoint must agree on to be resumed (anything else would silently change the run)."""
  rl = config.rl
  keys = ('num_envs', 'num_steps', 'total_timesteps', 'update_epochs', 'minibatch_size', 'lr', 'anneal_lr',
          'num_seeds', 'episode_length', 'alpha', 'beta', 'use_head_probs', 'gamma', 'gae_lambda', 'ent_coef')
  return {'obs_dim': int(env.obs_shape[0]), 'hidden': list(rl.hidden), 'seed': int(config.seed),
          **{k: rl[k] for k in keys}}


def train_agents(config, env, env_params, out_dir: str):
  """Trains (or resumes) `rl.num_seeds` agents; returns (runner stacked over seeds, trainer, info dict).

  Where the seeds train is `rl.workers` (natron.rl.workers.resolve_workers): on CPU, by default, one worker
  process per core, each pinned to its core with one XLA thread (one agent's tiny ops do not speed up with
  threads; whole agents on separate cores do); on a GPU, in this process, `jax.vmap` over seeds. Either way
  the chunks, checkpoints, metrics lines and the returned runner are the same; with workers, a seed's numbers
  do not depend on how many workers there are (natron/rl/workers.py).

  Multi-host (jax.distributed, P processes): process p trains seeds p, p + P, p + 2P, ... (`process_seeds`),
  with its own cores or accelerator as above (`rl.workers` resolved for its share); after every chunk the
  runner states and metrics of all seeds are gathered (`_gather_seeds`), so every process holds the same
  stacked runner a single process would, takes part in the Orbax save (every process must) and returns it;
  process 0 alone appends train_metrics.jsonl. A process left without a seed (num_seeds < P) trains nothing
  and waits for the others at each gather. The checkpoint holds every seed, so a run resumes on any number of
  processes.
  """
  rl = config.rl
  num_seeds = int(rl.num_seeds)
  main = train_state.is_main_process()
  mine = process_seeds(num_seeds, jax.process_count(), jax.process_index())
  # The in-loop progress lines average this process's seeds (the default logger would wait for all of them).
  sizes = ppo.make_trainer(rl, env, env_params, logger=False)
  trainer = ppo.make_trainer(rl, env, env_params, logger=ppo.ProgressLogger(
      num_updates=sizes.num_updates, steps_per_update=sizes.batch_size, num_seeds=max(len(mine), 1)))
  chunk = max(1, min(int(rl.checkpoint_every), trainer.num_updates))
  # Raw uint32 keys (not typed key arrays): the runner state goes through Orbax as plain arrays.
  keys = jax.random.split(jax.random.PRNGKey(int(config.seed)), num_seeds)
  init = jax.vmap(trainer.init, in_axes=(0, None))
  manager = checkpoint.make_manager(os.path.join(out_dir, 'checkpoints'), max_to_keep=1)
  fingerprint = _fingerprint(config, env)
  # The restore target is abstract (eval_shape): a resumed run compiles no initialisation. On this process's
  # first device (multi-host: jax.devices()[0] belongs to process 0).
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          jax.eval_shape(init, keys, env_params))
  workers = rl_workers.resolve_workers(rl.get('workers', 'auto'), len(mine), jax.default_backend(),
                                       env_steps=len(mine) * trainer.num_updates * trainer.batch_size)
  restored = checkpoint.restore_latest(manager, abstract)
  if restored is None:
    # With workers, the seeds are initialised one by one when the workers start (_ChunkRunner).
    local = None if workers or not mine else jax.jit(init)(keys[np.asarray(mine, int)], env_params)
    runner, done = None, 0
  else:
    saved_runner, meta = restored
    if meta.get('fingerprint') != json.loads(json.dumps(fingerprint)):
      raise checkpoint.CheckpointError(
          f'{manager.directory} holds a PPO run with other settings ({meta.get("fingerprint")}); use a new '
          f'workdir or delete that folder to start afresh.')
    runner = saved_runner
    local = runner if len(mine) == num_seeds else jax.tree.map(lambda x: x[np.asarray(mine, int)], runner)
    done = int(np.asarray(runner.update)[0])
    logging.info('rl: resuming from update %d of %d', done, trainer.num_updates)
  metrics_path = os.path.join(out_dir, 'train_metrics.jsonl')
  start = time.perf_counter()
  steps_run, run_seconds = 0, 0.0
  with _ChunkRunner(rl, trainer, env, env_params, keys[np.asarray(mine, int)], local, workers,
                    abstract) as run_chunk:
    if done < trainer.num_updates:
      where = (f'{workers} worker process(es), one core each' if workers else
               f'in this process ({jax.default_backend()}, jax.vmap over seeds)')
      if jax.process_count() > 1:
        where = (f'process {jax.process_index()} of {jax.process_count()} trains seeds {mine} {where}' if mine
                 else f'process {jax.process_index()} of {jax.process_count()} has no seed to train '
                      f'(rl.num_seeds={num_seeds} < {jax.process_count()} processes): it waits for the others')
      logging.info('rl: %d seeds x %d updates of %d env steps, %s', num_seeds, trainer.num_updates,
                   trainer.batch_size, where)
    seen = set()
    while done < trainer.num_updates:
      n = min(chunk, trainer.num_updates - done)
      fresh = n not in seen   # the first call of each chunk size includes its compilation
      seen.add(n)
      t0 = time.perf_counter()
      runner, metrics = _gather_seeds(*run_chunk(n), num_seeds)
      seconds = time.perf_counter() - t0
      if not fresh:
        steps_run += n * trainer.batch_size * num_seeds
        run_seconds += seconds
      _check_finite(metrics, done)
      if main:
        _append_metrics(metrics_path, metrics, done, int(rl.log_every))
      done += n
      # Host values: in a multi-host save Orbax writes numpy leaves once, from process 0 (every process must
      # call save; a process-local device array would be written by each of them).
      checkpoint.save(manager, done, jax.device_get(runner), {'fingerprint': fingerprint, 'update': done,
                                                             'num_updates': trainer.num_updates},
                      metrics={'episode_net_profit': float(np.nanmean(metrics['episode_net_profit'][:, -1]))})
  info = {'num_updates': trainer.num_updates, 'env_steps_per_seed': trainer.num_updates * trainer.batch_size,
          'num_seeds': num_seeds, 'train_seconds': round(time.perf_counter() - start, 1),
          'env_steps_per_s': round(steps_run / run_seconds) if run_seconds > 0 else None,
          'workers': workers, 'processes': jax.process_count()}
  logging.info('rl: training done: %s', info)
  return runner, trainer, info


def process_seeds(num_seeds: int, num_processes: int, process_index: int) -> list[int]:
  """The seeds process `process_index` of `num_processes` trains: every num_processes-th, from its index.

  Round-robin like the CPU workers within a process, so P processes and W workers each spread the seeds the
  same way; empty when num_seeds <= process_index (that process only takes part in the gathers).
  """
  return list(range(process_index, num_seeds, num_processes))


def _gather_seeds(runner, metrics: dict, num_seeds: int):
  """(runner stacked over ALL seeds, metrics {name: [num_seeds, n]}) from every process's own seeds.

  Single process: returned as they are. Multi-host: each process's share (`process_seeds`; leading axis its
  own seeds, padded with zeros to the largest share) crosses as raw bytes in ONE all-gather per chunk (not one
  collective per leaf), so the values arrive bit for bit; seed s is then entry s // P of process s % P. Every
  process gets the whole runner on its first device and the whole metrics as numpy.
  """
  processes = jax.process_count()
  if processes == 1:
    return runner, metrics
  share = -(-num_seeds // processes)

  def pad(x):
    x = np.ascontiguousarray(x)
    return np.concatenate([x, np.zeros((share - len(x),) + x.shape[1:], x.dtype)]) if len(x) < share else x

  leaves, treedef = jax.tree.flatten(jax.tree.map(pad, (runner, metrics)))
  local = np.concatenate([x.view(np.uint8).ravel() for x in leaves])
  rows = np.asarray(multihost_utils.process_allgather(local, tiled=False))   # [P, bytes]
  seeds = np.arange(num_seeds)
  out, offset = [], 0
  for x in leaves:
    per_process = np.stack([row[offset:offset + x.nbytes].view(x.dtype).reshape(x.shape) for row in rows])
    out.append(per_process[seeds % processes, seeds // processes])
    offset += x.nbytes
  runner, metrics = jax.tree.unflatten(treedef, out)
  return jax.device_put(runner, jax.local_devices()[0]), metrics


class _ChunkRunner:
  """Context manager giving `run_chunk(n) -> (runner stacked over seeds, metrics {name: [seeds, n]})` for the
  seeds of `keys` (this process's seeds; in a single process all of them).

  workers == 0: one jitted `jax.vmap` over seeds in this process (its progress lines come from inside the
  loop). Otherwise `natron.rl.workers.SeedWorkers`, started on the first chunk; a progress line per chunk.
  No seed (a multi-host process with none): empty arrays ([0, ...]) of the right structure, nothing computed.
  """

  def __init__(self, rl, trainer, env, env_params, keys, runner, workers: int, abstract):
    self.rl, self.trainer, self.env, self.env_params, self.keys = rl, trainer, env, env_params, keys
    self.runner, self.workers, self.abstract = runner, workers, abstract
    self.compiled, self.pool = {}, None
    self.logger = ppo.ProgressLogger(num_updates=trainer.num_updates, steps_per_update=trainer.batch_size,
                                     num_seeds=len(keys))

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    if self.pool is not None:
      self.pool.close()

  def _empty(self, n: int):
    """Zero-seed runner and metrics with the structure and dtypes of a real chunk of n updates."""
    one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), self.abstract)
    _, metrics = jax.eval_shape(lambda r, p: self.trainer.run(r, p, n), one, self.env_params)
    empty = lambda x: np.zeros((0,) + tuple(x.shape), x.dtype)
    return jax.tree.map(empty, one), jax.tree.map(empty, metrics)

  def __call__(self, n: int):
    if not len(self.keys):
      return self._empty(n)
    if not self.workers:
      if n not in self.compiled:
        self.compiled[n] = jax.jit(jax.vmap(lambda r, p, n=n: self.trainer.run(r, p, n), in_axes=(0, None)))
      self.runner, metrics = self.compiled[n](self.runner, self.env_params)
      return self.runner, jax.device_get(metrics)
    if self.pool is None:
      # The workers start importing jax now; meanwhile this process initialises the seeds (one at a time: the
      # same bits whatever the worker count) or slices the restored runner.
      self.pool = rl_workers.SeedWorkers(self.rl, self.env.num_features, workers=self.workers,
                                         num_seeds=len(self.keys))
      if self.runner is None:
        leaves = rl_workers.initial_leaves(self.trainer, self.keys, self.env_params)
      else:   # resume: each seed's slice of the restored runner
        stacked = [np.asarray(x) for x in jax.tree.leaves(self.runner)]
        leaves = [[x[s] for x in stacked] for s in range(len(self.keys))]
      self.pool.start(self.env_params, leaves)
    per_seed_leaves, per_seed_metrics = self.pool.run(n)
    treedef = jax.tree.structure(self.abstract)
    self.runner = jax.tree.unflatten(treedef, [jax.device_put(np.stack(x)) for x in zip(*per_seed_leaves)])
    metrics = {k: np.stack([m[k] for m in per_seed_metrics]) for k in per_seed_metrics[0]}
    last = int(np.asarray(self.runner.update)[0])
    for m in per_seed_metrics:   # one progress line per chunk, at its last update (the workers log nothing)
      self.logger(last, {k: v[-1] for k, v in m.items()})
    return self.runner, metrics


def _check_finite(metrics: dict, first_update: int) -> None:
  for key in ('loss/value', 'loss/policy', 'grad_norm'):
    bad = ~np.isfinite(np.asarray(metrics[key]))
    if bad.any():
      update = first_update + int(np.argwhere(bad)[0][-1]) + 1
      raise FloatingPointError(f'rl: non-finite {key} at update {update}; lower rl.lr or check the inputs.')


def _append_metrics(path: str, metrics: dict, first_update: int, every: int) -> None:
  """One JSON line per `every` updates: the mean over seeds of each metric (and per-seed episode profit)."""
  n = np.asarray(metrics['reward']).shape[1]
  with open(path, 'a') as f:
    for i in range(n):
      update = first_update + i + 1
      if update % every and i != n - 1:
        continue
      line = {'update': update}
      for key, value in metrics.items():
        column = np.asarray(value)[:, i]
        line[key] = float(np.nanmean(column)) if np.isfinite(column).any() else None
      line['episode_net_profit_per_seed'] = [None if not np.isfinite(v) else float(v)
                                             for v in np.asarray(metrics['episode_net_profit'])[:, i]]
      f.write(json.dumps(line) + '\n')


def save_policy(directory: str, params, meta: dict) -> str:
  """The chosen policy's params + everything needed to rebuild its observations, as a bundle directory."""
  return checkpoint.save_bundle(directory, params, {'kind': 'natron-ppo-policy', **meta})


def load_policy(directory: str) -> tuple[dict, dict]:
  """(params, meta) saved by `save_policy`; rebuild the network with `ppo.ActorCritic(3, meta['hidden'],
  meta['activation'])`."""
  params, meta = checkpoint.load_bundle(directory)
  if meta.get('kind') != 'natron-ppo-policy':
    raise checkpoint.CheckpointError(f'{directory} is not a PPO policy bundle.')
  return params, meta
