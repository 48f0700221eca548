"""Strong baselines every reported skill sits beside (DESIGN.md rule 7): rules from the past and a linear model.

All are fitted on the TRAINING span only (the same window ends the Transformer trains on) and evaluated on the
same rows as the model:

- majority: the training span's most frequent class (natron.train.evaluate.majority_class).
- momentum (buy, sell, direction): the volatility-scaled PAST return
      m_t = log(close_t / close_{t-L}) / (sigma_t sqrt(L))
  with sigma_t the labels' causal EWM volatility. direction: UP if m > c, DOWN if m < -c, else NEUTRAL;
  buy: 1 if m > c_buy; sell: 1 if m < -c_sell. The lookback L (from LOOKBACKS x the label horizon) and the
  thresholds c (quantiles of |m| on the training rows, or "never") are chosen per task to maximise training
  accuracy. This is the rule the issue measured at 80% direction accuracy on the learnable market.
- momentum (regime): the label's own rule (natron.labels.regime_labels, the same thresholds) applied to the
  TRAILING window t-H_r+1..t instead of the forward one t+1..t+H_r: "the regime of the last H_r bars continues".
- linear: multinomial logistic regression on the scaled window [W, F] (the model's own inputs), DLinear-style
  (Zeng et al. 2023): the window is split into a moving-average trend (kernel KERNEL, edge-replicated) and the
  remainder, each mapped by its own linear layer to every task's logits. Trained with optax AdamW on the same
  loss as the Transformer (natron.losses.multitask_loss: task weights, tempered class weights, focal gamma,
  uniqueness sample weights); the epoch with the best validation early-stopping metric is kept, as for the
  model.

Trading (natron.backtest): momentum's direction rule is a position (+1 / -1 / 0); the linear model's buy and
sell probabilities go through the supervised signal rule with the same threshold.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Mapping

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from natron import labels as labels_lib
from natron import losses
from natron.train import evaluate

TASKS = labels_lib.TASKS
NUM_CLASSES = labels_lib.NUM_CLASSES
NAMES = ('majority', 'momentum', 'linear')
LOOKBACKS = (0.5, 1.0, 2.0, 4.0)      # momentum lookbacks, in units of the label horizon
THRESHOLD_QUANTILES = np.linspace(0.0, 0.98, 50)
KERNEL = 25                           # DLinear's moving-average kernel


# ============================================================================================ momentum
def past_score(close: np.ndarray, sigma: np.ndarray, lookback: int) -> np.ndarray:
  """m_t float64 [T] of one symbol (module docstring); NaN for t < lookback or without sigma."""
  logc = np.log(np.asarray(close, np.float64))
  past = np.full(logc.shape, np.nan)
  if lookback < len(logc):
    past[lookback:] = logc[lookback:] - logc[:-lookback]
  with np.errstate(invalid='ignore', divide='ignore'):
    m = past / (sigma * math.sqrt(lookback))
  return np.where(np.isfinite(m) & (sigma > 0), m, np.nan)


def trailing_regime(close: np.ndarray, sigma: np.ndarray, label_params: Mapping, vol_lookback: int) -> np.ndarray:
  """int32 [T] of one symbol: the regime label's rule on the trailing window t-H_r+1..t (-1 where undefined).

  The forward statistics of row t-H_r cover exactly bars t-H_r+1..t, so the trailing trend is the forward
  trend shifted by H_r; its volatility ratio divides by the trailing median of sigma at t (known at t).
  """
  if label_params.get('regime_thresholds') is None:   # a symbol left out of every split
    return np.full(len(close), -1, np.int32)
  horizon = int(label_params['regime_horizon'])
  vol_span = int(label_params.get('vol_span', 100))
  trend, ratio = labels_lib.regime_statistics(close, sigma, horizon, int(vol_lookback), vol_span)
  median = labels_lib.trailing_median(sigma, int(vol_lookback), vol_span)
  rv = ratio * median      # row t's forward realised vol (over t+1..t+H_r); NaN where undefined
  shift = lambda x: np.concatenate([np.full(min(horizon, len(x)), np.nan), x[:len(x) - horizon]])
  with np.errstate(invalid='ignore', divide='ignore'):
    trail_ratio = shift(rv) / median   # the window ending at t over the median known at t
  thresholds = {k: float(v) for k, v in label_params['regime_thresholds'].items()}
  return labels_lib.regime_labels(shift(trend), trail_ratio, thresholds)


def _per_symbol(ds, fn) -> np.ndarray:
  """Concatenates fn(close, sigma, symbol bound) over the dataset's symbols into one global [T] array."""
  parts = []
  for b in ds.bounds:
    s, e = b['start'], b['stop']
    parts.append(fn(ds.close[s:e], ds.labels.sigma[s:e], b))
  return np.concatenate(parts)


def fit_momentum(ds, train_ends: np.ndarray, label_config=None) -> dict:
  """Lookback and thresholds per task, maximising accuracy on the training window ends (JSON-able).

  `label_config` (config.labels) supplies regime_vol_lookback for the trailing regime rule.
  """
  horizon = int(next(p['horizon'] for p in ds.info['label_params'].values() if 'horizon' in p))
  y_regime = ds.labels.regime[train_ends]
  out = {'horizon': horizon,
         'regime_vol_lookback': int(labels_lib.setting(label_config, 'regime_vol_lookback')),
         'regime_fallback': evaluate.majority_class(y_regime, NUM_CLASSES['regime'])}
  scores = {}
  for mult in LOOKBACKS:
    lookback = max(1, int(round(mult * horizon)))
    scores[lookback] = _per_symbol(ds, lambda c, s, b, lookback=lookback: past_score(c, s, lookback))
  for task in ('buy', 'sell', 'direction'):
    y = ds.labels.task(task)[train_ends]
    best = (-1.0, None, None)
    for lookback, m_all in scores.items():
      m = m_all[train_ends]
      ok = (y >= 0)
      m_ok, y_ok = np.nan_to_num(m[ok], nan=0.0), y[ok]
      grid = np.r_[np.quantile(np.abs(m_ok), THRESHOLD_QUANTILES), np.inf]
      preds = _momentum_rule(task, m_ok[None, :], grid[:, None])
      acc = (preds == y_ok[None, :]).mean(axis=1)
      k = int(np.argmax(acc))
      if acc[k] > best[0]:
        best = (float(acc[k]), lookback, float(grid[k]))
    out[task] = {'lookback': best[1], 'threshold': best[2], 'train_accuracy': best[0]}
  return out


def _momentum_rule(task: str, m: np.ndarray, c) -> np.ndarray:
  if task == 'direction':
    return np.where(m > c, labels_lib.UP, np.where(m < -c, labels_lib.DOWN, labels_lib.NEUTRAL))
  if task == 'buy':
    return (m > c).astype(np.int64)
  return (m < -c).astype(np.int64)


def momentum_predictions(ds, params: Mapping) -> dict:
  """{task: int32 [T]} momentum predictions for every row of the dataset (0 / NEUTRAL where m is undefined)."""
  out = {}
  for task in ('buy', 'sell', 'direction'):
    p = params[task]
    m = _per_symbol(ds, lambda c, s, b: past_score(c, s, int(p['lookback'])))
    out[task] = _momentum_rule(task, np.nan_to_num(m, nan=0.0), float(p['threshold'])).astype(np.int32)
  regime = _per_symbol(ds, lambda c, s, b: trailing_regime(c, s, ds.info['label_params'][b['symbol']],
                                                           int(params['regime_vol_lookback'])))
  # Undefined trailing regime (the first H_r bars): the training majority stands in.
  out['regime'] = np.where(regime >= 0, regime, params.get('regime_fallback', 0)).astype(np.int32)
  return out


def momentum_position(ds, params: Mapping) -> np.ndarray:
  """float64 [T]: the momentum direction rule as a position, UP +1 / DOWN -1 / NEUTRAL 0."""
  d = momentum_predictions(ds, params)['direction']
  return np.where(d == labels_lib.UP, 1.0, np.where(d == labels_lib.DOWN, -1.0, 0.0))


# ============================================================================================== linear
def trend_matrix(window: int, kernel: int = KERNEL) -> np.ndarray:
  """float32 [W, W]: A with (A x)[v] = mean of x over the kernel centred at v, edges replicated (DLinear)."""
  half = (kernel - 1) // 2
  a = np.zeros((window, window), np.float64)
  for v in range(window):
    for j in range(v - half, v - half + kernel):
      a[v, min(max(j, 0), window - 1)] += 1.0 / kernel
  return a.astype(np.float32)


def init_linear(window: int, num_features: int) -> dict:
  """Zero-initialised parameters (a convex problem: the optimum does not depend on the start)."""
  size = sum(NUM_CLASSES.values())
  return {'trend': jnp.zeros((window, num_features, size), jnp.float32),
          'rest': jnp.zeros((window, num_features, size), jnp.float32),
          'bias': jnp.zeros((size,), jnp.float32)}


def linear_logits(params: Mapping, x: jax.Array) -> dict:
  """{task: float32 [B, C]} logits of windows x [B, W, F] (NaN-free scaled features)."""
  # trend . W_t + (x - trend) . W_r with trend = A x is x . W, W = W_r + A^T (W_t - W_r): one [W, F, C] weight
  # per step instead of a [W, W] product per window.
  a = jnp.asarray(trend_matrix(x.shape[1]))
  weight = params['rest'] + jnp.einsum('vw,vfc->wfc', a, params['trend'] - params['rest'])
  logits = jnp.einsum('bwf,wfc->bc', x, weight) + params['bias']
  out, start = {}, 0
  for task in TASKS:
    out[task] = logits[:, start:start + NUM_CLASSES[task]]
    start += NUM_CLASSES[task]
  return out


def train_linear(ds, *, task_weights: Mapping, class_weights: Mapping, gamma: float = 0.0,
                 use_sample_weights: bool = True, epochs: int = 10, batch_size: int = 256, lr: float = 1e-3,
                 weight_decay: float = 1e-2, seed: int = 0, early_stopping_metric: str = 'mean_macro_f1'):
  """Trains the linear baseline on the train split; returns (params of the best validation epoch, history)."""
  optimizer = optax.adamw(lr, weight_decay=weight_decay)
  task_weights = {t: float(task_weights[t]) for t in TASKS}

  def loss_fn(params, batch):
    if not use_sample_weights:
      batch = dict(batch, weight=jnp.ones_like(batch['weight']))
    return losses.multitask_loss(linear_logits(params, batch['x']), batch, task_weights=task_weights,
                                 class_weights=class_weights, gamma=gamma)[0]

  @jax.jit
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  params = init_linear(ds.window, ds.num_features)
  opt_state = optimizer.init(params)
  train_labels = {t: ds.labels.task(t)[ds.split_ends('train')] for t in TASKS}
  mode = 'min' if early_stopping_metric == 'loss' else 'max'
  best, best_params, history = None, params, []
  start = time.time()
  for epoch in range(int(epochs)):
    losses_ = []
    for batch in ds.batches('train', batch_size, seed=int(np.random.SeedSequence([seed, epoch, 7]).generate_state(1)[0]),
                            shuffle=True):
      params, opt_state, loss = step(params, opt_state, {k: v for k, v in batch.items() if k != 'end'})
      losses_.append(loss)
    preds = predict_linear(params, ds, ds.split_ends('val'), batch_size=1024)
    val = evaluate.evaluate_predictions(preds, {t: ds.labels.task(t)[ds.split_ends('val')] for t in TASKS},
                                        train_labels, NUM_CLASSES)
    score = float(np.mean(jax.device_get(losses_))) if early_stopping_metric == 'loss' else \
        evaluate.metric_value(val, early_stopping_metric)
    improved = best is None or (score > best if mode == 'max' else score < best)
    if improved:
      best, best_params = score, params
    history.append({'epoch': epoch + 1, 'train_loss': float(np.mean(jax.device_get(losses_))),
                    f'val_{early_stopping_metric}': score})
    logging.info('baselines: linear epoch %d/%d  train loss %.4f  val %s %.4f%s  (%.0f s)', epoch + 1, epochs,
                 history[-1]['train_loss'], early_stopping_metric, score, ' (best)' if improved else '',
                 time.time() - start)
  return jax.device_get(best_params), history


def linear_probabilities(params: Mapping, ds, ends: np.ndarray, batch_size: int = 1024) -> dict:
  """{task: float32 [N, C]} softmax probabilities of the windows ending at `ends`."""
  fn = _jitted_probs()
  out = {t: [] for t in TASKS}
  ends = np.asarray(ends, np.int64)
  for s in range(0, len(ends), batch_size):
    chunk = ends[s:s + batch_size]
    pad = batch_size - len(chunk) if len(ends) > batch_size else 0   # fixed shapes: one compile per size
    x = ds.windows(np.concatenate([chunk, np.full(pad, chunk[0], np.int64)]))
    probs = jax.device_get(fn(params, x))
    for t in TASKS:
      out[t].append(np.asarray(probs[t])[:len(chunk)])
  return {t: np.concatenate(v) if v else np.zeros((0, NUM_CLASSES[t]), np.float32) for t, v in out.items()}


_PROBS = []


def _jitted_probs():
  if not _PROBS:
    _PROBS.append(jax.jit(lambda p, x: {t: jax.nn.softmax(v) for t, v in linear_logits(p, x).items()}))
  return _PROBS[0]


def predict_linear(params: Mapping, ds, ends: np.ndarray, batch_size: int = 1024) -> dict:
  """{task: int32 [N]} argmax predictions of the linear baseline."""
  probs = linear_probabilities(params, ds, ends, batch_size)
  return {t: np.argmax(p, axis=-1).astype(np.int32) for t, p in probs.items()}


# ============================================================================================ together
def fit_and_predict(ds, config, class_weights: Mapping) -> tuple[dict, dict, dict, list]:
  """Fits every baseline on the training span and predicts the val and test windows.

  Returns (preds {split: {name: {task: int32 [N]}}} aligned with ds.split_ends(split), momentum params,
  linear params, the linear model's epoch history); logs progress of the linear model's epochs.
  """
  cfg = config.baselines
  ft = config.get('finetune', None) or {}    # the fine-tuning loss settings; equal task weights without them
  train_ends = ds.split_ends('train')
  t0 = time.time()
  momentum = fit_momentum(ds, train_ends, config.labels)
  logging.info('baselines: momentum fitted on %d training windows in %.1f s: %s', len(train_ends),
               time.time() - t0, {t: momentum[t] for t in ('buy', 'sell', 'direction')})
  linear, history = train_linear(
      ds, task_weights=ft.get('task_weights', None) or {t: 1.0 for t in TASKS}, class_weights=class_weights, gamma=float(ft.get('focal_gamma', 0.0)),
      use_sample_weights=bool(ft.get('use_sample_weights', True)), epochs=int(cfg.linear_epochs),
      batch_size=int(cfg.linear_batch_size), lr=float(cfg.linear_lr), weight_decay=float(cfg.linear_weight_decay),
      seed=int(config.seed), early_stopping_metric=str(ft.get('early_stopping_metric', 'mean_macro_f1')))
  all_momentum = momentum_predictions(ds, momentum)
  preds = {}
  for split in ('val', 'test'):
    ends = ds.split_ends(split)
    majority = {t: np.full(len(ends), evaluate.majority_class(ds.labels.task(t)[train_ends], NUM_CLASSES[t]),
                           np.int32) for t in TASKS}
    preds[split] = {'majority': majority, 'momentum': {t: all_momentum[t][ends] for t in TASKS},
                    'linear': predict_linear(linear, ds, ends)}
  return preds, momentum, linear, history


# ========================================================================================= persistence
def save(directory: str, momentum: Mapping, linear_params: Mapping, info: Mapping) -> None:
  """directory/{momentum.json, linear.npz, info.json}: what the backtest needs to trade the baselines."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, 'momentum.json'), 'w') as f:
    json.dump(momentum, f, indent=2)
  np.savez(os.path.join(directory, 'linear.npz'), **{k: np.asarray(v) for k, v in linear_params.items()})
  with open(os.path.join(directory, 'info.json'), 'w') as f:
    json.dump(info, f, indent=2, default=float)


def load(directory: str) -> tuple[dict, dict] | None:
  """(momentum params, linear params) saved by `save`, or None when the directory holds none."""
  if not os.path.exists(os.path.join(directory, 'momentum.json')):
    return None
  with open(os.path.join(directory, 'momentum.json')) as f:
    momentum = json.load(f)
  with np.load(os.path.join(directory, 'linear.npz')) as z:
    linear = {k: z[k] for k in z.files}
  return momentum, linear
