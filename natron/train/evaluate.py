"""Classification metrics for the four supervised tasks, and the jitted pass that produces predictions.

The metric functions are pure numpy on integer label / prediction arrays; `-1` marks a row without a label
(its horizon ran past the data, or a padding row) and is ignored everywhere. Conventions (sklearn's):

  confusion_matrix[i, j] = number of rows whose true class is i and predicted class is j.
  precision_c = TP_c / (TP_c + FP_c), recall_c = TP_c / (TP_c + FN_c), 0 where the denominator is 0.
  macro_f1 = mean over classes of F1_c = 2 P_c R_c / (P_c + R_c), taken over the classes that occur in the
             labels or in the predictions (a class absent from both says nothing about the model).
  majority_baseline = accuracy on the evaluated split of always predicting the class that is most frequent
             in the TRAINING span (never the evaluated split's own majority: that would peek at its labels).
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from natron import stats

TASKS = ('buy', 'sell', 'direction', 'regime')


def _labelled(labels: np.ndarray, preds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  labels = np.asarray(labels).reshape(-1)
  preds = np.asarray(preds).reshape(-1)
  if labels.shape != preds.shape:
    raise ValueError(f'labels {labels.shape} and predictions {preds.shape} differ in length.')
  keep = labels >= 0
  return labels[keep].astype(np.int64), preds[keep].astype(np.int64)


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
  """int64 [C, C]: rows are true classes, columns predicted classes; rows with label -1 are skipped."""
  y, p = _labelled(labels, preds)
  if y.size and (y.max() >= num_classes or p.min() < 0 or p.max() >= num_classes):
    raise ValueError(f'class ids must lie in [0, {num_classes}); got labels up to {y.max()}, '
                     f'predictions in [{p.min()}, {p.max()}].')
  return np.bincount(y * num_classes + p, minlength=num_classes * num_classes).reshape(
      num_classes, num_classes).astype(np.int64)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  num = np.asarray(num, np.float64)
  den = np.asarray(den, np.float64)
  return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def precision_recall(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-class precision and recall (float64 [C] each) from a confusion matrix; 0 where undefined."""
  tp = np.diag(cm)
  return _safe_div(tp, cm.sum(axis=0)), _safe_div(tp, cm.sum(axis=1))


def f1_per_class(cm: np.ndarray) -> np.ndarray:
  precision, recall = precision_recall(cm)
  return _safe_div(2 * precision * recall, precision + recall)


def macro_f1(cm: np.ndarray) -> float:
  """Mean F1 over the classes present in the labels or the predictions (0.0 for an empty matrix)."""
  present = (cm.sum(axis=0) + cm.sum(axis=1)) > 0
  if not present.any():
    return 0.0
  return float(f1_per_class(cm)[present].mean())


def accuracy(cm: np.ndarray) -> float:
  total = cm.sum()
  return float(np.trace(cm) / total) if total else 0.0


def majority_class(train_labels: np.ndarray, num_classes: int) -> int:
  """Most frequent class among the labelled training rows (lowest id on ties)."""
  y = np.asarray(train_labels).reshape(-1)
  y = y[y >= 0]
  if not y.size:
    raise ValueError('the training span has no labelled rows; no majority class exists.')
  return int(np.argmax(np.bincount(y, minlength=num_classes)))


def majority_baseline(train_labels: np.ndarray, eval_labels: np.ndarray, num_classes: int) -> float:
  """Accuracy on `eval_labels` of always predicting the training span's most frequent class."""
  y = np.asarray(eval_labels).reshape(-1)
  y = y[y >= 0]
  if not y.size:
    return 0.0
  return float(np.mean(y == majority_class(train_labels, num_classes)))


def task_metrics(labels: np.ndarray, preds: np.ndarray, num_classes: int,
                 train_labels: np.ndarray) -> dict:
  """All metrics of one task on one split, JSON-ready (lists, floats, ints)."""
  cm = confusion_matrix(labels, preds, num_classes)
  precision, recall = precision_recall(cm)
  return {
      'accuracy': accuracy(cm),
      'macro_f1': macro_f1(cm),
      'majority_baseline': majority_baseline(train_labels, labels, num_classes),
      'majority_class': majority_class(train_labels, num_classes),
      'precision': [float(v) for v in precision],
      'recall': [float(v) for v in recall],
      'f1': [float(v) for v in f1_per_class(cm)],
      'support': [int(v) for v in cm.sum(axis=1)],
      'confusion_matrix': cm.tolist(),
      'n': int(cm.sum()),
  }


def evaluate_predictions(preds: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray],
                         train_labels: Mapping[str, np.ndarray],
                         num_classes: Mapping[str, int]) -> dict:
  """{task: task_metrics} for every task in `num_classes`, plus 'mean_macro_f1' and 'mean_accuracy'."""
  out = {task: task_metrics(labels[task], preds[task], n, train_labels[task])
         for task, n in num_classes.items()}
  out['mean_macro_f1'] = float(np.mean([out[t]['macro_f1'] for t in num_classes]))
  out['mean_accuracy'] = float(np.mean([out[t]['accuracy'] for t in num_classes]))
  return out


# ----------------------------------------------------------------------------------------------------------
# Baselines, intervals and a verdict (the finetune/report.json contract).
# ----------------------------------------------------------------------------------------------------------
MARGIN_METRIC = 'accuracy'   # majority is a no-skill floor in accuracy (not in macro-F1, where it scores low)


def bootstrap_block(label_params: Mapping | None, config_block: int = -1, task: str | None = None) -> int:
  """Block length in windows: config_block when > 0, else the task's label horizon (regime_horizon for regime,
  horizon for the others; the longest over symbols), or the longest of both when `task` is None."""
  if int(config_block) > 0:
    return int(config_block)
  keys = (('regime_horizon',) if task == 'regime' else ('horizon',)) if task else ('horizon', 'regime_horizon')
  horizons = [int(p.get(k, 0)) for p in (label_params or {}).values() if isinstance(p, Mapping) for k in keys]
  return max(horizons + [1])


def with_baselines(task_entry: Mapping, labels: np.ndarray, model_preds: np.ndarray,
                   baseline_preds: Mapping[str, np.ndarray], num_classes: int, *, block: int,
                   n_boot: int = stats.N_BOOT, seed: int = 0, level: float = stats.LEVEL) -> dict:
  """`task_entry` (task_metrics) plus intervals, baselines, margins and the verdict of one task on one split.

  Adds: accuracy_ci, macro_f1_ci ([lo, hi]); baselines {name: {accuracy, accuracy_ci, macro_f1, macro_f1_ci}};
  margins {name: {value, ci}} (model - baseline in accuracy, paired bootstrap); margin_over_best_baseline
  {value, ci, baseline, metric} against the baseline with the highest accuracy on this split (the strongest
  opponent, chosen conservatively on the evaluated rows); verdict (stats.verdict of that margin);
  bootstrap {block, replicates, level, kind}.
  """
  ci = stats.classification_intervals(labels, {'model': model_preds, **baseline_preds}, num_classes,
                                      block=block, n_boot=n_boot, seed=seed, level=level)
  out = dict(task_entry)
  out.update(accuracy_ci=ci['model']['accuracy_ci'], macro_f1_ci=ci['model']['macro_f1_ci'])
  out['baselines'] = {name: stats.public(ci[name]) for name in baseline_preds}
  out['margins'] = {name: stats.margin(ci['model'], ci[name], MARGIN_METRIC, level) for name in baseline_preds}
  best = max(baseline_preds, key=lambda name: (ci[name][MARGIN_METRIC], name == 'majority'))
  out['margin_over_best_baseline'] = {**out['margins'][best], 'baseline': best, 'metric': MARGIN_METRIC}
  out['verdict'] = stats.verdict(out['margins'][best], best, metric=MARGIN_METRIC, level=level)
  out['verdicts'] = {name: stats.verdict(m, name, metric=MARGIN_METRIC, level=level)
                     for name, m in out['margins'].items()}
  out['bootstrap'] = {'kind': 'circular block', 'block': int(block), 'replicates': int(n_boot), 'level': level,
                      'seed': int(seed)}
  return out


def metric_value(metrics: Mapping, name: str) -> float:
  """Looks up an early-stopping metric: 'mean_macro_f1', 'mean_accuracy', 'loss' or '<task>_<metric>'."""
  if name in metrics and not isinstance(metrics[name], Mapping):
    return float(metrics[name])
  for task in TASKS:
    if name.startswith(task + '_') and task in metrics:
      key = name[len(task) + 1:]
      if key in metrics[task]:
        return float(metrics[task][key])
  raise KeyError(name)


# ----------------------------------------------------------------------------------------------------------
# Predictions over a split: one jitted forward per fixed-shape batch, host transfer once per batch.
# ----------------------------------------------------------------------------------------------------------
def make_predict_fn(model, loss_fn: Callable | None = None) -> Callable:
  """jit(params, batch) -> (preds {task: int32 [B]}, probs {task: float32 [B, C]}, loss float32 scalar).

  `batch` holds x [B, W, F] (+ labels, weight, mask when `loss_fn(outputs, batch) -> scalar` is given; the
  loss is NaN without it). Dropout is off (train=False).
  """

  @jax.jit
  def predict(params, batch):
    out = model.apply({'params': params}, batch['x'], train=False)
    preds = {t: jnp.argmax(out[t], axis=-1).astype(jnp.int32) for t in TASKS}
    probs = {t: jax.nn.softmax(out[t].astype(jnp.float32), axis=-1) for t in TASKS}
    loss = loss_fn(out, batch) if loss_fn is not None else jnp.float32(jnp.nan)
    return preds, probs, loss

  return predict


def predict_split(predict_fn: Callable, params, batches: Iterable[Mapping[str, np.ndarray]], *,
                  mesh=None) -> dict:
  """Runs `predict_fn` (from make_predict_fn) over every batch and drops padding rows (mask 0).

  Multi-host (`mesh` given and several processes): `batches` are this process's shares of the global batches
  (`state.host_shard`); each is assembled into a global array over `mesh`, and predictions and host arrays are
  gathered back, so every process returns the whole split, in the order a single process would.
  Returns {'preds': {task: int32 [N]}, 'probs': {task: float32 [N, C]}, 'labels': {task: int32 [N]},
  'end': int64 [N] (when the batches carry it), 'loss': mean of the batch losses weighted by their real rows}.
  """
  preds = {t: [] for t in TASKS}
  probs = {t: [] for t in TASKS}
  labels = {t: [] for t in TASKS}
  ends, losses, rows = [], [], []
  multi_host = mesh is not None and jax.process_count() > 1
  for batch in batches:
    inputs = {k: v for k, v in batch.items() if k != 'end'}
    if multi_host:
      from natron.train import state as state_lib  # pylint: disable=g-import-not-at-top
      out = predict_fn(params, state_lib.shard_batch(inputs, mesh))
      (p, q, loss), batch = state_lib.gather((out, {k: v for k, v in batch.items() if k != 'x'}))
    else:
      p, q, loss = jax.device_get(predict_fn(params, inputs))
    keep = np.asarray(batch['mask']) > 0
    for t in TASKS:
      preds[t].append(np.asarray(p[t])[keep])
      probs[t].append(np.asarray(q[t])[keep])
      labels[t].append(np.asarray(batch[t])[keep])
    if 'end' in batch:
      ends.append(np.asarray(batch['end'])[keep])
    losses.append(float(loss))
    rows.append(int(keep.sum()))
  return {
      'preds': {t: np.concatenate(v) if v else np.zeros(0, np.int32) for t, v in preds.items()},
      'probs': {t: np.concatenate(v) if v else np.zeros((0, 1), np.float32) for t, v in probs.items()},
      'labels': {t: np.concatenate(v) if v else np.zeros(0, np.int32) for t, v in labels.items()},
      'end': np.concatenate(ends) if ends else np.zeros(0, np.int64),
      'loss': float(np.average(losses, weights=rows)) if sum(rows) else float('nan'),
  }


# ----------------------------------------------------------------------------------------------------------
# Markdown summary (report.md).
# ----------------------------------------------------------------------------------------------------------
def _ci(values) -> str:
  lo, hi = values
  return f'[{lo:.3f}, {hi:.3f}]'


def baseline_table(split_report: Mapping, tasks=TASKS) -> list[str]:
  """Markdown rows: each task's model accuracy and macro-F1 (with intervals) beside every baseline's, the
  margin over the best baseline with its interval, and the verdict in words."""
  names = None
  lines = []
  for task in tasks:
    m = split_report.get(task)
    if not m or 'baselines' not in m:
      continue
    if names is None:
      names = list(m['baselines'])
      lines += ['| task | model accuracy | ' + ' | '.join(f'{n} acc.' for n in names)
                + ' | model macro-F1 | ' + ' | '.join(f'{n} F1' for n in names) + ' | margin over best | verdict |',
                '|---' * (5 + 2 * len(names)) + '|']
    best = m['margin_over_best_baseline']
    lines.append(
        f"| {task} | {m['accuracy']:.3f} {_ci(m['accuracy_ci'])} | "
        + ' | '.join(f"{m['baselines'][n]['accuracy']:.3f}" for n in names)
        + f" | {m['macro_f1']:.3f} {_ci(m['macro_f1_ci'])} | "
        + ' | '.join(f"{m['baselines'][n]['macro_f1']:.3f}" for n in names)
        + f" | {100 * best['value']:+.1f} pts [{100 * best['ci'][0]:+.1f}, {100 * best['ci'][1]:+.1f}] vs "
        f"{best['baseline']} | {m['verdict']} |")
  return lines


def report_markdown(report: Mapping, class_names: Mapping[str, tuple[str, ...]]) -> str:
  """A table per split with each task's accuracy and macro-F1 beside its baselines, intervals and verdict."""
  lines = ['# Fine-tuning report', '']
  for split in ('val', 'test'):
    if split not in report:
      continue
    lines += [f'## {split}', '',
              '| task | accuracy | majority baseline | margin | macro-F1 | labelled rows |',
              '|---|---|---|---|---|---|']
    for task in TASKS:
      m = report[split][task]
      lines.append(f"| {task} | {m['accuracy']:.4f} | {m['majority_baseline']:.4f} | "
                   f"{m['accuracy'] - m['majority_baseline']:+.4f} | {m['macro_f1']:.4f} | {m['n']} |")
    lines.append('')
    table = baseline_table(report[split])
    if table:
      boot = report[split][TASKS[0]].get('bootstrap', {})
      blocks = ', '.join(f"{t} {report[split][t].get('bootstrap', {}).get('block')}" for t in TASKS)
      lines += [f'### {split}: baselines, {100 * boot.get("level", 0.95):.0f}% intervals and verdicts', '',
                'Every baseline is fitted on the training span only (momentum: volatility-scaled past return; '
                "regime: the label's rule on the trailing window; linear: DLinear-style logistic regression on "
                f"the same scaled window). Intervals: {boot.get('kind', 'block')} bootstrap, blocks of the label "
                f"horizon ({blocks} windows), {boot.get('replicates')} replicates; margins are paired.", '']
      lines += table + ['']
      lines += [f"- {task}: {report[split][task]['verdict']}; vs majority: "
                f"{report[split][task]['verdicts'].get('majority', 'n/a')}" for task in TASKS
                if 'verdict' in report[split][task]]
      lines.append('')
    for task in TASKS:
      m = report[split][task]
      names = class_names[task]
      lines += [f'### {split} / {task}', '',
                '| class | precision | recall | support |', '|---|---|---|---|']
      lines += [f'| {names[c]} | {m["precision"][c]:.4f} | {m["recall"][c]:.4f} | {m["support"][c]} |'
                for c in range(len(names))]
      lines += ['', 'Confusion matrix (rows true, columns predicted): '
                + '; '.join(f'{names[i]}: {row}' for i, row in enumerate(m['confusion_matrix'])), '']
  return '\n'.join(lines) + '\n'
