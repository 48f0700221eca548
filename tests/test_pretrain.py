"""Pretraining: masks/augmentations, run_phase end to end + exact resume, and 1 vs 4 device equality."""
import json
import os
import shutil
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import gamma32

from configs import base
from configs import pretrain as pretrain_config
from natron import checkpoint
from natron.model import NatronModel
from natron.train import pretrain
from natron.train import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


FAST_COMPILE = True   # tests/conftest.py: skip most XLA optimisation in this module


def tiny_config(epochs=1):
  config = base.get_base_config()
  config.phase = 'pretrain'
  config.pretrain = pretrain_config.section(quick=True)
  config.data.synthetic_bars = 1600          # the features' warm-up is 1000 bars
  config.dataset.window = 16
  config.labels.regime_horizon = 12
  config.model.update(dict(d_model=16, num_heads=2, num_layers=1, d_ff=32, head_hidden=8, dropout=0.1))
  config.pretrain.update(dict(epochs=epochs, batch_size=16, max_steps_per_epoch=2, eval_max_batches=2,
                              log_every=2, projection_dim=8))
  return config


@pytest.fixture(scope='module')
def dataset():
  return pretrain._load_dataset(tiny_config())


def test_step_masks_have_the_configured_share():
  mask = np.asarray(pretrain.random_step_mask(jax.random.PRNGKey(0), 64, 20, 0.15))
  assert mask.shape == (64, 20) and (mask.sum(1) == 3).all()
  assert not (mask == mask[0]).all()      # every window has its own masked steps
  spans = np.asarray(pretrain.random_step_mask(jax.random.PRNGKey(1), 64, 20, 0.3, span=3))
  assert (spans.sum(1) >= 3).all() and (spans.sum(1) <= 6).all()
  # Span masking masks runs: most masked steps have a masked neighbour.
  neighbour = (np.roll(spans, 1, axis=1) | np.roll(spans, -1, axis=1)) & spans
  assert neighbour.sum() >= 0.8 * spans.sum()


def test_augmentations_keep_shape_and_change_the_window():
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 5))
  aug = ml_collections.ConfigDict(dict(jitter=0.0, scale=0.0, time_mask=0.0, crop_min=1.0))
  np.testing.assert_allclose(np.asarray(pretrain.augment(x, jax.random.PRNGKey(1), aug)), np.asarray(x),
                             atol=1e-5)        # every augmentation off (full-length crop) = identity
  aug.update(dict(jitter=0.03, scale=0.1, time_mask=0.25, crop_min=0.8))
  view = np.asarray(pretrain.augment(x, jax.random.PRNGKey(1), aug))
  assert view.shape == x.shape and np.isfinite(view).all()
  assert ((view == 0).all(axis=2).sum(axis=1) == 4).all()     # one zeroed span of 25% of 16 steps
  assert not np.allclose(view, pretrain.augment(x, jax.random.PRNGKey(2), aug))


def test_run_phase_writes_checkpoint_and_resumes_exactly(dataset, tmp_path):
  config = tiny_config(epochs=2)
  full = pretrain.run_phase(config, str(tmp_path / 'a'), dataset=dataset)
  assert full['steps'] == 4 and np.isfinite(full['val_loss']) and full['train_loss'] > 0
  assert {'val_reconstruction', 'val_contrastive'} <= set(full)
  ckpt_dir = tmp_path / 'a' / 'pretrain' / 'checkpoints'
  assert sorted(int(s) for s in os.listdir(ckpt_dir) if s.isdigit()) == [2, 4]
  records = [json.loads(line) for line in open(tmp_path / 'a' / 'pretrain' / 'metrics.jsonl')]
  assert any('train/loss' in r for r in records) and sum('val/loss' in r for r in records) == 2

  # The encoder drops into the supervised model unchanged.
  params = checkpoint.load_params_for_init(str(tmp_path / 'a' / 'pretrain'))
  x = np.zeros((2, 16, dataset.num_features), np.float32)
  fresh = NatronModel(config.model).init(jax.random.PRNGKey(0), x, train=False)['params']
  chex.assert_trees_all_equal_shapes_and_dtypes(fresh['encoder'], jax.tree.map(jnp.asarray, params['encoder']))

  # "Interrupt" after epoch 1: keep only its checkpoint, rerun, and land on the same final model.
  resumed_ckpt = tmp_path / 'b' / 'pretrain' / 'checkpoints'
  shutil.copytree(ckpt_dir, resumed_ckpt)
  shutil.rmtree(resumed_ckpt / '4')
  resumed = pretrain.run_phase(config, str(tmp_path / 'b'), dataset=dataset)
  assert resumed['steps'] == 4
  records = [json.loads(line) for line in open(tmp_path / 'b' / 'pretrain' / 'metrics.jsonl')]
  assert [r['epoch'] for r in records if 'val/loss' in r] == [1]    # it trained the second epoch only
  for key in ('val_loss', 'val_reconstruction', 'val_contrastive'):
    np.testing.assert_allclose(resumed[key], full[key], rtol=1e-6)
  chex.assert_trees_all_close(checkpoint.load_params_for_init(str(tmp_path / 'b' / 'pretrain')), params,
                              atol=1e-7)


def two_steps() -> dict:
  """Two pretraining updates on a fixed batch over every visible device; returns loss and flat params."""
  config = tiny_config()
  model = pretrain.NatronPretrain(config.model, projection_dim=8)
  opt = state_lib.make_optimizer(config.pretrain, 10)
  mesh = state_lib.make_mesh()
  rng = np.random.default_rng(0)
  batch = {'x': rng.normal(size=(8, 16, 6)).astype(np.float32), 'mask': np.ones(8, np.float32)}
  batch['mask'][-1] = 0.0
  init = lambda r, b: model.init(r, b['x'], jnp.zeros(b['x'].shape[:2], bool), train=False)['params']
  state = state_lib.init_state(init, opt, batch, jax.random.PRNGKey(0), mesh)
  step = state_lib.make_train_step(pretrain.make_loss_fn(model, config.pretrain, train=True), opt, mesh)
  sharded = state_lib.shard_batch(batch, mesh)
  losses = []
  for _ in range(2):
    state, metrics = step(state, sharded, jax.random.PRNGKey(1))
    losses.append(float(metrics['loss']))
  flat = np.concatenate([np.ravel(p) for p in jax.tree.leaves(jax.device_get(state.params))])
  return {'devices': len(mesh.devices.flat), 'loss': np.array(losses), 'params': flat}


def test_two_steps_on_four_devices_equal_one_device(tmp_path):
  out = tmp_path / 'four.npz'
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4', JAX_PLATFORMS='cpu',
             JAX_DISABLE_MOST_OPTIMIZATIONS='1', PYTHONPATH=ROOT)
  subprocess.run([sys.executable, __file__, str(out)], env=env, check=True, cwd=ROOT, timeout=300)
  four = dict(np.load(out))
  one = two_steps()
  assert int(four['devices']) == 4 and one['devices'] == 1
  # Four devices reduce the batch's loss and gradients in another order: each differs by gamma_n relative
  # (n ~ batch x window x features ~ 800 terms: ~5e-5 worst case, ~sqrt(n) u ~ 2e-6 typical), and after two
  # Adam steps of lr 1e-3 a parameter inherits that relative error of its step (Adam divides by sqrt(v), so
  # the step's scale is lr, not the gradient's): |delta param| <~ 2 steps x lr x gamma_n relative ~ 1e-7,
  # far inside 1e-5, plus the loss's own gamma_n.
  n = 8 * 16 * 6
  np.testing.assert_allclose(four['loss'], one['loss'], rtol=gamma32(n), atol=gamma32(n))
  np.testing.assert_allclose(four['params'], one['params'], rtol=gamma32(n), atol=1e-5)


if __name__ == '__main__':   # the 4-device half of the test above, in a fresh process
  np.savez(sys.argv[1], **two_steps())
