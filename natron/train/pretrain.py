"""Phase 1: self-supervised pretraining of the Natron encoder (`run_phase(config, workdir)`).

Two tasks on unlabelled windows, summed with config weights (both on by default):
- masked reconstruction: `mask_ratio` of the time steps (single steps, or spans) are replaced by a learned
  mask token after the input projection; a per-step linear head reconstructs the F input features and the
  MSE is taken over the masked steps only;
- contrastive InfoNCE: two augmented views of each window (crop + resample, per-feature scaling, jitter,
  a zeroed time span) are encoded and their projections matched against the rest of the batch.
The masked window and both views go through the encoder as ONE batch of 3B windows (one forward, better
matmul shapes). Output: Orbax checkpoints in workdir/pretrain/checkpoints (state + meta), metrics in
workdir/pretrain/metrics.jsonl; `natron.checkpoint.load_params_for_init(workdir + '/pretrain')` hands the
encoder to fine-tuning. A run resumes from its own latest checkpoint (saved every epoch) and then
reproduces an uninterrupted run exactly: data order depends on (seed, epoch), dropout/masking noise on
(seed, step). Multi-host: each process loads its share of every global batch; process 0 alone writes files.
"""
import json
import math
import os
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from natron import checkpoint
from natron import losses
from natron.errors import UserError
from natron.model import NatronPretrain
from natron.train import state as train_state

PHASE = 'pretrain'


# ----------------------------------------------------------------------------------------------------------
# Masking and augmentations (pure, jittable; shapes static).
# ----------------------------------------------------------------------------------------------------------
def random_step_mask(rng, batch: int, window: int, ratio: float, *, span: int = 1) -> jax.Array:
  """bool [batch, window]: True where a time step is masked.

  span == 1: exactly round(ratio * window) distinct steps per window (at least one). span > 1: that many
  steps covered by ceil(count / span) spans of `span` steps at random starts (they may overlap, so the
  share is at most `ratio`).
  """
  count = max(1, int(round(ratio * window)))
  if span <= 1:
    ranks = jnp.argsort(jnp.argsort(jax.random.uniform(rng, (batch, window)), axis=1), axis=1)
    return ranks < count
  span = min(int(span), window)
  spans = max(1, math.ceil(count / span))
  starts = jax.random.randint(rng, (batch, spans, 1), 0, window - span + 1)
  t = jnp.arange(window)[None, None, :]
  return jnp.any((t >= starts) & (t < starts + span), axis=1)


def crop_resize(x, rng, min_frac: float):
  """Random contiguous crop of min_frac..1 of each window, linearly resampled back to [B, W, F]."""
  batch, window, _ = x.shape
  k_len, k_start = jax.random.split(rng)
  length = jax.random.uniform(k_len, (batch,), minval=min_frac, maxval=1.0) * (window - 1)
  start = jax.random.uniform(k_start, (batch,)) * (window - 1 - length)
  pos = start[:, None] + jnp.linspace(0.0, 1.0, window)[None, :] * length[:, None]   # [B, W] in [0, W-1]
  lo = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, window - 1)
  hi = jnp.minimum(lo + 1, window - 1)
  frac = (pos - lo)[..., None]
  take = lambda idx: jnp.take_along_axis(x, idx[..., None], axis=1)
  return take(lo) * (1.0 - frac) + take(hi) * frac


def augment(x, rng, aug) -> jax.Array:
  """One random view of float32 [B, W, F]: crop+resample, per-feature scaling, jitter, a zeroed time span."""
  batch, window, features = x.shape
  k_crop, k_scale, k_jitter, k_time = jax.random.split(rng, 4)
  if aug.crop_min < 1.0:
    x = crop_resize(x, k_crop, float(aug.crop_min))
  if aug.scale > 0:
    x = x * (1.0 + aug.scale * jax.random.normal(k_scale, (batch, 1, features)))
  if aug.jitter > 0:
    x = x + aug.jitter * jax.random.normal(k_jitter, x.shape)
  span = int(round(aug.time_mask * window))
  if span > 0:
    start = jax.random.randint(k_time, (batch, 1), 0, window - span + 1)
    t = jnp.arange(window)[None, :]
    x = jnp.where(((t >= start) & (t < start + span))[..., None], 0.0, x)
  return x


def make_loss_fn(model: NatronPretrain, cfg, *, train: bool):
  """loss_fn(params, batch, rng) -> (loss, metrics) for the enabled pretraining tasks (float32)."""
  w_rec, w_con = float(cfg.reconstruction_weight), float(cfg.contrastive_weight)
  span = int(cfg.mean_span) if cfg.span_masking else 1

  def loss_fn(params, batch, rng):
    x, rows = batch['x'], batch['mask']
    b, w, _ = x.shape
    k_mask, k_view1, k_view2, k_drop = jax.random.split(rng, 4)
    parts, step_masks = [], []
    if w_rec:
      step_mask = random_step_mask(k_mask, b, w, float(cfg.mask_ratio), span=span)
      parts.append(x)
      step_masks.append(step_mask)
    if w_con:
      parts += [augment(x, k_view1, cfg.augment), augment(x, k_view2, cfg.augment)]
      step_masks += [jnp.zeros((b, w), bool)] * 2
    out = model.apply({'params': params}, jnp.concatenate(parts), jnp.concatenate(step_masks), train=train,
                      rngs={'dropout': k_drop})
    loss = jnp.zeros((), jnp.float32)
    metrics = {}
    if w_rec:
      rec = losses.masked_mse(out['reconstruction'][:b], x, step_mask & (rows[:, None] > 0))
      loss += w_rec * rec
      metrics['reconstruction'] = rec
    if w_con:
      z = out['projection'][-2 * b:]
      con = losses.info_nce(z[:b], z[b:], float(cfg.temperature), mask=rows)
      loss += w_con * con
      metrics['contrastive'] = con
    metrics['loss'] = loss
    return loss, metrics

  return loss_fn


def make_eval_step(loss_fn, mesh):
  """Jitted (params, batch, rng) -> metrics summed over real rows (for a row-weighted mean on the host)."""
  def step(params, batch, rng):
    _, metrics = loss_fn(params, batch, rng)
    rows = jnp.sum(batch['mask'])
    return {k: v * rows for k, v in metrics.items()} | {'rows': rows}

  repl = train_state.replicated(mesh)
  return jax.jit(step, in_shardings=(repl, train_state.data_sharding(mesh), repl), out_shardings=repl)


def epoch_seed(seed: int, epoch: int) -> int:
  """The shuffle seed of one epoch, so epochs (and a resumed run) get reproducible, distinct orders."""
  return int(np.random.SeedSequence([int(seed), 1, int(epoch)]).generate_state(1)[0])


def _device_batch(batch):
  return {'x': batch['x'], 'mask': batch['mask']}


def _load_dataset(config):
  from natron import data as data_lib        # imported here: tests may pass a prebuilt dataset
  from natron import dataset as dataset_lib
  frame = data_lib.load_market(config.data)
  return dataset_lib.build_dataset(frame, config)


def _checkpoint_meta(config, ds, epoch: int, steps: int) -> dict:
  from natron import features
  return {'phase': PHASE, 'epoch': int(epoch), 'step': int(steps), 'config': config.to_dict(),
          'feature_names': list(ds.feature_names), 'feature_schema_hash': features.feature_schema_hash(),
          'scaler': ds.scaler, 'window': int(ds.window)}


def run_phase(config, workdir: str, *, dataset=None) -> dict:
  """Pretrains the encoder described by config.model with config.pretrain; returns summary metrics.

  `dataset`: an already built natron.dataset.Dataset (tests, pipelines); default: built from config.data.
  """
  cfg = config.pretrain
  out_dir = os.path.join(workdir, PHASE)
  if not (cfg.reconstruction_weight or cfg.contrastive_weight):
    raise UserError('pretrain: reconstruction_weight and contrastive_weight are both 0; nothing to learn.')
  if train_state.is_main_process():   # multi-host: every process trains, process 0 alone writes files
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))

  # ========================================================================================================
  # Data: unlabelled windows (labels are never read here); padding rows carry mask 0.
  # ========================================================================================================
  ds = dataset if dataset is not None else _load_dataset(config)
  batch_size = int(cfg.batch_size or config.dataset.batch_size)
  n_train = len(ds.split_ends('train', labelled=False))
  if n_train == 0 or len(ds.split_ends('val', labelled=False)) == 0:
    raise UserError(f'pretrain needs windows in the train and val splits (train has {n_train}); use more '
                    'bars or a shorter window.')
  steps_per_epoch = math.ceil(n_train / batch_size)
  if cfg.max_steps_per_epoch:
    steps_per_epoch = min(steps_per_epoch, int(cfg.max_steps_per_epoch))
  total_steps = int(cfg.epochs) * steps_per_epoch
  logging.info('pretrain: %d training windows, batch %d, %d steps/epoch, %d epochs', n_train, batch_size,
               steps_per_epoch, cfg.epochs)

  # ========================================================================================================
  # Model and optimizer.
  # ========================================================================================================
  model = NatronPretrain(config.model, projection_dim=int(cfg.projection_dim))
  optimizer = train_state.make_optimizer(cfg, total_steps)
  root = jax.random.PRNGKey(int(config.seed))
  init_rng, train_rng, eval_rng = jax.random.split(root, 3)

  # ========================================================================================================
  # Sharding: batch split over the 'data' axis, state replicated.
  # ========================================================================================================
  mesh = train_state.make_mesh()
  if batch_size % mesh.shape['data']:
    raise UserError(f'pretrain batch size {batch_size} must be a multiple of the {mesh.shape["data"]} '
                    'devices.')
  # Multi-host: each process loads only its contiguous share of every global batch.
  host_shard = train_state.host_shard()
  sample = {'x': np.zeros((batch_size, ds.window, ds.num_features), np.float32),
            'mask': np.ones(batch_size, np.float32)}
  init = lambda rng, b: model.init(rng, b['x'], jnp.zeros(b['x'].shape[:2], bool), train=False)['params']
  state = train_state.init_state(init, optimizer, sample, init_rng, mesh)

  # ========================================================================================================
  # Update and eval steps: one jit each; the train step donates the state.
  # ========================================================================================================
  train_step = train_state.make_train_step(make_loss_fn(model, cfg, train=True), optimizer, mesh)
  eval_step = make_eval_step(make_loss_fn(model, cfg, train=False), mesh)

  # ========================================================================================================
  # Checkpoint restore: this phase's own workdir (resume), else scratch.
  # ========================================================================================================
  manager = checkpoint.make_manager(os.path.join(out_dir, 'checkpoints'), max_to_keep=int(cfg.max_to_keep))
  first_epoch = 0
  restored = checkpoint.restore_latest(manager, state)
  if restored is not None:
    state, meta = restored
    first_epoch = int(meta['epoch']) + 1
    logging.info('pretrain: resuming from %s after epoch %d (step %d)', manager.directory, first_epoch,
                 int(state.step))

  # ========================================================================================================
  # Evaluation: validation loss with fixed batches, masks and views (same seed and rng every epoch) so
  # epochs are comparable. The batches are shuffled (once, by a fixed seed) because InfoNCE needs
  # negatives from other times: chronological neighbours overlap by W-1 steps and are near-duplicates.
  # ========================================================================================================
  def evaluate(params) -> dict:
    sums = None
    for i, batch in enumerate(ds.batches('val', batch_size, seed=0, shuffle=True, labelled=False,
                                         **host_shard)):
      if cfg.eval_max_batches and i >= int(cfg.eval_max_batches):
        break
      device_batch = train_state.shard_batch(_device_batch(batch), mesh)
      out = eval_step(params, device_batch, jax.random.fold_in(eval_rng, i))
      sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    sums = jax.device_get(sums)
    rows = float(sums.pop('rows'))
    return {f'val/{k}': float(v) / rows for k, v in sums.items()}

  # ========================================================================================================
  # Training loop.
  # ========================================================================================================
  writer = train_state.MetricWriter(workdir, PHASE)
  logger = train_state.TrainLogger(writer, total_steps=total_steps, batch_size=batch_size,
                                   log_every=int(cfg.log_every), first_step=int(state.step))
  train_record, val_record = {}, {}
  start = time.time()
  step = int(state.step)
  try:
    for epoch in range(first_epoch, int(cfg.epochs)):
      batches = ds.batches('train', batch_size, seed=epoch_seed(config.seed, epoch), shuffle=True,
                           labelled=False, **host_shard)
      for _, batch in zip(range(steps_per_epoch), batches):
        state, metrics = train_step(state, train_state.shard_batch(_device_batch(batch), mesh), train_rng)
        step += 1
        logger.update(step, metrics)
      train_record = logger.flush() or train_record
      val_record = evaluate(state.params)
      writer.write(step, dict(val_record, epoch=epoch))
      logging.info('pretrain epoch %d/%d: %s', epoch + 1, cfg.epochs,
                   ', '.join(f'{k} {v:.4f}' for k, v in val_record.items()))
      checkpoint.save(manager, step, state, _checkpoint_meta(config, ds, epoch, step), metrics=val_record)
  finally:
    writer.close()
  if not val_record:   # resumed after the last epoch: report the restored model
    val_record = evaluate(state.params)

  summary = {'epochs': int(cfg.epochs), 'steps': step, 'seconds': time.time() - start,
             'checkpoint_dir': str(manager.directory)}
  summary.update({k.replace('/', '_'): v for k, v in val_record.items()})
  if train_record:
    summary['train_loss'] = train_record['train/loss']
    summary['samples_per_sec'] = train_record['samples_per_sec']
  if train_state.is_main_process():
    with open(os.path.join(out_dir, 'summary.json'), 'w') as f:
      json.dump(summary, f, indent=2)
  return summary
