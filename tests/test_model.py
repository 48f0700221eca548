"""NatronModel / NatronPretrain, the losses, and the shared training step (tiny sizes, CPU)."""
import json
import os

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import gamma32, model_path_terms

from natron import losses
from natron import model as model_lib
from natron.train import state as state_lib

B, W, F = 8, 16, 8


FAST_COMPILE = True   # tests/conftest.py: skip most XLA optimisation in this module


def tiny_config(**overrides):
  cfg = dict(d_model=32, num_heads=4, num_layers=2, d_ff=64, dropout=0.1, pooling='mean',
             pos_encoding='sinusoidal', head_hidden=16, dtype='float32', param_dtype='float32')
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def inputs(seed=0, batch=B):
  return jax.random.normal(jax.random.PRNGKey(seed), (batch, W, F), jnp.float32)


def labelled_batch(seed=0):
  rng = np.random.default_rng(seed)
  return dict(x=np.asarray(inputs(seed)),
              buy=rng.integers(0, 2, B).astype(np.int32), sell=rng.integers(0, 2, B).astype(np.int32),
              direction=rng.integers(0, 3, B).astype(np.int32), regime=rng.integers(0, 6, B).astype(np.int32),
              weight=np.ones(B, np.float32), mask=np.ones(B, np.float32))


# ------------------------------------------------------------------------------------------------ model


@pytest.mark.parametrize('pooling,pos', [('mean', 'sinusoidal'), ('cls', 'learned'), ('attention', 'sinusoidal')])
def test_output_shapes_dtypes_and_attention(pooling, pos):
  model = model_lib.NatronModel(tiny_config(pooling=pooling, pos_encoding=pos))
  x = inputs()
  params = model.init(jax.random.PRNGKey(1), x, train=False)['params']
  assert set(params) == {'encoder', 'heads'}
  assert set(params['heads']) == {'buy', 'sell', 'direction', 'regime'}
  out = model.apply({'params': params}, x, train=False, return_attention=True)
  for task, n in model_lib.HEAD_CLASSES.items():
    assert out[task].shape == (B, n) and out[task].dtype == jnp.float32
  assert out['encoded'].shape == (B, 32) and out['encoded'].dtype == jnp.float32
  seq = W + 1 if pooling == 'cls' else W
  assert len(out['attention']) == 2
  for weights in out['attention']:
    assert weights.shape == (B, 4, seq, seq) and weights.dtype == jnp.float32
    # A softmax row sums to 1 up to its seq-term sum and divisions: gamma_{2 seq}.
    np.testing.assert_allclose(np.asarray(weights.sum(-1)), 1.0, atol=gamma32(2 * seq))
    assert float(weights.min()) >= 0.0
  assert 'attention' not in model.apply({'params': params}, x, train=False)


def test_bf16_compute_keeps_f32_params_and_logits_close_to_f32():
  x = inputs()
  f32 = model_lib.NatronModel(tiny_config())
  bf16 = model_lib.NatronModel(tiny_config(dtype='bfloat16'))
  params = f32.init(jax.random.PRNGKey(1), x, train=False)['params']
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(bf16.init(jax.random.PRNGKey(1), x,
                                                                        train=False)['params']))
  ref = f32.apply({'params': params}, x, train=False)
  low = bf16.apply({'params': params}, x, train=False)
  for task in model_lib.HEAD_CLASSES:
    assert low[task].dtype == jnp.float32
    # bfloat16's unit roundoff is 2^-9 ~ 2e-3 per rounding of inputs and activations (dots accumulate in f32):
    # over the ~10 roundings along a 2-layer path that is ~2e-2 relative of O(1) logits; 0.1 / 5% leaves 2-5x.
    np.testing.assert_allclose(np.asarray(low[task]), np.asarray(ref[task]), atol=0.1, rtol=0.05)
  assert not np.array_equal(np.asarray(low['buy']), np.asarray(ref['buy']))   # it really computed in bf16


# The dot shapes the model uses: Dense, DenseGeneral over two axes (attention output), the attention scores
# and the attention average (batch dims in the middle of the operands).
_DOTS = [((6, 5, 8), (8, 3), (((2,), (0,)), ((), ()))),
         ((6, 5, 8), (3, 8), (((2,), (1,)), ((), ()))),
         ((2, 5, 3, 4), (3, 4, 6), (((2, 3), (0, 1)), ((), ()))),
         ((2, 5, 3, 4), (2, 7, 3, 4), (((3,), (3,)), ((0, 2), (0, 2)))),
         ((2, 3, 5, 7), (2, 7, 3, 4), (((3,), (1,)), ((0, 1), (0, 2))))]


@pytest.mark.parametrize('lhs_shape,rhs_shape,dims', _DOTS)
def test_mixed_dot_general_is_bf16_inputs_f32_accumulation_forward_and_backward(lhs_shape, rhs_shape, dims):
  bf = lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  x, y = jax.random.normal(k1, lhs_shape), jax.random.normal(k2, rhs_shape)
  mixed = lambda a, b: model_lib.mixed_dot_general(a, b, dims)
  exact = lambda a, b: jax.lax.dot_general(a, b, dims, precision=jax.lax.Precision.HIGHEST)
  out, vjp = jax.vjp(mixed, x, y)
  ref, ref_vjp = jax.vjp(exact, bf(x), bf(y))       # the same products on the rounded operands, in f32
  g = jax.random.normal(k3, out.shape)
  dx, dy = vjp(g)
  rx, ry = ref_vjp(bf(g))                            # the backward pass rounds the cotangent to bf16 too
  assert out.dtype == dx.dtype == dy.dtype == jnp.float32
  assert dx.shape == x.shape and dy.shape == y.shape
  # bf16 x bf16 products are exact in f32; only the f32 sums (<= 35 terms here) round: gamma_35 times the sum
  # of the terms' magnitudes, which is the same products taken on absolute values.
  _, abs_vjp = jax.vjp(exact, jnp.abs(bf(x)), jnp.abs(bf(y)))
  bounds = [exact(jnp.abs(bf(x)), jnp.abs(bf(y))), *abs_vjp(jnp.abs(bf(g)))]
  for got, want, bound in zip((out, dx, dy), (ref, rx, ry), bounds):
    np.testing.assert_array_less(np.abs(np.asarray(got - want)), gamma32(35) * np.asarray(bound) + 1e-30)
  assert not np.allclose(np.asarray(out), np.asarray(exact(x, y)), rtol=1e-5, atol=0)   # inputs were rounded


def _dot_operand_types(hlo_text):
  """[(lhs dtype, rhs dtype)] of every dot in an optimised HLO module's text."""
  import re  # pylint: disable=g-import-not-at-top
  types = []
  for computation in hlo_text.split('\n\n'):
    for lhs, rhs in re.findall(r' dot\(%([\w.\-]+), %([\w.\-]+)\)', computation):
      dtype = lambda name: re.search(r'%' + re.escape(name) + r' = (\w+)\[', computation).group(1)
      types.append((dtype(lhs), dtype(rhs)))
  return types


@pytest.mark.parametrize('lhs_shape,rhs_shape,dims', [
    ((4, 24, 64), (64, 128), (((2,), (0,)), ((), ()))),                    # dense layer
    ((4, 24, 64), (128, 64), (((2,), (1,)), ((), ()))),                    # dense layer, [out, in] kernel
    ((4, 24, 2, 32), (4, 24, 2, 32), (((3,), (3,)), ((0, 2), (0, 2)))),     # attention logits q.k
    ((4, 2, 24, 24), (4, 24, 2, 32), (((3,), (1,)), ((0, 1), (0, 2)))),    # attention weights x values
    ((4, 24, 128), (128, 48), (((2,), (0,)), ((), ())))])                  # narrowing layer: g^T x, transposed
def test_mixed_dot_general_stays_bf16_in_the_optimised_forward_and_backward(lhs_shape, rhs_shape, dims):
  """XLA:CPU silently upcasts a bf16 dot to float32 when its operand has a transposed layout (and, for
  some batched shapes, when N or M <= 32): every product of the jitted value-and-grad must stay bf16 x bf16
  (the backward products of every dense layer were float32, 4-5x slower, before the operand copies were
  fenced as row-major)."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  x, y = jax.random.normal(k1, lhs_shape), jax.random.normal(k2, rhs_shape)
  loss = lambda a, b: jnp.sum(jnp.sin(model_lib.mixed_dot_general(a, b, dims)))
  previous = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', False)   # the upcast happens in XLA's optimising passes
  try:
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(x, y).compile()
    value, (dx, dy) = compiled(x, y)
  finally:
    jax.config.update('jax_disable_most_optimizations', previous)
  types = _dot_operand_types(compiled.as_text())
  assert len(types) == 3 and all(t == ('bf16', 'bf16') for t in types), types
  ref_value, (rx, ry) = jax.value_and_grad(loss, argnums=(0, 1))(x, y)   # unoptimised: the same numbers
  np.testing.assert_allclose(np.asarray(value), np.asarray(ref_value), rtol=1e-5)
  for got, want in ((dx, rx), (dy, ry)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('axes,features', [(1, 24), (2, 24), (1, (3, 2, 4))])
def test_dense_has_flax_parameters_and_outputs_and_a_rounded_bias_gradient(axes, features):
  """model.Dense is nn.Dense / nn.DenseGeneral (the same parameter tree and initial values, so checkpoints
  load either way, and in float32 the same outputs); with bf16 compute the bias gradient is the float32 sum of
  the bf16-rounded cotangent, the one the kernel's gradient multiplies."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 6, 4))
  init = nn.initializers.xavier_uniform()
  ours = model_lib.Dense(features, axes=axes, kernel_init=init, use_bias=features == 24)
  theirs = (nn.Dense(features, kernel_init=init) if axes == 1 and isinstance(features, int) else
            nn.DenseGeneral(features, axis=tuple(range(-axes, 0)), kernel_init=init, use_bias=features == 24))
  params = ours.init(jax.random.PRNGKey(1), x)
  chex.assert_trees_all_equal(params, theirs.init(jax.random.PRNGKey(1), x))
  params = jax.tree.map(lambda p: p + 0.1, params)          # a non-zero bias
  np.testing.assert_allclose(np.asarray(ours.apply(params, x)), np.asarray(theirs.apply(params, x)),
                             rtol=1e-6, atol=1e-6)
  if features != 24:
    return
  mixed = model_lib.Dense(features, axes=axes, kernel_init=init, dtype='bfloat16')
  out, vjp = jax.vjp(lambda p: mixed.apply(p, x), params)
  g = jax.random.normal(jax.random.PRNGKey(2), out.shape)
  grads = vjp(g)[0]['params']
  rounded = np.asarray(g.astype(jnp.bfloat16).astype(jnp.float32), np.float64)
  want = rounded.reshape(-1, features).sum(axis=0)
  bound = gamma32(rounded.size // features) * np.abs(rounded).reshape(-1, features).sum(axis=0)
  np.testing.assert_array_less(np.abs(np.asarray(grads['bias'], np.float64) - want), bound + 1e-30)
  assert grads['bias'].dtype == grads['kernel'].dtype == jnp.float32


def test_split_qkv_backward_is_the_slices_gradient():
  qkv = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 3, 4, 6))
  gs = [jax.random.normal(jax.random.PRNGKey(i), (2, 5, 4, 6)) for i in (1, 2, 3)]
  loss = lambda parts: sum(jnp.sum(p * g) for p, g in zip(parts, gs))
  ours = jax.grad(lambda t: loss(model_lib._split_qkv(t)))(qkv)   # pylint: disable=protected-access
  ref = jax.grad(lambda t: loss((t[:, :, 0], t[:, :, 1], t[:, :, 2])))(qkv)
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))


def test_gelu_is_the_exact_gelu_to_float32_precision():
  from scipy import special  # pylint: disable=g-import-not-at-top
  x = np.concatenate([np.linspace(-12, 12, 20001), [-1e-30, 0.0, 1e-30, 40.0, -40.0]]).astype(np.float32)
  want = x.astype(np.float64) * 0.5 * special.erfc(-x.astype(np.float64) / np.sqrt(2.0))
  got = np.asarray(model_lib.gelu(jnp.asarray(x)), np.float64)
  # erf(z) is correct to a few float32 ulps of 1 and the products round: |error| <= 8 eps32 (|x| + |gelu|).
  bound = 8 * np.finfo(np.float32).eps * (np.abs(x) + np.abs(want)) + 1e-37
  np.testing.assert_array_less(np.abs(got - want), bound)
  dgot = np.asarray(jax.vmap(jax.grad(model_lib.gelu))(jnp.asarray(x)), np.float64)
  x64 = x.astype(np.float64)
  dwant = 0.5 * special.erfc(-x64 / np.sqrt(2.0)) + x64 * np.exp(-0.5 * x64 ** 2) / np.sqrt(2 * np.pi)
  np.testing.assert_array_less(np.abs(dgot - dwant), 16 * np.finfo(np.float32).eps * (1 + np.abs(x)))


def test_bf16_training_reaches_the_f32_runs_validation_metrics():
  """Same data, init and dropout noise; only the matmul input precision differs.

  Task: the buy label is the sign of feature 0's mean over the window, sell the sign of feature 1's (Bayes
  accuracy 1; a linear read-out of the mean pooling suffices). Tolerance: both runs must learn (accuracy
  > 0.85 on 512 held-out windows, chance 0.5) and agree within 0.06 in accuracy (~4 binomial standard errors
  of a 512-sample accuracy near 0.9) and 15% in validation loss: bf16 rounding (2^-9 relative per operand)
  perturbs each step's gradient by far less than minibatch noise, so the runs may differ by noise, not bias.
  """
  rng = np.random.default_rng(0)

  def data(n):
    x = rng.normal(size=(n, W, F)).astype(np.float32)
    mean = x.mean(axis=1)
    labels = {'buy': (mean[:, 0] > 0).astype(np.int32), 'sell': (mean[:, 1] > 0).astype(np.int32),
              'direction': np.full(n, -1, np.int32), 'regime': np.full(n, -1, np.int32)}
    return dict(x=x, weight=np.ones(n, np.float32), mask=np.ones(n, np.float32), **labels)

  train, val = data(1024), data(512)
  weights = dict(buy=1.0, sell=1.0)
  results = {}
  for dtype in ('float32', 'bfloat16'):
    model = model_lib.NatronModel(tiny_config(dtype=dtype, dropout=0.0))
    mesh = state_lib.make_mesh()
    opt = state_lib.make_optimizer(ml_collections.ConfigDict(dict(lr=3e-3, warmup_steps=5)), 120)
    state = state_lib.init_state(lambda r, b, m=model: m.init(r, b['x'], train=False)['params'], opt,
                                 {'x': train['x'][:64]}, jax.random.PRNGKey(0), mesh)

    def loss_fn(params, b, key, m=model):
      out = m.apply({'params': params}, b['x'], train=True, rngs={'dropout': key})
      return losses.multitask_loss(out, b, task_weights=weights)

    step = state_lib.make_train_step(loss_fn, opt, mesh)
    for i in range(120):
      rows = np.arange(i * 64, (i + 1) * 64) % len(train['x'])
      state, _ = step(state, {k: v[rows] for k, v in train.items()}, jax.random.PRNGKey(1))
    out = model.apply({'params': state.params}, val['x'], train=False)
    loss, metrics = losses.multitask_loss(out, val, task_weights=weights)
    results[dtype] = dict(loss=float(loss), buy=float(metrics['accuracy_buy']),
                          sell=float(metrics['accuracy_sell']))
  f32, b16 = results['float32'], results['bfloat16']
  for task in ('buy', 'sell'):
    assert f32[task] > 0.85 and b16[task] > 0.85, results
    assert abs(f32[task] - b16[task]) <= 0.06, results
  assert abs(f32['loss'] - b16['loss']) <= 0.15 * f32['loss'], results


def test_dropout_only_in_training_and_seeded():
  model = model_lib.NatronModel(tiny_config(dropout=0.3))
  x = inputs()
  params = model.init(jax.random.PRNGKey(1), x, train=False)['params']
  run = lambda seed: np.asarray(model.apply({'params': params}, x, train=True,
                                            rngs={'dropout': jax.random.PRNGKey(seed)})['encoded'])
  np.testing.assert_array_equal(run(0), run(0))
  assert not np.allclose(run(0), run(1))
  a = model.apply({'params': params}, x, train=False)['encoded']
  np.testing.assert_array_equal(np.asarray(a), np.asarray(model.apply({'params': params}, x,
                                                                      train=False)['encoded']))


def test_hash_dropout_keeps_the_configured_share_independently():
  seeds = [jnp.array([1, 2], jnp.uint32), jnp.array([1, 3], jnp.uint32), jnp.array([2, 2], jnp.uint32)]
  threshold = jnp.uint32(int(0.1 * 2 ** 32))
  masks = [np.asarray(model_lib.hash_bits((64, 96, 32), s) >= threshold) for s in seeds]
  for mask in masks:
    assert abs(mask.mean() - 0.9) < 0.003                 # 196k draws: 4 standard deviations ~ 0.0027
    flat = mask.ravel().astype(np.float64)
    assert abs(np.corrcoef(flat[:-1], flat[1:])[0, 1]) < 0.01   # neighbours are independent
  for i, j in [(0, 1), (0, 2), (1, 2)]:                   # different seeds give unrelated masks
    assert abs(np.corrcoef(masks[i].ravel(), masks[j].ravel())[0, 1]) < 0.01
  # ... and not shifted or permuted copies of one sequence: two calls share about as many 32-bit values as
  # independent draws would (N^2 / 2^32 = 9 for N = 196,608; a copy would share ~N).
  bits = [np.asarray(model_lib.hash_bits((64, 96, 32), s)) for s in seeds]
  assert all(len(np.unique(b)) == b.size for b in bits)  # distinct within a call (a bijection of the index)
  for i, j in [(0, 1), (0, 2), (1, 2)]:
    assert len(np.intersect1d(bits[i], bits[j])) < 40
  x = jnp.ones((256, 64))
  for impl in ('hash', 'jax'):
    y = model_lib.Dropout(0.25, False, impl).apply({}, x, rngs={'dropout': jax.random.PRNGKey(0)})
    np.testing.assert_allclose(np.unique(np.asarray(y)), [0.0, 4 / 3], rtol=1e-6)
    assert abs(float((y == 0).mean()) - 0.25) < 0.01


def test_pretrain_encoder_params_load_into_natron_model():
  cfg = tiny_config(pooling='attention')
  x = inputs()
  no_mask = jnp.zeros((B, W), bool)
  pre = model_lib.NatronPretrain(cfg, projection_dim=12)
  pre_params = pre.init(jax.random.PRNGKey(2), x, no_mask, train=False)['params']
  full = model_lib.NatronModel(cfg)
  params = full.init(jax.random.PRNGKey(3), x, train=False)['params']
  chex.assert_trees_all_equal_shapes_and_dtypes(pre_params['encoder'], params['encoder'])
  params = dict(params, encoder=pre_params['encoder'])
  pre_out = pre.apply({'params': pre_params}, x, no_mask, train=False)
  assert pre_out['reconstruction'].shape == (B, W, F) and pre_out['projection'].shape == (B, 12)
  # The same encoder on the same inputs in two programs: XLA may fuse/reassociate differently, so the bound is
  # the encoder path's rounding (conftest.model_path_terms) on LayerNorm-scale (O(1)) activations.
  tol = gamma32(model_path_terms(cfg.to_dict(), W, F, feature_terms=0))
  np.testing.assert_allclose(np.asarray(full.apply({'params': params}, x, train=False)['encoded']),
                             np.asarray(pre_out['encoded']), atol=4 * tol, rtol=4 * tol)


def test_mask_token_hides_masked_steps():
  cfg = tiny_config(dropout=0.0)
  pre = model_lib.NatronPretrain(cfg)
  x = inputs()
  mask = jnp.zeros((B, W), bool).at[:, 3:7].set(True)
  params = pre.init(jax.random.PRNGKey(2), x, mask, train=False)['params']
  noisy = x.at[:, 3:7].add(100.0)
  a = pre.apply({'params': params}, x, mask, train=False)
  b = pre.apply({'params': params}, noisy, mask, train=False)
  # Masked steps are replaced before anything reads them: same program, same values, so only bit-level
  # differences from the changed inputs' layout could appear; bound by the encoder path's rounding.
  tol = gamma32(model_path_terms(cfg.to_dict(), W, F, feature_terms=0))
  np.testing.assert_allclose(np.asarray(a['reconstruction']), np.asarray(b['reconstruction']), atol=4 * tol)
  c = pre.apply({'params': params}, noisy, None, train=False)
  assert not np.allclose(np.asarray(a['encoded']), np.asarray(c['encoded']), atol=1e-3)


def test_bad_model_config_is_rejected():
  with pytest.raises(ValueError, match='pooling'):
    model_lib.NatronModel(tiny_config(pooling='max')).init(jax.random.PRNGKey(0), inputs(), train=False)
  with pytest.raises(ValueError, match='divisible'):
    model_lib.NatronModel(tiny_config(num_heads=5)).init(jax.random.PRNGKey(0), inputs(), train=False)


# ----------------------------------------------------------------------------------------------- losses


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_focal_loss_matches_hand_computed_values():
  logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [1.0, -1.0, 0.0], [0.0, 3.0, 0.0]], np.float32)
  labels = np.array([0, 2, -1, 1])
  log_p = _np_log_softmax(logits.astype(np.float64))
  valid = labels >= 0
  lp = log_p[np.arange(4), np.where(valid, labels, 0)]
  ce = -lp[valid].mean()
  # gamma=0 is cross entropy over the labelled rows only.
  np.testing.assert_allclose(float(losses.focal_loss(logits, labels, gamma=0.0)), ce, rtol=1e-6)
  focal = (-(1 - np.exp(lp)) ** 2 * lp)[valid].mean()
  np.testing.assert_allclose(float(losses.focal_loss(logits, labels, gamma=2.0)), focal, rtol=1e-5)
  cw, sw, mask = np.array([1.0, 2.0, 0.5]), np.array([0.5, 1.0, 3.0, 2.0]), np.array([1.0, 1.0, 1.0, 0.0])
  w = cw[np.where(valid, labels, 0)] * sw * mask * valid
  weighted = (w * -lp).sum() / w.sum()
  got = losses.focal_loss(logits, labels, gamma=0.0, class_weights=cw, sample_weights=sw, mask=mask)
  np.testing.assert_allclose(float(got), weighted, rtol=1e-6)
  assert float(losses.focal_loss(logits, -np.ones(4, int), gamma=2.0)) == 0.0


def test_multitask_loss_is_weighted_sum():
  rng = np.random.default_rng(0)
  outputs = {t: rng.normal(size=(B, n)).astype(np.float32) for t, n in model_lib.HEAD_CLASSES.items()}
  batch = labelled_batch()
  batch['regime'][:3] = -1
  weights = dict(buy=1.0, sell=0.5, direction=2.0, regime=0.25)
  cw = {'direction': [1.0, 2.0, 3.0]}
  loss, metrics = losses.multitask_loss(outputs, batch, task_weights=weights, class_weights=cw, gamma=1.0)
  expected = sum(w * float(losses.focal_loss(outputs[t], batch[t], gamma=1.0, class_weights=cw.get(t),
                                             sample_weights=batch['weight'], mask=batch['mask']))
                 for t, w in weights.items())
  np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
  assert loss.dtype == jnp.float32 and float(metrics['loss']) == float(loss)
  acc = (outputs['regime'].argmax(-1) == batch['regime'])[3:].mean()
  np.testing.assert_allclose(float(metrics['accuracy_regime']), acc, rtol=1e-6)


def test_masked_mse_counts_only_masked_steps():
  rng = np.random.default_rng(1)
  pred, target = rng.normal(size=(2, 4, 3)), rng.normal(size=(2, 4, 3))
  mask = np.array([[1, 0, 0, 1], [0, 0, 1, 0]], bool)
  expected = ((pred - target) ** 2)[mask].mean()
  np.testing.assert_allclose(float(losses.masked_mse(pred, target, mask)), expected, rtol=1e-6)
  assert float(losses.masked_mse(pred, target, np.zeros_like(mask))) == 0.0


def test_info_nce_hand_computed_and_identical_vs_random_views():
  rng = np.random.default_rng(2)
  z1, z2 = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
  n1 = z1 / np.linalg.norm(z1, axis=1, keepdims=True)
  n2 = z2 / np.linalg.norm(z2, axis=1, keepdims=True)
  logits = n1 @ n2.T / 0.5
  expected = 0.5 * (-np.diag(_np_log_softmax(logits)).mean() - np.diag(_np_log_softmax(logits.T)).mean())
  np.testing.assert_allclose(float(losses.info_nce(z1, z2, 0.5)), expected, rtol=1e-5)
  a, b = rng.normal(size=(6, 16)), rng.normal(size=(6, 16))
  # Identical views: the positive dominates every row (loss -> 0); unrelated views: about log(6).
  assert float(losses.info_nce(a, a, 0.1)) < 0.05
  assert float(losses.info_nce(a, b, 0.1)) > 1.0
  # A padding row is neither an anchor nor a negative: same loss as dropping it.
  mask = np.array([1, 1, 1, 1, 1, 0.0])
  np.testing.assert_allclose(float(losses.info_nce(z1, z2, 0.5, mask=mask)),
                             float(losses.info_nce(z1[:5], z2[:5], 0.5)), rtol=1e-5)


# ----------------------------------------------------------------------------------- optimizer / step


def test_schedule_warms_up_then_decays():
  section = ml_collections.ConfigDict(dict(lr=1e-3, warmup_steps=10, min_lr_frac=0.1))
  sched = state_lib.make_schedule(section, 100)
  assert float(sched(0)) == 0.0
  np.testing.assert_allclose(float(sched(10)), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(float(sched(100)), 1e-4, rtol=1e-5)
  assert float(sched(5)) < float(sched(10)) and float(sched(50)) < float(sched(10))


def _model_and_batch(dropout=0.0):
  model = model_lib.NatronModel(tiny_config(dropout=dropout, num_layers=1))
  init = lambda rng, b: model.init(rng, b['x'], train=False)['params']

  def loss_fn(params, batch, rng):
    out = model.apply({'params': params}, batch['x'], train=True, rngs={'dropout': rng})
    return losses.multitask_loss(out, batch, task_weights=dict(buy=1, sell=1, direction=1, regime=1))

  return init, loss_fn, labelled_batch()


def test_freeze_encoder_and_encoder_lr_mult():
  params = {'encoder': {'w': jnp.ones((3, 3)), 'b': jnp.ones(3)}, 'heads': {'w': jnp.ones((3, 2))}}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  section = ml_collections.ConfigDict(dict(lr=1e-2, weight_decay=0.0))
  deltas = {}
  for name, kw in dict(frozen=dict(freeze_encoder=True), slow=dict(encoder_lr_mult=0.1), full={}).items():
    opt = state_lib.make_optimizer(section, 10, **kw)
    updates, _ = jax.jit(opt.update)(grads, opt.init(params), params)
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    deltas[name] = {k: float(state_lib.tree_norm(updates[k])) for k in ('encoder', 'heads')}
  assert deltas['frozen']['encoder'] == 0.0 and deltas['frozen']['heads'] > 0
  np.testing.assert_allclose(deltas['slow']['encoder'], 0.1 * deltas['full']['encoder'], rtol=1e-4)
  np.testing.assert_allclose(deltas['slow']['heads'], deltas['full']['heads'], rtol=1e-5)


def test_train_step_reduces_loss_without_recompiling():
  init, loss_fn, batch = _model_and_batch(dropout=0.1)
  mesh = state_lib.make_mesh()
  opt = state_lib.make_optimizer(ml_collections.ConfigDict(dict(lr=3e-3, warmup_steps=2)), 30)
  state = state_lib.init_state(init, opt, batch, jax.random.PRNGKey(0), mesh)
  # The loss function is traced once per compilation: a second trace means the step recompiled.
  step = state_lib.make_train_step(chex.assert_max_traces(loss_fn, n=1), opt, mesh)
  rng = jax.random.PRNGKey(1)
  sharded = state_lib.shard_batch(batch, mesh)
  losses_seen = []
  for _ in range(15):
    state, metrics = step(state, sharded, rng)
    losses_seen.append(float(metrics['loss']))
  assert int(state.step) == 15
  assert losses_seen[-1] < 0.7 * losses_seen[0]
  assert set(metrics) >= {'loss', 'grad_norm', 'param_norm', 'accuracy_buy'}
  assert all(np.isfinite(float(metrics[k])) and float(metrics[k]) > 0 for k in ('grad_norm', 'param_norm'))


def test_logger_names_the_first_non_finite_step_and_writes_metrics(tmp_path):
  writer = state_lib.MetricWriter(str(tmp_path), 'unit')
  logger = state_lib.TrainLogger(writer, total_steps=20, batch_size=4, log_every=5)
  for step in range(1, 6):
    logger.update(step, {'loss': jnp.float32(1.0 / step), 'grad_norm': jnp.float32(1.0)})
  logger.flush()
  writer.close()
  lines = [json.loads(line) for line in open(tmp_path / 'unit' / 'metrics.jsonl')]
  assert [r['step'] for r in lines] == [4, 5]   # the newest step is read at the next log step
  np.testing.assert_allclose(lines[0]['train/loss'], np.mean([1, 1 / 2, 1 / 3, 1 / 4]), rtol=1e-6)
  assert lines[0]['samples_per_sec'] > 0
  assert any(name.startswith('events') for name in os.listdir(tmp_path / 'unit' / 'tensorboard'))

  logger = state_lib.TrainLogger(None, total_steps=20, batch_size=4, log_every=5)
  bad = {7: float('nan'), 8: float('inf')}
  with pytest.raises(state_lib.NonFiniteError, match='at step 7'):
    for step in range(1, 12):
      logger.update(step, {'loss': jnp.float32(bad.get(step, 1.0))})
