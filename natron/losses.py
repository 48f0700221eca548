"""Losses for pretraining and multi-task fine-tuning. Pure jnp; every result is float32.

Weighted means divide by the sum of the weights actually used (as torch's weighted cross entropy does), so a
class-weighted loss stays on the scale of the unweighted one, and a batch with no valid label yields 0
rather than NaN.
"""
from typing import Mapping

import jax
import jax.numpy as jnp

TASKS = ('buy', 'sell', 'direction', 'regime')


def _weighted_mean(values, weights):
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1e-12)


def focal_loss(logits, labels, *, gamma: float, class_weights=None, sample_weights=None, mask=None):
  """Mean focal loss -(1 - p_t)^gamma log p_t over valid rows; gamma=0 is (weighted) cross entropy.

  Args:
    logits: [B, C] (any float dtype; computed in float32).
    labels: int [B]; -1 (or any label outside [0, C)) marks a row without label and is ignored.
    gamma: focusing parameter >= 0.
    class_weights: optional [C] weight per true class.
    sample_weights: optional [B] per-row weight (e.g. label uniqueness).
    mask: optional [B] (1 = real row, 0 = padding of a fixed-shape batch).
  Returns:
    float32 scalar: sum(w_i * loss_i) / sum(w_i), w_i = class_weight[y_i] * sample_weight_i * mask_i.
  """
  logits = jnp.asarray(logits, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  num_classes = logits.shape[-1]
  valid = (labels >= 0) & (labels < num_classes)
  safe = jnp.where(valid, labels, 0)
  log_p = jax.nn.log_softmax(logits, axis=-1)
  log_pt = jnp.take_along_axis(log_p, safe[:, None], axis=-1)[:, 0]
  loss = -log_pt
  if gamma:
    loss = loss * (1.0 - jnp.exp(log_pt)) ** gamma
  weights = valid.astype(jnp.float32)
  if class_weights is not None:
    weights = weights * jnp.asarray(class_weights, jnp.float32)[safe]
  if sample_weights is not None:
    weights = weights * jnp.asarray(sample_weights, jnp.float32)
  if mask is not None:
    weights = weights * jnp.asarray(mask, jnp.float32)
  return _weighted_mean(loss, weights)


def accuracy(logits, labels, mask=None):
  """Fraction of valid rows (label >= 0, mask > 0) whose argmax is the label; float32 scalar."""
  labels = jnp.asarray(labels, jnp.int32)
  valid = (labels >= 0).astype(jnp.float32)
  if mask is not None:
    valid = valid * jnp.asarray(mask, jnp.float32)
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  return _weighted_mean(correct, valid)


def multitask_loss(outputs, batch, *, task_weights: Mapping[str, float], class_weights=None, gamma=0.0):
  """Weighted sum of per-task focal losses.

  Args:
    outputs: NatronModel outputs (buy/sell/direction/regime logits).
    batch: Dataset batch with int labels per task (-1 = none), optional `weight` [B] and `mask` [B].
    task_weights: {task: weight}; tasks missing or weighted 0 are skipped.
    class_weights: optional {task: [C]} (None or a missing task: unweighted).
    gamma: focal gamma, a float or {task: gamma}.
  Returns:
    (loss float32 scalar, metrics {loss, loss_<task>, accuracy_<task>}).
  """
  class_weights = class_weights or {}
  total = jnp.zeros((), jnp.float32)
  metrics = {}
  for task in TASKS:
    weight = float(task_weights.get(task, 0.0))
    if not weight:
      continue
    task_gamma = float(gamma[task] if isinstance(gamma, Mapping) else gamma)
    cw = class_weights.get(task) if isinstance(class_weights, Mapping) else None
    loss = focal_loss(outputs[task], batch[task], gamma=task_gamma, class_weights=cw,
                      sample_weights=batch.get('weight'), mask=batch.get('mask'))
    total = total + weight * loss
    metrics[f'loss_{task}'] = loss
    metrics[f'accuracy_{task}'] = accuracy(outputs[task], batch[task], batch.get('mask'))
  metrics['loss'] = total
  return total, metrics


def masked_mse(pred, target, mask):
  """Mean squared error over the masked time steps only.

  pred, target: [B, W, F]; mask: [B, W] (bool or 0/1 weights). Returns the mean over masked steps and all
  features (float32; 0 when nothing is masked).
  """
  err = jnp.square(jnp.asarray(pred, jnp.float32) - jnp.asarray(target, jnp.float32)).mean(axis=-1)
  return _weighted_mean(err, jnp.asarray(mask, jnp.float32))


def info_nce(z1, z2, temperature: float, mask=None):
  """Symmetric InfoNCE (NT-Xent across views) between two views' projections.

  z1, z2: [B, P]; row i of z1 and row i of z2 are a positive pair, every other row of the other view is a
  negative. Projections are L2-normalised; logits = z1 z2^T / temperature. `mask` [B] drops padding rows
  both as anchors and as negatives. Returns the mean of the two directions' cross entropies (float32).
  """
  z1 = jnp.asarray(z1, jnp.float32)
  z2 = jnp.asarray(z2, jnp.float32)
  z1 = z1 / jnp.maximum(jnp.linalg.norm(z1, axis=-1, keepdims=True), 1e-6)
  z2 = z2 / jnp.maximum(jnp.linalg.norm(z2, axis=-1, keepdims=True), 1e-6)
  logits = z1 @ z2.T / temperature                                # [B, B], positives on the diagonal
  rows = jnp.ones(z1.shape[0], jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
  diag = jnp.diagonal(logits)
  # Padding rows must not act as negatives: a large negative logit removes them from the softmax.
  keep = rows[None, :] > 0
  loss_12 = jax.nn.logsumexp(jnp.where(keep, logits, -1e9), axis=1) - diag
  loss_21 = jax.nn.logsumexp(jnp.where(keep, logits.T, -1e9), axis=1) - diag
  return 0.5 * (_weighted_mean(loss_12, rows) + _weighted_mean(loss_21, rows))
