"""Phase 2: supervised multi-task fine-tuning (buy, sell, direction, regime) of the Natron encoder.

  python launch.py --config=configs/finetune.py[:quick] --workdir=DIR

Reads top to bottom in big_vision's stages: data, model and optimizer, sharding, update step, checkpoint
restore, evals, loop, final report. Everything lands in `DIR/finetune/`:
  checkpoints/   Orbax CheckpointManager: the latest epoch (to resume) and the best by the early-stopping
                 metric; the meta of each holds the early-stopping bookkeeping, so a resumed run continues
                 exactly where the interrupted one stopped.
  metrics.jsonl  one JSON line per log step and per epoch (+ tensorboard/).
  report.json    report[split][task][accuracy|accuracy_ci|macro_f1|macro_f1_ci|baselines|margins|
                 margin_over_best_baseline|verdict|majority_baseline|precision|recall|confusion_matrix] for
                 split in (val, test), computed with the best epoch's parameters beside the baselines of
                 natron.baselines (majority, momentum, linear; fitted on the training span only) with paired
                 block-bootstrap intervals (natron.stats); report.md beside it, verdicts in words.
  baselines/     momentum.json (fitted rule), linear.npz (linear model), info.json: what the backtest trades.
  bundle/        params + meta (scaler, feature names, schema hash, ...): what serving and RL load.

Initialisation order: this phase's own latest checkpoint (resume), then `finetune.model_init` (a pretrain
checkpoint: its encoder is loaded, parameters matching `finetune.dont_load` keep their fresh values), then
scratch. Determinism: the init key, every step's dropout key (the seed with the step folded in) and every
epoch's shuffle (seed, epoch) are functions of config.seed, so a resumed run matches an uninterrupted one.
Multi-host (jax.distributed, one process per host, the same command): each process loads its contiguous share of
every global batch, train and eval; the evals gather the predictions back, so every process takes the same
early-stopping decisions and computes the same report; every process calls Orbax; process 0 alone writes the
metrics, report, baselines and bundle meta. Equal to one process with the same global batch to float32
rounding (tests/test_multihost.py).
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import os
import re
import time
from typing import Any, Callable, Mapping

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from natron import baselines as baselines_lib
from natron import checkpoint
from natron import data as data_lib
from natron import dataset as dataset_lib
from natron import features as features_lib
from natron import labels as labels_lib
from natron import losses
from natron.errors import UserError
from natron.model import NatronModel
from natron.train import evaluate
from natron.train import state as train_state

TASKS = labels_lib.TASKS
PHASE = 'finetune'
EARLY_STOPPING_METRICS = ('mean_macro_f1', 'mean_accuracy', 'loss') + tuple(
    f'{task}_{metric}' for task in TASKS for metric in ('macro_f1', 'accuracy'))
MODEL_VERSION_PREFIX = 'natron-finetune'


# ----------------------------------------------------------------------------------------------------------
# Helpers: config reading, class weights, initialisation from a pretrain checkpoint.
# ----------------------------------------------------------------------------------------------------------
def _get(section, key: str, default):
  value = section.get(key, default) if hasattr(section, 'get') else getattr(section, key, default)
  return default if value is None else value


def metric_mode(name: str) -> str:
  """'min' for losses, 'max' for accuracy / F1 style metrics."""
  return 'min' if name == 'loss' or name.endswith('_loss') else 'max'


def tempered_class_weights(class_weights: Mapping[str, list], power: float) -> dict:
  """{task: float32 [C]}: the training span's inverse-frequency weights ** power, mean 1 over present classes.

  power 1 gives every class the same total weight (optimises balanced recall, costs accuracy on skewed
  tasks); 0 is the unweighted loss; in between trades the two. Absent classes (weight 0) stay 0.
  """
  out = {}
  for task, w in class_weights.items():
    w = np.asarray(w, np.float64)
    present = w > 0
    tempered = np.where(present, np.power(np.where(present, w, 1.0), power), 0.0)
    if present.any():
      tempered = tempered / tempered[present].mean()
    out[task] = tempered.astype(np.float32)
  return out


def init_rngs(seed: int) -> tuple[jax.Array, jax.Array]:
  """(parameter-init key, base dropout key) of a run; make_train_step folds the step into the latter."""
  init_rng, dropout_rng = jax.random.split(jax.random.key(int(seed)))
  return init_rng, dropout_rng


def epoch_seed(seed: int, epoch: int) -> int:
  """The shuffle seed of one epoch: a hash of (seed, epoch), so epochs and seeds never share an order."""
  return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0])


def load_model_init(model_init: str, workdir: str) -> tuple[str, dict | None]:
  """(path, params) to initialise from, or ('', None) for scratch.

  'auto' = workdir/pretrain when it holds a checkpoint or bundle (else scratch); '' = scratch; anything else
  must be a pretrain workdir, checkpoint directory or bundle (see checkpoint.load_params_for_init).
  """
  model_init = str(model_init or '')
  if not model_init:
    return '', None
  if model_init == 'auto':
    candidate = os.path.join(workdir, 'pretrain')
    if not os.path.isdir(candidate):
      return '', None
    try:
      return candidate, checkpoint.load_params_for_init(candidate)
    except checkpoint.CheckpointError:
      logging.warning('model_init=auto: %s holds no checkpoint; fine-tuning from scratch.', candidate)
      return '', None
  if not os.path.exists(model_init):
    raise UserError(f'finetune.model_init={model_init!r} does not exist; give a pretrain workdir, checkpoint '
                    "directory or bundle, 'auto' (workdir/pretrain when present) or '' (scratch).")
  return model_init, checkpoint.load_params_for_init(model_init)


def merge_params(fresh, loaded, dont_load) -> tuple[dict, dict]:
  """Takes every parameter of `fresh` from `loaded`, except those whose 'a/b/c' path matches a regex of
  `dont_load` (they keep their fresh initialisation).

  A parameter that should be loaded but is missing from `loaded`, or has another shape, is a user error
  (a checkpoint of a different architecture or feature set), never silently re-initialised.
  Returns (params with fresh's structure and dtypes, {'loaded': [paths], 'fresh': [paths]}).
  """
  patterns = [re.compile(p) for p in dont_load]
  flat_fresh = flax.traverse_util.flatten_dict(flax.core.unfreeze(fresh), sep='/')
  flat_loaded = flax.traverse_util.flatten_dict(flax.core.unfreeze(loaded), sep='/')
  out, kept, taken, problems = {}, [], [], []
  for path, value in flat_fresh.items():
    if any(p.search(path) for p in patterns):
      out[path] = value
      kept.append(path)
      continue
    source = flat_loaded.get(path)
    if source is None:
      problems.append(f'{path} is missing from the checkpoint')
    elif tuple(np.shape(source)) != tuple(value.shape):
      problems.append(f'{path} has shape {tuple(np.shape(source))} in the checkpoint, {tuple(value.shape)} '
                      'in this model')
    else:
      out[path] = jnp.asarray(source, value.dtype)
      taken.append(path)
  if problems:
    shown = '; '.join(problems[:5]) + (f'; and {len(problems) - 5} more' if len(problems) > 5 else '')
    raise UserError(f'Cannot initialise from the checkpoint: {shown}. It was trained with another model size '
                    'or feature set; match config.model / the features, or add the parameters to '
                    'finetune.dont_load.')
  return flax.traverse_util.unflatten_dict(out, sep='/'), {'loaded': taken, 'fresh': kept}


def initial_params(fresh, model_init: str, loaded, dont_load) -> tuple[Any, dict]:
  """(params, init info) of a new run: `fresh` merged with `loaded` (from `model_init`), or `fresh` alone."""
  if loaded is None:
    return fresh, {'source': 'scratch'}
  params, info = merge_params(fresh, loaded, tuple(dont_load))
  logging.info('Initialised %d parameter arrays from %s; %d kept fresh (dont_load=%s).',
               len(info['loaded']), model_init, len(info['fresh']), list(dont_load))
  return params, {'source': os.path.abspath(model_init), 'loaded': len(info['loaded']),
                  'fresh': info['fresh']}


def params_digest(params) -> str:
  """sha256 over every parameter's path, shape, dtype and bytes: identifies the model in the bundle."""
  h = hashlib.sha256()
  for path, value in sorted(flax.traverse_util.flatten_dict(jax.device_get(params), sep='/').items()):
    value = np.ascontiguousarray(np.asarray(value))
    h.update(f'{path}:{value.shape}:{value.dtype};'.encode())
    h.update(value.tobytes())
  return h.hexdigest()


def rl_start_rows(ds, holdout: float) -> dict:
  """{symbol: first global row of its RL part}: the last `holdout` fraction of each symbol's training span
  (from its first training window end to its train_end). 0 -> the symbol's train_end (no RL part)."""
  if not 0.0 <= holdout < 1.0:
    raise UserError(f'finetune.rl_holdout must be in [0, 1), got {holdout}.')
  out = {}
  for b in ds.bounds:
    ends = ds.ends['train'][(ds.ends['train'] >= b['start']) & (ds.ends['train'] < b['stop'])]
    first = int(ends.min()) if len(ends) else int(b['train_end'])
    out[str(b['symbol'])] = int(b['train_end']) - int(round(holdout * (int(b['train_end']) - first)))
  return out


def hold_out_for_rl(ds, holdout: float) -> dict:
  """Keeps the later part of the training span out of fine-tuning, for PPO (DESIGN.md rule 2: anything
  trained on a model's outputs sees out-of-sample outputs).

  Training windows whose labels read any bar at or after their symbol's RL start (`rl_start_rows`) are dropped
  from ds.ends['train'] (in place): the purge is exact, no label of the encoder's training reaches into the RL
  part, so the encoder's outputs there are out-of-sample like on validation and test. The scaler and class
  weights stay those of the whole training span (the scaler reads no label). Returns {symbol: RL start row}.
  """
  starts = rl_start_rows(ds, holdout)
  if holdout <= 0:
    return starts
  ends = ds.ends['train']
  limit = np.zeros(len(ends), np.int64)
  for b in ds.bounds:
    inside = (ends >= b['start']) & (ends < b['stop'])
    limit[inside] = starts[str(b['symbol'])]
  keep = dataset_lib.label_end_rows(ends, ds.labels.t1) < limit
  logging.info('finetune: %d of %d training windows kept for the encoder; the last %.0f%% of the training span '
               '(%d windows, purged by label end) is left to PPO.', int(keep.sum()), len(ends), 100 * holdout,
               int((ends >= limit).sum()))
  ds.ends['train'] = ends[keep]
  return starts


def _device_batch(batch: Mapping[str, np.ndarray]) -> dict:
  """The arrays the jitted functions read ('end' is int64 bookkeeping for the host only)."""
  return {k: v for k, v in batch.items() if k != 'end'}


class EarlyStopping:
  """Tracks the best value of the validation metric and the epochs since it last improved.

  A JSON-able `state()` goes into every checkpoint's meta, so a resumed run stops at the same epoch.
  `improvements` counts new bests; it is the metric the CheckpointManager ranks checkpoints by, so the
  checkpoint kept as "best" is always this tracker's best (min_delta and ties included: the earlier wins).
  """

  def __init__(self, mode: str, patience: int, min_delta: float = 0.0, state: Mapping | None = None):
    self.mode, self.patience, self.min_delta = mode, int(patience), float(min_delta)
    state = dict(state or {})
    self.best = state.get('best')
    self.best_epoch = int(state.get('best_epoch', -1))
    self.bad_epochs = int(state.get('bad_epochs', 0))
    self.improvements = int(state.get('improvements', 0))

  def update(self, epoch: int, value: float) -> bool:
    """Records one epoch's value; returns True when it is a new best."""
    improved = self.best is None or (value > self.best + self.min_delta if self.mode == 'max'
                                     else value < self.best - self.min_delta)
    if improved:
      self.best, self.best_epoch, self.bad_epochs = float(value), int(epoch), 0
      self.improvements += 1
    else:
      self.bad_epochs += 1
    return improved

  @property
  def should_stop(self) -> bool:
    return self.patience > 0 and self.bad_epochs >= self.patience

  def state(self) -> dict:
    return {'best': self.best, 'best_epoch': self.best_epoch, 'bad_epochs': self.bad_epochs,
            'improvements': self.improvements}


def _epoch_record(metrics: Mapping, loss: float) -> dict:
  """Scalars of one validation pass for metrics.jsonl / TensorBoard."""
  record = {'val/loss': loss, 'val/mean_macro_f1': metrics['mean_macro_f1'],
            'val/mean_accuracy': metrics['mean_accuracy']}
  for task in TASKS:
    for key in ('accuracy', 'macro_f1', 'majority_baseline'):
      record[f'val/{task}_{key}'] = metrics[task][key]
  return record


@dataclasses.dataclass(frozen=True)
class Programs:
  """What a run compiles: the model, its optimizer and the jitted update / prediction functions."""
  model: NatronModel
  optimizer: optax.GradientTransformation
  train_step: Callable     # (state, batch, dropout_rng) -> (state, metrics); state donated
  predict_fn: Callable     # (params, batch) -> (preds, probs, loss), see evaluate.make_predict_fn


_PROGRAMS: 'collections.OrderedDict[str, Programs]' = collections.OrderedDict()
_MAX_PROGRAMS = 4


def _plain(section) -> Any:
  return section.to_dict() if hasattr(section, 'to_dict') else dict(section)


def build_programs(config, total_steps: int, class_weights: Mapping[str, np.ndarray], mesh) -> Programs:
  """Model, optimizer and jitted functions for these settings, memoised per process.

  The jitted functions close over exactly what the key holds (model and fine-tuning config, schedule
  length, class weights, devices), so a second run with identical settings in the same process (a resume
  after an in-process failure, a repeated sweep point, the tests) reuses the compiled executables instead of
  compiling them again.
  """
  cfg = config.finetune
  key = json.dumps({'model': _plain(config.model), 'finetune': _plain(cfg), 'total_steps': int(total_steps),
                    'class_weights': {t: np.asarray(w).tolist() for t, w in class_weights.items()},
                    'devices': [d.id for d in mesh.devices.flat]}, sort_keys=True, default=str)
  if key in _PROGRAMS:
    _PROGRAMS.move_to_end(key)
    return _PROGRAMS[key]
  model = NatronModel(config.model)
  optimizer = train_state.make_optimizer(cfg, total_steps,
                                         encoder_lr_mult=float(_get(cfg, 'encoder_lr_mult', 1.0)),
                                         freeze_encoder=bool(_get(cfg, 'freeze_encoder', False)))
  task_weights = {t: float(cfg.task_weights[t]) for t in TASKS}
  gamma = float(_get(cfg, 'focal_gamma', 0.0))
  use_sample_weights = bool(_get(cfg, 'use_sample_weights', True))

  def task_loss(outputs, batch):
    if not use_sample_weights:
      batch = dict(batch, weight=jnp.ones_like(batch['weight']))
    return losses.multitask_loss(outputs, batch, task_weights=task_weights, class_weights=class_weights,
                                 gamma=gamma)

  def loss_fn(params, batch, rng):
    outputs = model.apply({'params': params}, batch['x'], train=True, rngs={'dropout': rng})
    return task_loss(outputs, batch)

  programs = Programs(model=model, optimizer=optimizer,
                      train_step=train_state.make_train_step(loss_fn, optimizer, mesh),
                      predict_fn=evaluate.make_predict_fn(model, lambda out, batch: task_loss(out, batch)[0]))
  _PROGRAMS[key] = programs
  while len(_PROGRAMS) > _MAX_PROGRAMS:
    _PROGRAMS.popitem(last=False)
  return programs


def run_phase(config, workdir: str) -> dict:
  """Fine-tunes, evaluates the best epoch on val and test, writes report + bundle; returns the summary."""
  cfg = config.finetune
  out_dir = os.path.join(workdir, PHASE)
  if train_state.is_main_process():   # multi-host: every process trains, process 0 alone writes files
    os.makedirs(out_dir, exist_ok=True)
  seed = int(config.seed)
  epochs = int(cfg.epochs)
  batch_size = int(cfg.batch_size)
  eval_batch_size = int(_get(cfg, 'eval_batch_size', batch_size))
  if epochs < 1 or batch_size < 1 or eval_batch_size < 1:
    raise UserError(f'finetune.epochs, batch_size and eval_batch_size must be >= 1; got {epochs}, '
                    f'{batch_size}, {eval_batch_size}.')
  es_metric = str(_get(cfg, 'early_stopping_metric', 'mean_macro_f1'))
  if es_metric not in EARLY_STOPPING_METRICS:
    raise UserError(f'finetune.early_stopping_metric={es_metric!r} is not one of {EARLY_STOPPING_METRICS}.')
  mode = metric_mode(es_metric)

  # ========================================================================================================
  # Data: features, labels, purged splits and the train-span statistics (scaler, class weights).
  # ========================================================================================================
  ds = dataset_lib.build_dataset(data_lib.load_market(config.data), config)
  rl_starts = hold_out_for_rl(ds, float(_get(cfg, 'rl_holdout', 0.0)))
  train_ends = ds.split_ends('train')
  for split in ('train', 'val', 'test'):
    if not len(ds.split_ends(split)):
      raise UserError(f'The {split} split has no labelled windows; use more bars (config.data) or change '
                      'config.dataset.split.')
  steps_per_epoch = math.ceil(len(train_ends) / batch_size)
  total_steps = epochs * steps_per_epoch
  train_labels = {t: ds.labels.task(t)[train_ends] for t in TASKS}
  class_weights = tempered_class_weights(ds.class_weights, float(_get(cfg, 'class_weight_power', 0.5)))
  if not any(float(cfg.task_weights[t]) for t in TASKS):
    raise UserError('finetune.task_weights are all 0: at least one task must be trained.')
  logging.info('finetune: %d train / %d val / %d test windows, %d steps per epoch, %d epochs, %d features.',
               len(train_ends), len(ds.split_ends('val')), len(ds.split_ends('test')), steps_per_epoch,
               epochs, ds.num_features)

  # ========================================================================================================
  # Model, optimizer and update step: one jit, state donated; the dropout key is the seed's key with the step
  # folded in (make_train_step). Built once per process for identical settings (see build_programs).
  # ========================================================================================================
  mesh = train_state.make_mesh()
  if batch_size % mesh.shape['data']:
    raise UserError(f'finetune.batch_size={batch_size} must be a multiple of the {mesh.shape["data"]} devices.')
  # Multi-host: each process loads only its contiguous share of every global batch (train and eval); the
  # evals gather the predictions back, so every process computes the same report from the same numbers.
  host_shard = train_state.host_shard()
  if host_shard and eval_batch_size % mesh.shape['data']:
    raise UserError(f'finetune.eval_batch_size={eval_batch_size} must be a multiple of the '
                    f'{mesh.shape["data"]} devices of a multi-host run.')
  programs = build_programs(config, total_steps, class_weights, mesh)
  model, optimizer = programs.model, programs.optimizer
  init_rng, dropout_rng = init_rngs(seed)

  # ========================================================================================================
  # Sharding: the batch is split over the 'data' mesh axis, parameters and optimizer state replicated.
  # ========================================================================================================
  sample = {'x': np.zeros((batch_size, ds.window, ds.num_features), np.float32)}
  state = train_state.init_state(lambda r, b: model.init(r, b['x'], train=False)['params'], optimizer,
                                 sample, init_rng, mesh)
  train_step, predict_fn = programs.train_step, programs.predict_fn

  # ========================================================================================================
  # Checkpoint restore: own workdir first (resume), then model_init, then scratch.
  # ========================================================================================================
  # Checkpoints are ranked by the early stopper's improvement count (-1 for an epoch that did not improve),
  # so the kept "best" is exactly the epoch early stopping considers best; the latest is kept to resume.
  manager = checkpoint.make_manager(os.path.join(out_dir, 'checkpoints'),
                                    max_to_keep=int(_get(cfg, 'max_to_keep', 1)), best_metric='rank',
                                    mode='max')
  restored = checkpoint.restore_latest(manager, state)
  if restored is not None:
    state, meta = restored
    progress = dict(meta['progress'])
    init_info = dict(meta.get('init', {}))
    logging.info('Resuming fine-tuning from %s at epoch %d (step %d).', manager.directory,
                 progress['epoch'], int(state.step))
  else:
    progress = {'epoch': 0, 'stopped_early': False, 'history': [], 'early_stopping': {}}
    model_init, loaded = load_model_init(_get(cfg, 'model_init', ''), workdir)
    params, init_info = initial_params(state.params, model_init, loaded,
                                       tuple(_get(cfg, 'dont_load', ('^heads/',))))
    state = state.replace(params=train_state.replicate(params, mesh))
  stopper = EarlyStopping(mode, int(_get(cfg, 'patience', 0)), float(_get(cfg, 'min_delta', 0.0)),
                          progress['early_stopping'])

  # ========================================================================================================
  # Evals: one pass over a split with the jitted forward; metrics on the host (numpy).
  # ========================================================================================================
  def run_eval(params, split: str) -> tuple[dict, dict]:
    batches = ds.batches(split, eval_batch_size, shuffle=False, **host_shard)
    result = evaluate.predict_split(predict_fn, params, batches, mesh=mesh)
    metrics = evaluate.evaluate_predictions(result['preds'], result['labels'], train_labels,
                                            labels_lib.NUM_CLASSES)
    metrics['loss'] = result['loss']
    return metrics, result

  # ========================================================================================================
  # Loop: epochs of shuffled fixed-shape batches; the host reads metrics only at log steps / epoch ends.
  # ========================================================================================================
  writer = train_state.MetricWriter(workdir, PHASE)
  step = int(state.step)
  logger = train_state.TrainLogger(writer, total_steps=total_steps, batch_size=batch_size,
                                   log_every=int(_get(cfg, 'log_every', 50)), first_step=step)
  start, first_epoch = time.time(), progress['epoch']
  try:
    for epoch in range(progress['epoch'], epochs):
      if progress['stopped_early']:
        break
      for batch in ds.batches('train', batch_size, seed=epoch_seed(seed, epoch), shuffle=True, **host_shard):
        state, metrics = train_step(state, train_state.shard_batch(_device_batch(batch), mesh), dropout_rng)
        step += 1
        logger.update(step, metrics)
      logger.flush()
      val, _ = run_eval(state.params, 'val')
      score = evaluate.metric_value(val, es_metric)
      improved = stopper.update(epoch, score)
      progress['history'].append({'epoch': epoch, 'step': step, 'score': score, 'loss': val['loss'],
                                  'mean_macro_f1': val['mean_macro_f1'], 'mean_accuracy': val['mean_accuracy']})
      progress.update(epoch=epoch + 1, stopped_early=stopper.should_stop, early_stopping=stopper.state())
      writer.write(step, {'epoch': epoch + 1, f'val/{es_metric}': score, **_epoch_record(val, val['loss'])})
      elapsed = time.time() - start
      eta = elapsed / (epoch + 1 - first_epoch) * (epochs - epoch - 1)
      logging.info('epoch %d/%d  val %s %.4f%s  mean macro-F1 %.4f  loss %.4f  (%.0f s, ETA %.0f s at most)',
                   epoch + 1, epochs, es_metric, score, ' (best)' if improved else '', val['mean_macro_f1'],
                   val['loss'], elapsed, eta)
      checkpoint.save(manager, step, state, {'progress': progress, 'init': init_info},
                      metrics={'rank': stopper.improvements if improved else -1, 'score': score})
      if stopper.should_stop:
        logging.info('Early stopping after epoch %d: %s has not improved for %d epochs (best %.4f at '
                     'epoch %d).', epoch + 1, es_metric, stopper.bad_epochs, stopper.best,
                     stopper.best_epoch + 1)
    best_step = manager.best_step()
    best_state, _ = checkpoint.restore(manager, state, step=best_step)
  finally:
    writer.close()
    manager.close()

  # ========================================================================================================
  # Final evaluation of the best epoch on val and test; report and serving bundle.
  # ========================================================================================================
  baseline_preds, momentum, linear, linear_history = baselines_lib.fit_and_predict(ds, config, class_weights)
  if train_state.is_main_process():
    baselines_lib.save(os.path.join(out_dir, 'baselines'), momentum, linear,
                       {'linear_history': linear_history, 'kernel': baselines_lib.KERNEL})
  ev = config.evaluation
  report = {}
  for split in ('val', 'test'):
    metrics, result = run_eval(best_state.params, split)
    ends = ds.split_ends(split)
    if not np.array_equal(result['end'], ends):
      raise AssertionError('predictions are not aligned with the split windows')   # a bug, never user input
    report[split] = {}
    for task in TASKS:
      report[split][task] = evaluate.with_baselines(
          metrics[task], result['labels'][task], result['preds'][task],
          {name: p[task] for name, p in baseline_preds[split].items()}, labels_lib.NUM_CLASSES[task],
          block=evaluate.bootstrap_block(ds.info.get('label_params'), int(ev.block), task),
          n_boot=int(ev.bootstrap), seed=seed, level=float(ev.level))
    report[split].update(mean_macro_f1=metrics['mean_macro_f1'], mean_accuracy=metrics['mean_accuracy'],
                         loss=metrics['loss'])
  report['baselines'] = {'momentum': {t: momentum[t] for t in ('buy', 'sell', 'direction')},
                         'regime_rule': 'regime label rule on the trailing window',
                         'linear_epochs': len(linear_history)}
  report['run'] = {
      'best_epoch': stopper.best_epoch + 1, 'best_step': int(best_step), 'epochs_run': progress['epoch'],
      'epochs': epochs, 'stopped_early': progress['stopped_early'], 'early_stopping_metric': es_metric,
      'best_value': stopper.best, 'init': init_info, 'history': progress['history'],
      'class_weights': {t: w.tolist() for t, w in class_weights.items()},
      'class_names': {t: list(labels_lib.CLASS_NAMES[t]) for t in TASKS},
  }
  if train_state.is_main_process():
    _write_report(out_dir, report)
  summary = summarize(report)
  params = train_state.gather(best_state.params)
  save_serving_bundle(os.path.join(out_dir, 'bundle'), params, config, ds, summary, int(best_step),
                      rl_starts=rl_starts)
  logging.info('finetune done: %s', json.dumps(summary))
  return summary


def summarize(report: Mapping) -> dict:
  """Flat summary (returned by run_phase, shown in sweep tables): test margins over the baselines."""
  out = {'best_epoch': report['run']['best_epoch'], 'epochs_run': report['run']['epochs_run'],
         'val_mean_macro_f1': report['val']['mean_macro_f1'],
         'test_mean_macro_f1': report['test']['mean_macro_f1']}
  for task in TASKS:
    m = report['test'][task]
    out[f'test_{task}_accuracy'] = m['accuracy']
    out[f'test_{task}_baseline'] = m['majority_baseline']
    out[f'test_{task}_margin'] = m['accuracy'] - m['majority_baseline']
    out[f'test_{task}_macro_f1'] = m['macro_f1']
    if 'margin_over_best_baseline' in m:
      best = m['margin_over_best_baseline']
      out[f'test_{task}_best_baseline'] = best['baseline']
      out[f'test_{task}_margin_over_best'] = best['value']
      out[f'test_{task}_margin_over_best_lo'], out[f'test_{task}_margin_over_best_hi'] = best['ci']
      out[f'test_{task}_skill'] = m['verdict'].startswith('skill')
  return out


def _write_report(out_dir: str, report: Mapping) -> None:
  with open(os.path.join(out_dir, 'report.json'), 'w') as f:
    json.dump(report, f, indent=2)
  names = {t: tuple(labels_lib.CLASS_NAMES[t]) for t in TASKS}
  text = evaluate.report_markdown(report, names)
  run = report['run']
  text += (f"\nBest epoch {run['best_epoch']} of {run['epochs_run']} run ({run['epochs']} configured; "
           f"early stopping on val {run['early_stopping_metric']}"
           f"{', stopped early' if run['stopped_early'] else ''}); initialised from {run['init']['source']}.\n")
  with open(os.path.join(out_dir, 'report.md'), 'w') as f:
    f.write(text)


def save_serving_bundle(directory: str, params, config, ds, summary: Mapping, step: int,
                        rl_starts: Mapping | None = None) -> str:
  """The bundle serving, RL and inspection load: params + everything needed to rebuild the inputs.

  `rl_starts` {symbol: global row}: where each symbol's bars unseen by fine-tuning begin inside the training
  span (finetune.rl_holdout); the rl phase trains PPO from there.
  """
  warmup = int(features_lib.WARMUP)
  meta = {
      'config': config.to_dict() if hasattr(config, 'to_dict') else dict(config),
      'feature_names': list(ds.feature_names),
      'feature_schema_hash': features_lib.feature_schema_hash(),
      'scaler': ds.scaler,
      'window': int(ds.window),
      'warmup': warmup,
      'required_candles': int(ds.window) + warmup,
      'label_classes': {t: list(labels_lib.CLASS_NAMES[t]) for t in TASKS},
      'label_params': ds.info.get('label_params', {}),
      'thresholds': {'signal': float(config.backtest.threshold)},
      'model_version': f'{MODEL_VERSION_PREFIX}-{params_digest(params)[:12]}',
      'metrics': dict(summary),
      'rl_holdout': {'fraction': float(_get(config.finetune, 'rl_holdout', 0.0)) if 'finetune' in config else 0.0,
                     'start_rows': {str(k): int(v) for k, v in (rl_starts or {}).items()}},
  }
  return checkpoint.save_bundle(directory, params, meta, step=step)
