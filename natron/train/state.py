"""Training infrastructure shared by pretraining and fine-tuning (big_vision style).

- `TrainState`: a plain pytree (step, params, opt_state); the dropout RNG is not stored, it is the run's
  seed key with the step folded in, so a resumed run draws exactly the same random numbers.
- `make_optimizer`: AdamW + linear warmup + cosine decay + global-norm clipping; the encoder can be frozen
  or trained at a lower learning rate (selected by the top-level 'encoder' parameter path).
- `make_mesh` / `shard_batch`: data parallelism by sharding the batch over a 'data' mesh axis with
  replicated parameters (no pmap): the same code runs on 1 CPU core, 4 fake devices or 8 GPUs.
- Multi-host (`jax.distributed`, one process per host): `host_shard` (this process's share of every global
  batch), `replicate` (host values -> replicated global arrays), `gather` (global arrays and per-process
  shares -> whole numpy values on every process), `is_main_process` (process 0 alone writes files) and
  `sync` (a barrier, so files process 0 wrote are visible to every process afterwards).
- `init_state`: `jax.eval_shape` to learn the state's structure, then one jitted init with out_shardings.
- `make_train_step`: one `jax.jit` (state donated) returning the new state and loss, grad/param norms.
- `keep_host_memory_mapped`: stops glibc from returning large buffers to the OS after every use, which on CPU
  costs more than the matmuls themselves (call once at program start).
- `MetricWriter` (JSON lines + TensorBoard events, process 0 only) and `TrainLogger` (progress with
  samples/s and ETA, reading the metrics of steps that are already finished, and stopping on a non-finite
  loss with the step where it began).
"""
import ctypes
import ctypes.util
import json
import math
import os
import sys
import time
from typing import Any, Callable, Mapping

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from natron.errors import UserError


class NonFiniteError(UserError):
  """The training loss became NaN or infinite; the message names the first bad step."""


# ----------------------------------------------------------------------------------------------------------
# Host memory.
# ----------------------------------------------------------------------------------------------------------
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8   # glibc <malloc.h> mallopt parameters


def keep_host_memory_mapped() -> bool:
  """Makes glibc malloc keep and reuse freed memory instead of unmapping it; True when applied.

  XLA:CPU and its matmul library (YNNPACK) allocate buffers of tens of MB per op per step. glibc serves
  each allocation above 32 MB with a fresh mmap and unmaps it on free (and trims thread arenas with
  madvise), so every step touches its activations as new pages: at seed scale ~670,000 page faults per
  training step, a third of the step on a 2-core VM (measured: bf16 6.2 s -> 3.3-4.4 s per step at one
  core; zero faults after). This keeps every allocation in one heap that is never trimmed: the process
  keeps its peak memory, which training and serving reach on every step anyway. Call it once, at program
  start, before JAX runs anything (arenas already handed to threads keep their own settings). No-op (False)
  off glibc (macOS, musl) and when NATRON_KEEP_HOST_MEMORY=0.
  """
  if os.environ.get('NATRON_KEEP_HOST_MEMORY', '1') == '0' or not sys.platform.startswith('linux'):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  # One arena (threads' own arenas are trimmed with madvise regardless), no mmap'd chunks, and a trim
  # threshold of -1: mallopt takes an int, which glibc converts to size_t, i.e. SIZE_MAX (never trim).
  ok = mallopt(_M_ARENA_MAX, 1) and mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, -1)
  return bool(ok)


@flax.struct.dataclass
class TrainState:
  step: Any       # int32 scalar: number of updates applied
  params: Any     # model parameters (the 'params' collection, without the wrapper)
  opt_state: Any  # optax state


# ----------------------------------------------------------------------------------------------------------
# Optimizer.
# ----------------------------------------------------------------------------------------------------------
def _get(section, key, default):
  value = section.get(key, default) if hasattr(section, 'get') else getattr(section, key, default)
  return default if value is None else value


def make_schedule(section, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then cosine decay to `lr * min_lr_frac` at `total_steps`.

  Reads section.lr (required), warmup_steps (int, default 0) or warmup_frac (fraction of total_steps),
  min_lr_frac (default 0.0).
  """
  lr = float(section.lr)
  total_steps = max(int(total_steps), 1)
  warmup = int(_get(section, 'warmup_steps', 0)) or int(round(float(_get(section, 'warmup_frac', 0.0))
                                                            * total_steps))
  warmup = min(warmup, total_steps - 1) if total_steps > 1 else 0
  end = lr * float(_get(section, 'min_lr_frac', 0.0))
  if warmup == 0:
    return optax.cosine_decay_schedule(lr, total_steps, alpha=end / lr if lr else 0.0)
  return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total_steps, end_value=end)


def _decay_mask(params):
  """Weight decay on matrices only: biases, LayerNorm scales and token vectors are not decayed."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def _partition_labels(params):
  """'encoder' for everything under the top-level 'encoder' key, 'other' for the rest."""
  return {k: jax.tree.map(lambda _, k=k: 'encoder' if k == 'encoder' else 'other', v)
          for k, v in params.items()}


def make_optimizer(section, total_steps: int, *, encoder_lr_mult: float = 1.0,
                   freeze_encoder: bool = False) -> optax.GradientTransformation:
  """AdamW + warmup/cosine schedule + global-norm clipping.

  section: a ConfigDict/mapping with lr, weight_decay (0.01), grad_clip (1.0; 0 disables), b1 (0.9),
  b2 (0.999), eps (1e-8), warmup_steps / warmup_frac, min_lr_frac. `freeze_encoder` zeroes the updates of
  params['encoder'] (its optimizer state is then empty); `encoder_lr_mult` scales its learning rate.
  Clipping uses the global norm of all gradients, before the split.
  """
  schedule = make_schedule(section, total_steps)
  adamw = lambda sched: optax.adamw(
      sched, b1=float(_get(section, 'b1', 0.9)), b2=float(_get(section, 'b2', 0.999)),
      eps=float(_get(section, 'eps', 1e-8)), weight_decay=float(_get(section, 'weight_decay', 0.01)),
      mask=_decay_mask)
  clip = float(_get(section, 'grad_clip', 1.0))
  chain = [optax.clip_by_global_norm(clip)] if clip > 0 else []
  if not freeze_encoder and encoder_lr_mult == 1.0:
    return optax.chain(*chain, adamw(schedule))
  encoder = (optax.set_to_zero() if freeze_encoder
             else adamw(lambda count: schedule(count) * encoder_lr_mult))
  return optax.chain(*chain, optax.multi_transform({'encoder': encoder, 'other': adamw(schedule)},
                                                   _partition_labels))


# ----------------------------------------------------------------------------------------------------------
# Sharding.
# ----------------------------------------------------------------------------------------------------------
def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh named 'data' over all (or the given) devices; Auto axes so jit propagates shardings."""
  # Processes in order along 'data', so process p's share (host_shard) is rows [p*B/P, (p+1)*B/P) of the
  # global batch: the same global batch, in the same order, as a single process would build.
  devices = sorted(devices if devices is not None else jax.devices(), key=lambda d: (d.process_index, d.id))
  return jax.make_mesh((len(devices),), ('data',), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharding(mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data'; other axes whole."""
  return NamedSharding(mesh, P('data'))


def shard_batch(batch: Mapping[str, Any], mesh) -> dict:
  """Places a batch (dict of arrays, leading batch axis) on the mesh, split over 'data'.

  Single process: `batch` is the global batch. Multi-host (jax.distributed): `batch` is this process's
  share (Dataset.batches(..., num_shards=process_count, shard_index=process_index)) and the global array
  is assembled from every process's share.
  """
  sharding = data_sharding(mesh)
  if jax.process_count() > 1:
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
  n = mesh.shape['data']
  sizes = {np.shape(v)[0] for v in batch.values()}
  if any(size % n for size in sizes):
    raise UserError(f'Batch size {sorted(sizes)} is not divisible by the {n} devices of the data mesh; '
                    f'choose a batch size that is a multiple of {n}.')
  return jax.device_put(dict(batch), sharding)


# ----------------------------------------------------------------------------------------------------------
# Multi-host: one process per host, every process runs the same program on its share of each batch.
# ----------------------------------------------------------------------------------------------------------
def is_main_process() -> bool:
  """True in the process that writes files (metrics, reports, bundle meta, config.json): process 0.

  Every process computes (collectives need all of them) and calls Orbax (whose multi-host saves need every
  process); only this one writes the rest, so a shared workdir gets each file once.
  """
  return jax.process_index() == 0


def host_shard() -> dict:
  """Keyword arguments of `Dataset.batches` that give this process its contiguous share of every global
  batch (empty in a single process, which loads whole batches)."""
  if jax.process_count() == 1:
    return {}
  return {'num_shards': jax.process_count(), 'shard_index': jax.process_index()}


def replicate(tree, mesh):
  """Host values (numpy, or arrays equal on every process) -> arrays replicated over the mesh's devices."""
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def put(x):
    x = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(put, tree)


def gather(tree):
  """Whole numpy values on every process.

  Single process: `jax.device_get`. Multi-host: a global jax.Array (batch-sharded or replicated) comes back
  whole; a host-local array (this process's share of a batch, from `host_shard`) is concatenated with every
  other process's share in process order, which rebuilds the global batch.
  """
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def sync(name: str) -> None:
  """A barrier across processes (no-op in one process): after process 0 wrote a file, every process sees it."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def init_state(model_apply_init: Callable, optimizer: optax.GradientTransformation, sample_batch,
               rng, mesh) -> TrainState:
  """Creates the replicated TrainState.

  model_apply_init(rng, sample_batch) -> params (e.g. `lambda r, b: model.init(r, b['x'], train=False)
  ['params']`). Shapes come from `jax.eval_shape` (no FLOPs); the arrays are then created by one jitted
  function with replicated out_shardings, so they are born on every device instead of copied from device 0.
  """
  def init(rng, batch):
    params = model_apply_init(rng, batch)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))

  shapes = jax.eval_shape(init, rng, sample_batch)
  shardings = jax.tree.map(lambda _: replicated(mesh), shapes)
  return jax.jit(init, out_shardings=shardings)(rng, sample_batch)


def tree_norm(tree) -> jax.Array:
  """Global L2 norm of a pytree, float32."""
  return optax.global_norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation, mesh) -> Callable:
  """One jitted update: `step(state, batch, rng) -> (state, metrics)`.

  loss_fn(params, batch, rng) -> (loss, metrics dict). The rng given is the run's base key; the step
  number is folded in here, so every step (and a resumed run) draws its own reproducible dropout noise.
  The state is donated (updated in place). metrics = loss_fn's metrics + loss, grad_norm, param_norm.
  """
  repl = replicated(mesh)

  def step(state: TrainState, batch, rng):
    step_rng = jax.random.fold_in(rng, state.step)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, step_rng)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, loss=loss, grad_norm=tree_norm(grads), param_norm=tree_norm(params))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return jax.jit(step, in_shardings=(repl, data_sharding(mesh), repl), out_shardings=(repl, repl),
                 donate_argnums=(0,))


# ----------------------------------------------------------------------------------------------------------
# Metrics and progress.
# ----------------------------------------------------------------------------------------------------------
def _to_python(value):
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


class MetricWriter:
  """Writes metrics as JSON lines to workdir/<phase>/metrics.jsonl and TensorBoard events beside them.

  Only process 0 writes (multi-host runs share the workdir). Scalars go to TensorBoard; lists (e.g. a
  confusion matrix) only to the JSON lines.
  """

  def __init__(self, workdir: str, phase: str):
    self.directory = os.path.join(workdir, phase)
    self.active = is_main_process()
    self._tb = None
    self._file = None
    if self.active:
      os.makedirs(self.directory, exist_ok=True)
      self._file = open(os.path.join(self.directory, 'metrics.jsonl'), 'a')
      from tensorboardX import SummaryWriter   # imported here: only the writing process needs it
      self._tb = SummaryWriter(os.path.join(self.directory, 'tensorboard'))

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.active:
      return
    record = {'step': int(step), 'time': time.time()}
    record.update({k: _to_python(v) for k, v in metrics.items()})
    self._file.write(json.dumps(record, allow_nan=True) + '\n')
    self._file.flush()
    for key, value in record.items():
      if key not in ('step', 'time') and isinstance(value, (int, float)):
        self._tb.add_scalar(key, value, int(step))

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class TrainLogger:
  """Collects per-step device metrics and logs them every `log_every` steps without stalling the device.

  `update(step, metrics)` only stores the (not yet computed) device arrays. At a log step it reads the
  metrics of every stored step except the newest one, which the device may still be computing, so the
  host never waits on the step it just dispatched. Reading them checks that the loss is finite and, if not,
  raises NonFiniteError naming the first bad step. `flush()` reads everything (end of epoch / run).
  Logged record: the mean of each metric over the steps read, plus samples/s and ETA.
  """

  def __init__(self, writer: MetricWriter | None, *, total_steps: int, batch_size: int, log_every: int = 50,
               prefix: str = 'train/', first_step: int = 0):
    self.writer = writer
    self.total_steps = int(total_steps)
    self.batch_size = int(batch_size)
    self.log_every = max(int(log_every), 1)
    self.prefix = prefix
    self._pending = []
    self._last_step, self._last_time = int(first_step), time.time()

  def update(self, step: int, metrics) -> None:
    """`step` = number of updates done after this one (state.step as a host int)."""
    self._pending.append((int(step), metrics))
    if step % self.log_every == 0 or step == self.total_steps:
      self._log(self._pending[:-1] if len(self._pending) > 1 else [])
      self._pending = self._pending[-1:]

  def flush(self) -> dict:
    """Reads and logs every pending step; returns the logged record (empty if nothing was pending)."""
    pending, self._pending = self._pending, []
    return self._log(pending)

  def _log(self, items) -> dict:
    if not items:
      return {}
    host = jax.device_get([m for _, m in items])
    for (step, _), metrics in zip(items, host):
      loss = float(metrics['loss'])
      if not math.isfinite(loss):
        raise NonFiniteError(
            f'The training loss became {loss} at step {step} (first non-finite update; every earlier step '
            'was finite). Lower the learning rate or check the input data for extreme values.')
    step = items[-1][0]
    now = time.time()
    rate = (step - self._last_step) * self.batch_size / max(now - self._last_time, 1e-9)
    eta = (self.total_steps - step) * self.batch_size / rate if rate > 0 else float('nan')
    self._last_step, self._last_time = step, now
    record = {self.prefix + k: float(np.mean([np.asarray(m[k]) for m in host]))
              for k in host[-1] if np.ndim(host[-1][k]) == 0}
    record.update({'samples_per_sec': rate, 'eta_sec': eta})
    logging.info('step %d/%d  loss %.4f  %.1f samples/s  ETA %s', step, self.total_steps,
                 record[self.prefix + 'loss'], rate, _fmt_eta(eta))
    if self.writer is not None:
      self.writer.write(step, record)
    return record


def _fmt_eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  return f'{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'
