"""Checkpoints and bundles: the one module that touches Orbax (0.12.x), so an upgrade is a one-file change.

Two kinds of directories:

- A training checkpoint directory (`make_manager`): an Orbax CheckpointManager with one sub-folder per saved
  step, each holding the item 'state' (TrainState pytree: step, params, optimizer state) and the item
  'meta' (JSON). It keeps the latest checkpoint for resuming and, with `best_metric`, the best ones too.
- A bundle directory (`save_bundle`): everything serving and later phases need and nothing else:
  `params/` (Orbax pytree) + `meta.json` (config, feature names, feature-schema hash, scaler, window,
  warm-up, required candles, label classes, thresholds, model version, step). `load_bundle` needs no target
  structure and returns plain numpy arrays, so any process (CPU server, different device count) can read it.

Multi-host runs (jax.distributed): every process calls `save` and `save_bundle` (Orbax's multi-host saves need
them all; replicated arrays are written once, by process 0); process 0 alone writes meta.json.
"""
import json
import os
import tempfile
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from natron.errors import UserError

_ITEMS = ('state', 'meta')
_PARAMS = 'params'
_META = 'meta.json'


class CheckpointError(UserError):
  """A checkpoint or bundle is missing, unreadable or incompatible with the current code."""


# ----------------------------------------------------------------------------------------------------------
# Training checkpoints (CheckpointManager).
# ----------------------------------------------------------------------------------------------------------
def make_manager(directory: str, *, max_to_keep: int = 2, best_metric: str | None = None,
                 mode: str = 'max', read_only: bool = False) -> ocp.CheckpointManager:
  """A CheckpointManager over `directory` (created if needed).

  Without `best_metric`, the newest `max_to_keep` checkpoints are kept. With it, the `max_to_keep` best
  checkpoints by `metrics[best_metric]` (`mode` 'max' or 'min') are kept plus always the latest one, so a
  run can both resume and export its best epoch (`manager.best_step()`).
  """
  if mode not in ('max', 'min'):
    raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
  directory = os.path.abspath(directory)
  policy = ocp.checkpoint_managers
  if best_metric is None:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                           read_only=read_only, enable_async_checkpointing=False)
  else:
    best_fn = lambda metrics: float(metrics[best_metric])
    preservation = policy.AnyPreservationPolicy([
        policy.LatestN(n=1),
        policy.BestN(get_metric_fn=best_fn, reverse=(mode == 'min'), n=max_to_keep,
                     keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(best_fn=best_fn, best_mode=mode, preservation_policy=preservation,
                                           create=not read_only, read_only=read_only,
                                           enable_async_checkpointing=False)
  return ocp.CheckpointManager(directory, item_names=_ITEMS, options=options)


def save(manager: ocp.CheckpointManager, step: int, state, meta: Mapping[str, Any],
         metrics: Mapping[str, float] | None = None) -> None:
  """Saves `state` (any pytree of arrays) and `meta` (JSON-able dict) as checkpoint `step`; waits for it."""
  metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
  manager.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                  meta=ocp.args.JsonSave(_jsonable(meta))),
               metrics=metrics, force=True)
  manager.wait_until_finished()


def restore(manager: ocp.CheckpointManager, target_state, step: int | None = None):
  """Restores checkpoint `step` (default: latest) into the structure, dtypes and shardings of
  `target_state` (concrete arrays or jax.ShapeDtypeStruct). Returns (state, meta), or None when the
  directory has no checkpoint."""
  step = manager.latest_step() if step is None else int(step)
  if step is None:
    return None
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                             meta=ocp.args.JsonRestore()))
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f'Checkpoint step {step} in {manager.directory} does not match the current '
                          f'model/optimizer structure: {e}') from e
  return restored['state'], dict(restored['meta'] or {})


def restore_latest(manager: ocp.CheckpointManager, target_state):
  """(state, meta) of the latest checkpoint, or None if there is none (a fresh run)."""
  return restore(manager, target_state)


def _host_abstract(metadata_tree):
  """ShapeDtypeStructs on the first local device: restores whatever sharding the writer used."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata_tree)


def _to_numpy(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def restore_numpy(directory: str, step: int | None = None):
  """Reads a training checkpoint without a target: (state as nested dict of np arrays, meta, step)."""
  manager = _open_existing(directory)
  step = manager.latest_step() if step is None else int(step)
  if step is None:
    raise CheckpointError(f'No checkpoint found in {directory}.')
  tree = manager.item_metadata(step)['state']
  tree = getattr(tree, 'tree', tree)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(_host_abstract(tree)), meta=ocp.args.JsonRestore()))
  return _to_numpy(restored['state']), dict(restored['meta'] or {}), step


def _open_existing(directory: str) -> ocp.CheckpointManager:
  if not os.path.isdir(directory):
    raise CheckpointError(f'Checkpoint directory {directory} does not exist.')
  return make_manager(directory, read_only=True)


# ----------------------------------------------------------------------------------------------------------
# Bundles.
# ----------------------------------------------------------------------------------------------------------
def _jsonable(value):
  """Converts numpy scalars/arrays, tuples and ConfigDicts to JSON types (and checks it serialises)."""
  if hasattr(value, 'to_dict'):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (np.ndarray, jax.Array)):
    return np.asarray(value).tolist()
  if isinstance(value, np.generic):
    return value.item()
  return value


def save_bundle(directory: str, params, meta: Mapping[str, Any], *, step: int | None = None) -> str:
  """Writes params (Orbax) and meta.json into `directory` (replacing a previous bundle); returns the path.

  meta: config (dict), feature_names, feature_schema_hash, scaler, window, warmup, required_candles,
  label_classes, thresholds, model_version (see CONTRACTS); `step` is recorded in meta['step'].
  """
  directory = os.path.abspath(directory)
  main = jax.process_index() == 0
  if main:
    os.makedirs(directory, exist_ok=True)
  meta = _jsonable(dict(meta))
  if step is not None:
    meta['step'] = int(step)
  # Multi-host: every process calls Orbax (its saves synchronise all processes; replicated values are written
  # once, by the primary process), and process 0 alone writes meta.json.
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(directory, _PARAMS), params, force=True)
  checkpointer.wait_until_finished()
  if main:
    # Write meta.json atomically so a reader never sees half a file.
    fd, tmp = tempfile.mkstemp(dir=directory, suffix='.json.tmp')
    with os.fdopen(fd, 'w') as f:
      json.dump(meta, f, indent=2, allow_nan=True)
    os.replace(tmp, os.path.join(directory, _META))
  _sync('natron_save_bundle')   # the bundle is complete for every process when this returns
  return directory


def _sync(name: str) -> None:
  from natron.train import state as train_state  # pylint: disable=g-import-not-at-top  (imports optax, flax)
  train_state.sync(name)


def load_meta(directory: str) -> dict:
  path = os.path.join(directory, _META)
  if not os.path.isfile(path):
    raise CheckpointError(f'{directory} is not a Natron bundle: {_META} is missing.')
  with open(path) as f:
    return json.load(f)


def load_bundle(directory: str) -> tuple[dict, dict]:
  """(params as a nested dict of numpy arrays, meta dict) from a bundle directory; no target needed."""
  meta = load_meta(directory)
  path = os.path.abspath(os.path.join(directory, _PARAMS))
  if not os.path.isdir(path):
    raise CheckpointError(f'{directory} is not a Natron bundle: {_PARAMS}/ is missing.')
  checkpointer = ocp.StandardCheckpointer()
  tree = checkpointer.metadata(path).item_metadata
  tree = getattr(tree, 'tree', tree)
  params = checkpointer.restore(path, _host_abstract(tree))
  return _to_numpy(params), meta


def check_feature_schema(meta: Mapping[str, Any]) -> None:
  """Raises CheckpointError unless meta['feature_schema_hash'] equals the current code's schema hash."""
  from natron import features   # lazy: the features package is heavy and not needed by every caller
  saved = meta.get('feature_schema_hash')
  current = features.feature_schema_hash()
  if saved != current:
    raise CheckpointError(
        f'Feature schema mismatch: the checkpoint was trained on features with schema hash {saved!r}, '
        f'but this code computes {current!r} (feature names, warm-up or version changed). Retrain the '
        'model with the current code, or run the Natron version that produced this checkpoint.')


def is_bundle(directory: str) -> bool:
  return os.path.isfile(os.path.join(directory, _META)) and os.path.isdir(os.path.join(directory, _PARAMS))


def load_params_for_init(path: str) -> dict:
  """Params (nested dict of numpy arrays) to initialise a model from, for pretrain -> finetune hand-off.

  `path` may be a bundle directory, a training-checkpoint directory (the CheckpointManager's), or a phase
  workdir holding one of them as `bundle/` or `checkpoints/` (e.g. 'runs/demo/pretrain'). Returns the full
  params tree; fine-tuning takes its 'encoder' subtree.
  """
  path = os.path.abspath(path)
  candidates = [path, os.path.join(path, 'bundle'), os.path.join(path, 'checkpoints')]
  for candidate in candidates:
    if is_bundle(candidate):
      return load_bundle(candidate)[0]
  for candidate in candidates:
    if os.path.isdir(candidate) and _has_steps(candidate):
      state, _, _ = restore_numpy(candidate)
      return state['params']
  raise CheckpointError(f'No Natron bundle or training checkpoint found at {path} (looked in '
                        f'{", ".join(candidates)}).')


def _has_steps(directory: str) -> bool:
  return any(name.isdigit() and os.path.isdir(os.path.join(directory, name)) for name in os.listdir(directory))
