"""natron.checkpoint: training checkpoints (resume, best-keeping), bundles, schema check, init hand-off."""
import json
import os

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from natron import checkpoint
from natron.train import state as state_lib


def small_state(seed=0):
  """A TrainState with real AdamW state over a params tree shaped like the model's (encoder + heads)."""
  rng = np.random.default_rng(seed)
  params = {'encoder': {'embed': {'kernel': jnp.asarray(rng.normal(size=(4, 8)), jnp.float32),
                                  'bias': jnp.zeros(8, jnp.float32)}},
            'heads': {'buy': {'out': {'kernel': jnp.asarray(rng.normal(size=(8, 2)), jnp.float32)}}}}
  opt = state_lib.make_optimizer(ml_collections.ConfigDict(dict(lr=1e-3)), 10)
  grads = jax.tree.map(jnp.ones_like, params)
  opt_state = opt.init(params)
  _, opt_state = opt.update(grads, opt_state, params)
  return state_lib.TrainState(step=jnp.asarray(3, jnp.int32), params=params, opt_state=opt_state)


def test_manager_round_trip_and_fresh_directory(tmp_path):
  manager = checkpoint.make_manager(str(tmp_path / 'ckpt'))
  target = small_state(seed=1)
  assert checkpoint.restore_latest(manager, target) is None
  state = small_state(seed=0)
  meta = {'epoch': 2, 'names': ('a', 'b'), 'value': np.float32(0.5)}
  checkpoint.save(manager, 3, state, meta)
  restored, restored_meta = checkpoint.restore_latest(checkpoint.make_manager(str(tmp_path / 'ckpt')), target)
  chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(state))
  assert restored_meta == {'epoch': 2, 'names': ['a', 'b'], 'value': 0.5}


def test_manager_keeps_latest_and_best(tmp_path):
  manager = checkpoint.make_manager(str(tmp_path / 'ckpt'), max_to_keep=1, best_metric='f1', mode='max')
  state = small_state()
  for step, f1 in [(1, 0.4), (2, 0.9), (3, 0.5), (4, 0.1)]:
    checkpoint.save(manager, step, state, {'step': step}, metrics={'f1': f1})
  assert manager.best_step() == 2
  assert sorted(manager.all_steps()) == [2, 4]    # best kept for export, latest kept for resuming
  _, meta = checkpoint.restore(manager, state, step=manager.best_step())
  assert meta == {'step': 2}
  minimise = checkpoint.make_manager(str(tmp_path / 'min'), max_to_keep=1, best_metric='loss', mode='min')
  for step, loss in [(1, 0.4), (2, 0.9)]:
    checkpoint.save(minimise, step, state, {}, metrics={'loss': loss})
  assert minimise.best_step() == 1


def test_restore_into_a_different_structure_fails_clearly(tmp_path):
  manager = checkpoint.make_manager(str(tmp_path / 'ckpt'))
  state = small_state()
  checkpoint.save(manager, 1, state, {})
  other = state.replace(params={'encoder': state.params['encoder']})
  with pytest.raises(checkpoint.CheckpointError, match='does not match'):
    checkpoint.restore_latest(manager, other)


def test_bundle_round_trip_without_target(tmp_path):
  state = small_state()
  meta = {'config': ml_collections.ConfigDict({'model': {'d_model': 8}}), 'feature_names': ['a', 'b'],
          'feature_schema_hash': 'abc', 'window': 16, 'scaler': {'center': np.zeros(2)}}
  path = checkpoint.save_bundle(str(tmp_path / 'bundle'), state.params, meta, step=7)
  params, loaded_meta = checkpoint.load_bundle(path)
  assert all(isinstance(leaf, np.ndarray) for leaf in jax.tree.leaves(params))
  chex.assert_trees_all_equal(params, jax.device_get(state.params))
  assert loaded_meta['step'] == 7 and loaded_meta['config'] == {'model': {'d_model': 8}}
  assert loaded_meta['scaler'] == {'center': [0.0, 0.0]}
  with open(os.path.join(path, 'meta.json')) as f:
    assert json.load(f)['feature_names'] == ['a', 'b']   # human-readable JSON beside the arrays
  # Saving again replaces the bundle.
  checkpoint.save_bundle(path, jax.tree.map(lambda p: p + 1, state.params), meta)
  again, _ = checkpoint.load_bundle(path)
  np.testing.assert_allclose(again['heads']['buy']['out']['kernel'],
                             np.asarray(state.params['heads']['buy']['out']['kernel']) + 1)
  with pytest.raises(checkpoint.CheckpointError, match='not a Natron bundle'):
    checkpoint.load_bundle(str(tmp_path))


def test_feature_schema_check():
  from natron import features
  checkpoint.check_feature_schema({'feature_schema_hash': features.feature_schema_hash()})
  with pytest.raises(checkpoint.CheckpointError, match='Feature schema mismatch'):
    checkpoint.check_feature_schema({'feature_schema_hash': 'stale-hash'})
  with pytest.raises(checkpoint.CheckpointError, match='None'):
    checkpoint.check_feature_schema({})


def test_load_params_for_init_from_checkpoints_and_bundles(tmp_path):
  state = small_state()
  manager = checkpoint.make_manager(str(tmp_path / 'pretrain' / 'checkpoints'))
  checkpoint.save(manager, 5, state, {'phase': 'pretrain'})
  expected = jax.device_get(state.params)
  for path in (tmp_path / 'pretrain', tmp_path / 'pretrain' / 'checkpoints'):
    chex.assert_trees_all_equal(checkpoint.load_params_for_init(str(path)), expected)
  checkpoint.save_bundle(str(tmp_path / 'finetune' / 'bundle'), state.params, {})
  chex.assert_trees_all_equal(checkpoint.load_params_for_init(str(tmp_path / 'finetune')), expected)
  with pytest.raises(checkpoint.CheckpointError, match='No Natron bundle or training checkpoint'):
    checkpoint.load_params_for_init(str(tmp_path / 'nothing'))
