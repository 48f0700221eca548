"""Natron's Transformer: one encoder shared by the multi-task model, pretraining, PPO and inspection.

  x [batch, window, features]
    -> Dense(d_model) -> (+ learned mask token where pretraining masks a step) -> positional encoding
    -> num_layers pre-LayerNorm blocks (self-attention, GELU feed-forward, dropout) -> final LayerNorm
    -> pooling (mean | cls | attention) -> encoded [batch, d_model]
    -> heads: buy [B, 2], sell [B, 2], direction [B, 3], regime [B, 6] logits

Parameter layout (fine-tuning and PPO rely on it): everything up to and including the pooled embedding lives
under `params['encoder']`, the four task heads under `params['heads'][task]`. `NatronPretrain` uses the very
same `Encoder`, so `pretrain_params['encoder']` drops into `NatronModel` params unchanged.

Precision: `dtype` is the input dtype of every dense and attention matmul ('float32' or 'bfloat16'),
`param_dtype` the storage dtype. With 'bfloat16' each dot rounds its two inputs to bfloat16 and accumulates
and returns float32 (`mixed_dot_general`, forward and backward: the hardware's fast path, AMX / AVX512_BF16 on
Intel CPUs, tensor cores on GPUs); parameters, gradients, the residual stream, LayerNorm statistics, softmax,
GELU, dropout, logits and losses stay float32, so bfloat16 changes results only by the rounding of the dots'
inputs (a layer's bias gradient sums the same rounded cotangent its weight gradient multiplies, `_add_bias`).
With 'float32' the dots are plain float32 `lax.dot_general`s. GELU is the exact one in its erf form (`gelu`).

Dropout (rate `dropout`, also on the attention weights unless `attention_dropout` is set) draws its masks
from a counter-based hash (`Dropout`, impl 'hash') rather than jax.random.bernoulli: the same Bernoulli
masks in distribution, at a small fraction of threefry's cost on CPU (`model.dropout_impl = 'jax'` restores
flax's behaviour). See experiments/bench_train.py.
"""
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Output sizes of the supervised heads, in the order of natron.labels' class tuples.
HEAD_CLASSES = {'buy': 2, 'sell': 2, 'direction': 3, 'regime': 6}
POOLINGS = ('mean', 'cls', 'attention')
POS_ENCODINGS = ('sinusoidal', 'learned')
_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def _dtype(name) -> Any:
  if not isinstance(name, str):
    return jnp.dtype(name)
  if name not in _DTYPES:
    raise ValueError(f'Unknown dtype {name!r}; expected one of {sorted(_DTYPES)}.')
  return _DTYPES[name]


def _get(config, key: str, default=None):
  """Reads a key from a ConfigDict, FrozenConfigDict or plain mapping, with a default."""
  if isinstance(config, Mapping):
    return config.get(key, default)
  return config.get(key, default) if hasattr(config, 'get') else getattr(config, key, default)


# ============================================================================ mixed-precision matmuls
def _materialized_transpose(x, perm):
  """x transposed by `perm`, kept as a real row-major copy (the identity permutation returns x itself).

  On CPU the copy is fenced by an optimization barrier, so XLA can neither fold the transpose back into
  the dot's dimension numbers nor leave it as a transposed *layout* of the dot's operand: XLA:CPU hands
  bf16 dots to its matmul library (YNNPACK, AMX / AVX512_BF16) only on row-major operands in the forms
  [batch, M, K] x [batch, K, N] or [batch, N, K]; with a transposed layout it silently upcasts the whole
  dot to float32 (3-8x slower: it did so for the backward products of every dense layer), and in jaxlib
  0.10 some other forms crash ("Unsupported element type for DotThunk::Execute: BF16 x BF16 = F32"). The
  barrier holds the copy with a leading unit axis: a reshape after it then pins the row-major layout (a
  barrier on the operand's own shape keeps the transposed layout; on a flattened copy XLA's transpose loop
  is ~7x slower). Axes that stay adjacent are merged first, so [B, W, K] -> [K, B, W] is the 2-D
  transpose [B*W, K] -> [K, B*W].
  """
  perm = tuple(int(i) for i in perm)
  if perm == tuple(range(x.ndim)):
    return x
  groups = []                                           # runs of input axes that stay adjacent
  for axis in perm:
    if groups and groups[-1][-1] + 1 == axis:
      groups[-1].append(axis)
    else:
      groups.append([axis])
  by_input = sorted(range(len(groups)), key=lambda g: groups[g][0])
  merged = x.reshape([int(np.prod([x.shape[a] for a in groups[g]], dtype=np.int64)) for g in by_input])
  y = jnp.transpose(merged, [by_input.index(g) for g in range(len(groups))])
  out_shape = [x.shape[a] for a in perm]
  if jax.default_backend() != 'cpu':
    return y.reshape(out_shape)           # GPU matmul libraries take transposed operands: let XLA fold it
  return jax.lax.optimization_barrier(y.reshape((1,) + y.shape)).reshape(out_shape)


def _operand_layouts(a, b, dimension_numbers):
  """(lhs permutation to [batch, M, K], rhs permutation to [batch, N, K] or None when rhs is used as it lies,
  [batch, K, N]) for `_canonical_dot`. XLA:CPU upcasts batched [batch, K, N] with N <= 32 to float32 (seen
  single-threaded, for attention's products with head_dim 32), while it runs [batch, N, K] of every size in
  bf16."""
  (lc, rc), (lb, rb) = dimension_numbers
  lf = [i for i in range(a.ndim) if i not in lc and i not in lb]
  rf = [i for i in range(b.ndim) if i not in rc and i not in rb]
  n = int(np.prod([b.shape[i] for i in rf], dtype=np.int64))
  lhs_perm = list(lb) + lf + list(lc)
  if list(rb) + list(rc) + rf == list(range(b.ndim)) and not (lb and n <= 32):
    return lhs_perm, None
  return lhs_perm, list(rb) + rf + list(rc)


def _canonical_dot(lhs, rhs, dimension_numbers):
  """lax.dot_general(lhs, rhs, dimension_numbers, preferred_element_type=float32) as ONE matmul on
  row-major operands of the forms CPU matmul libraries take: lhs [batch, M, K] (or [M, K]); rhs [K, N]
  when it is already laid out so (dense kernels), else [batch, N, K] (a dense layer's backward product
  g @ kernel^T needs no copy at all in this form; attention operands copied to it keep their contiguous
  head dimension). The result has dot_general's axis order (batch, lhs free, rhs free)."""
  (lc, rc), (lb, rb) = dimension_numbers
  lf = [i for i in range(lhs.ndim) if i not in lc and i not in lb]
  rf = [i for i in range(rhs.ndim) if i not in rc and i not in rb]
  batch = [lhs.shape[i] for i in lb]
  m_shape, n_shape = [lhs.shape[i] for i in lf], [rhs.shape[i] for i in rf]
  k = int(np.prod([lhs.shape[i] for i in lc], dtype=np.int64))
  m, n = int(np.prod(m_shape, dtype=np.int64)), int(np.prod(n_shape, dtype=np.int64))
  lead = [int(np.prod(batch, dtype=np.int64))] if batch else []
  lhs_perm, rhs_perm = _operand_layouts(lhs, rhs, dimension_numbers)
  a = _materialized_transpose(lhs, lhs_perm).reshape(lead + [m, k])
  nb = len(lead)
  if rhs_perm is None:                                                # [batch, K, N]
    b = rhs.reshape(lead + [k, n])
    contract = nb
  else:                                                               # [batch, N, K]
    b = _materialized_transpose(rhs, rhs_perm).reshape(lead + [n, k])
    contract = nb + 1
  dims = (((nb + 1,), (contract,)), ((0,), (0,)) if batch else ((), ()))
  out = jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)
  return out.reshape(batch + m_shape + n_shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _mixed_dot(lhs, rhs, dimension_numbers, compute_dtype):
  return _canonical_dot(lhs.astype(compute_dtype), rhs.astype(compute_dtype), dimension_numbers)


def _mixed_dot_fwd(lhs, rhs, dimension_numbers, compute_dtype):
  lhs, rhs = lhs.astype(compute_dtype), rhs.astype(compute_dtype)
  # The rounded operands are the residuals: half the memory of float32 ones.
  return _canonical_dot(lhs, rhs, dimension_numbers), (lhs, rhs)


def _mixed_dot_bwd(dimension_numbers, compute_dtype, residuals, g):
  """Both operand cotangents as float32 products of bf16 operands, each ONE canonical matmul.

  Written out rather than taken from JAX's transpose rule, which would cast the float32 products back to
  the operands' bf16 (losing gradient precision) and leave transposes that XLA folds into non-canonical
  dots. Each product takes whichever operand order yields the cotangent in its operand's axis order (for
  dense layers both do), so no result needs a transpose.
  """
  lhs, rhs = residuals
  g = g.astype(compute_dtype)
  (lc, rc), (lb, rb) = dimension_numbers
  lf = [i for i in range(lhs.ndim) if i not in lc and i not in lb]
  rf = [i for i in range(rhs.ndim) if i not in rc and i not in rb]
  nb = len(lb)
  g_batch = tuple(range(nb))
  g_lf = tuple(range(nb, nb + len(lf)))                 # g's axes: batch, lhs free, rhs free
  g_rf = tuple(range(nb + len(lf), g.ndim))
  # d_lhs[lb, lf, lc] = sum_rf g[b, lf, rf] rhs[rb, rc, rf]
  d_lhs = _ordered_product(
      (g, rhs, ((g_rf, tuple(rf)), (g_batch, tuple(rb))), list(lb) + lf + [lc[j] for j in np.argsort(rc)]),
      (rhs, g, ((tuple(rf), g_rf), (tuple(rb), g_batch)), list(lb) + [lc[j] for j in np.argsort(rc)] + lf))
  # d_rhs[rb, rc, rf] = sum_lf lhs[lb, lf, lc] g[b, lf, rf]
  d_rhs = _ordered_product(
      (lhs, g, ((tuple(lf), g_lf), (tuple(lb), g_batch)), list(rb) + [rc[j] for j in np.argsort(lc)] + rf),
      (g, lhs, ((g_lf, tuple(lf)), (g_batch, tuple(lb))), list(rb) + rf + [rc[j] for j in np.argsort(lc)]))
  return d_lhs, d_rhs


def _copied_elements(a, b, dims, axes) -> int:
  """Elements `_ordered_product` copies to run candidate (a, b, dims, axes): operand transposes that
  `_canonical_dot` materialises plus the result's own transpose when its axes are out of order."""
  lhs_perm, rhs_perm = _operand_layouts(a, b, dims)
  copied = 0 if lhs_perm == sorted(lhs_perm) else a.size
  if rhs_perm is not None and rhs_perm != sorted(rhs_perm):
    copied += b.size
  if list(axes) != sorted(axes):
    (lc, rc), (lb, _) = dims
    out = np.prod([a.shape[i] for i in range(a.ndim) if i not in lc]) * np.prod(
        [b.shape[i] for i in range(b.ndim) if i not in rc and i not in dims[1][1]])
    copied += int(out)
  return copied


def _ordered_product(*candidates):
  """One of the candidate products (a, b, dims, axes) that give the same cotangent, as the result of one
  canonical dot, transposed to `axes` when its axes come out in another order. XLA:CPU's bf16 matmul path
  takes some forms only: a batched product (attention) is the in-order candidate, else the one with the most
  rows (M, a's free size: batched bf16 products with M <= 32 ran in float32, e.g. [head_dim, W] x [W, W]); an
  unbatched one (dense layers) is the candidate with more than 32 rows that copies the fewest elements
  (`_copied_elements`), so a weight gradient x^T g transposes the narrower of x and g (for ff_out, g^T x and
  then the small [d_model, d_ff] result instead of the [rows, d_ff] activation). The transpose of the result
  goes through fenced copies: XLA would otherwise fold it into the dot by swapping its operands, a form its
  bf16 matmul path does not take (it crashes or runs float32)."""
  def rows(candidate):
    a, _, ((contract, _), (batch, _)), _ = candidate
    return int(np.prod([a.shape[i] for i in range(a.ndim) if i not in contract and i not in batch]))

  if candidates[0][2][1][0]:
    ordered = [c for c in candidates if list(c[3]) == sorted(c[3])]
    a, b, dims, axes = ordered[0] if ordered else max(candidates, key=rows)
  else:
    pool = [c for c in candidates if rows(c) > 32] or [max(candidates, key=rows)]
    a, b, dims, axes = min(pool, key=lambda c: _copied_elements(*c))
  out = _canonical_dot(a, b, dims)
  if list(axes) == sorted(axes):
    return out
  if jax.default_backend() == 'cpu':
    out = jax.lax.optimization_barrier(out)   # else XLA folds the transpose into the dot (operands swapped)
  return _materialized_transpose(out, np.argsort(axes))


_mixed_dot.defvjp(_mixed_dot_fwd, _mixed_dot_bwd)


def mixed_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, *,
                      compute_dtype=jnp.bfloat16, **unused):
  """A `lax.dot_general` (Flax's `dot_general=` hook) that multiplies in `compute_dtype`, accumulates in f32.

  Forward: both operands rounded to `compute_dtype`, products summed and returned in float32. Backward: the
  output cotangent is rounded to `compute_dtype` and both transposed products again accumulate in float32,
  so the gradient of every (float32) operand is float32. This is the mode bfloat16 hardware is built for
  (AMX and AVX512_BF16 on CPUs, tensor cores on GPUs). A dot returning bfloat16 instead is slower on CPU:
  XLA then rounds every partial sum, and the result feeds float32 consumers anyway.
  """
  del precision, preferred_element_type, unused
  # Float32 at the boundary: the custom VJP then hands back float32 cotangents whatever the caller's dtype,
  # and the cast of a bfloat16 operand to float32 and back is exact (XLA removes it).
  return _mixed_dot(jnp.asarray(lhs, jnp.float32), jnp.asarray(rhs, jnp.float32),
                    _normalize_dims(dimension_numbers), jnp.dtype(compute_dtype))


def _normalize_dims(dimension_numbers):
  (lc, rc), (lb, rb) = dimension_numbers
  return (tuple(int(i) for i in lc), tuple(int(i) for i in rc)), (tuple(int(i) for i in lb),
                                                                  tuple(int(i) for i in rb))


def dot_general_for(dtype) -> Any:
  """The dot_general the model's matmuls use for compute `dtype`: plain lax for float32, else mixed."""
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float32:
    return jax.lax.dot_general
  return functools.partial(mixed_dot_general, compute_dtype=dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _add_bias(y, bias, compute_dtype):
  return y + bias


def _add_bias_fwd(y, bias, compute_dtype):
  return y + bias, bias        # the parameter itself (alive anyway): its static ndim in the backward pass


def _add_bias_bwd(compute_dtype, bias, g):
  # The bias gradient sums the same compute_dtype-rounded cotangent the dot's backward multiplies (in
  # float32): XLA then writes the cotangent once, rounded, instead of in float32 and again rounded.
  rounded = g.astype(compute_dtype).astype(jnp.float32)
  return g, rounded.sum(axis=tuple(range(g.ndim - bias.ndim)))


_add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


class Dense(nn.Module):
  """nn.Dense / nn.DenseGeneral over the last `axes` input axes (the same parameter names, shapes and initial
  values) whose product is `dot_general_for(dtype)`; with a compute dtype other than float32 the bias
  gradient is the float32 sum of the rounded cotangent the product's backward uses (`_add_bias`)."""
  features: Any
  axes: int = 1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    inputs = tuple(x.shape[x.ndim - self.axes:])
    flat = (int(np.prod(inputs)), int(np.prod(features)))
    kernel = self.param('kernel', lambda rng, shape, dtype: jnp.reshape(self.kernel_init(rng, flat, dtype), shape),
                        inputs + features, self.param_dtype)
    contract = tuple(range(x.ndim - self.axes, x.ndim))
    y = dot_general_for(self.dtype)(x, kernel.astype(jnp.float32),
                                    ((contract, tuple(range(self.axes))), ((), ())))
    if not self.use_bias:
      return y
    bias = self.param('bias', nn.initializers.zeros_init(), features, self.param_dtype).astype(jnp.float32)
    if jnp.dtype(self.dtype) == jnp.float32:
      return y + bias
    return _add_bias(y, bias, jnp.dtype(self.dtype))


def gelu(x):
  """Exact GELU, x * Phi(x) = x / 2 * (1 + erf(x / sqrt 2)), in float32: the erf form PyTorch computes.

  jax.nn.gelu(approximate=False) uses erfc(-x / sqrt 2) instead, exact to relative float32 precision even far
  in the negative tail; the erf form is exact to absolute float32 precision (|error| <= ~|x| * 6e-8), the same
  for any activation that matters, and on CPU ~3% of a training step cheaper: erfc's piecewise polynomial and
  the exp(-x^2 / 2) it keeps for the backward pass cost two extra passes over the FFN's widest activation.
  """
  return x * (0.5 + 0.5 * jax.lax.erf(x * np.float32(0.5 ** 0.5)))


@jax.custom_vjp
def _split_qkv(qkv):
  """[B, W, 3, H, Dh] -> q, k, v [B, W, H, Dh]; the backward stacks the three cotangents in one pass (autodiff
  of the three slices would pad each to [B, W, 3, H, Dh] and add them)."""
  return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


def _split_qkv_fwd(qkv):
  return _split_qkv(qkv), None


def _split_qkv_bwd(_, g):
  return (jnp.stack(g, axis=2),)


_split_qkv.defvjp(_split_qkv_fwd, _split_qkv_bwd)


def sinusoidal_encoding(window: int, d_model: int) -> np.ndarray:
  """Fixed 'Attention is all you need' encoding, float32 [window, d_model] (float64 on the host)."""
  position = np.arange(window, dtype=np.float64)[:, None]
  div = np.exp(np.arange(0, d_model, 2, dtype=np.float64) * (-np.log(10000.0) / d_model))
  table = np.zeros((window, d_model), np.float64)
  table[:, 0::2] = np.sin(position * div)
  table[:, 1::2] = np.cos(position * div)[:, : d_model // 2]
  return table.astype(np.float32)


def _fmix32(h):
  """MurmurHash3's 32-bit finaliser: a bijection with full avalanche (each input bit flips ~half the output)."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def hash_bits(shape, seeds) -> jax.Array:
  """uint32 pseudo-random bits of `shape` from two uint32 seeds: a counter-based hash of the element index.

  bits[i] = fmix32((i ^ seed1) * m) with m = fmix32(seed0 ^ fmix32(seed1)) | 1, an odd multiplier of the
  call (computed once, on scalars). Within a call the inputs are distinct (xor and an odd multiplier are
  bijections) and fmix32 avalanches them. Between calls the multipliers differ, so an element of one call
  coincides with some element of another only where (i ^ a1) * ma == (j ^ b1) * mb: about N^2 / 2^32 scattered
  pairs, as for independent draws, never a shifted or permuted copy of the other call's sequence (which an
  additive or xor seed alone would give). One fmix32 round and one multiply, ~8 vectorised integer ops per
  element: ~50x cheaper on CPU than jax.random.bernoulli (threefry: 20 rounds per pair of words, otherwise
  more than half of a training step), and about half the cost of the two chained rounds used before
  (~3% of a bf16 training step at seed scale). Under jit with a sharded batch the iota is global, so the
  bits do not depend on the device count.
  """
  index = jax.lax.iota(jnp.uint32, int(np.prod(shape))).reshape(shape)
  multiplier = _fmix32(seeds[0] ^ _fmix32(seeds[1])) | jnp.uint32(1)
  return _fmix32((index ^ seeds[1]) * multiplier)


class Dropout(nn.Module):
  """Inverted dropout (zero with probability `rate`, scale the rest by 1 / (1 - rate)).

  impl 'hash' (default) draws the keep mask from `hash_bits` seeded by the module's 'dropout' RNG stream;
  impl 'jax' uses jax.random.bernoulli (flax's nn.Dropout). Same distribution, different random stream.
  """
  rate: float
  deterministic: bool
  impl: str = 'hash'

  @nn.compact
  def __call__(self, x):
    if self.deterministic or self.rate == 0.0:
      return x
    if self.rate >= 1.0:
      return jnp.zeros_like(x)
    key = self.make_rng('dropout')
    if self.impl == 'jax':
      keep = jax.random.bernoulli(key, 1.0 - self.rate, x.shape)
    elif self.impl == 'hash':
      threshold = min(int(round(self.rate * 2.0 ** 32)), 2 ** 32 - 1)
      keep = hash_bits(x.shape, jax.random.bits(key, (2,), jnp.uint32)) >= jnp.uint32(threshold)
    else:
      raise ValueError(f"Unknown dropout impl {self.impl!r}; expected 'hash' or 'jax'.")
    return jnp.where(keep, x * jnp.asarray(1.0 / (1.0 - self.rate), x.dtype), jnp.zeros((), x.dtype))


class SelfAttention(nn.Module):
  """Multi-head self-attention that also returns its weights [batch, heads, window, window] (float32).

  Written out (not nn.MultiHeadDotProductAttention) so the softmax runs in float32 and the weights can be
  returned for inspection; q, k and v come from one fused Dense because one large matmul is faster on CPU.
  """
  num_heads: int
  dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  dropout_impl: str = 'hash'

  @nn.compact
  def __call__(self, x, *, train: bool):
    d_model = x.shape[-1]
    if d_model % self.num_heads:
      raise ValueError(f'd_model={d_model} is not divisible by num_heads={self.num_heads}.')
    head_dim = d_model // self.num_heads
    init = nn.initializers.xavier_uniform()
    dot = dot_general_for(self.dtype)
    dense = dict(kernel_init=init, dtype=self.dtype, param_dtype=self.param_dtype)
    qkv = Dense((3, self.num_heads, head_dim), use_bias=False, name='qkv', **dense)(x)   # [B, W, 3, H, Dh]
    # No key bias: it adds q.b_k to every logit of a query row, which the softmax cancels, so its gradient
    # is pure rounding noise that Adam would amplify into random drift.
    qv_bias = self.param('qv_bias', nn.initializers.zeros_init(), (2, self.num_heads, head_dim),
                         self.param_dtype).astype(jnp.float32)
    q, k, v = _split_qkv(qkv)
    q, v = q + qv_bias[0], v + qv_bias[1]
    q = q * jnp.asarray(head_dim ** -0.5, q.dtype)
    logits = dot(q, k, (((3,), (3,)), ((0, 2), (0, 2))))                 # float32 [B, H, Wq, Wk]
    # Softmax with the normalisation deferred past the value product: out = (exp(l - max) @ v) / sum, the
    # same number as softmax(l) @ v to float32 rounding, but the division runs on [.., Wq, Dh] instead of
    # [.., Wq, Wk] (Wk / Dh times fewer) and one pass over the W x W scores is saved: ~30% of attention's
    # time on CPU at window 96. Dropout is elementwise, so dropping exp(l - max) before dividing is the same.
    scores = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
    total = scores.sum(axis=-1, keepdims=True)                            # float32 [B, H, Wq, 1]
    weights = scores / total                                              # returned for inspection only
    dropped = Dropout(self.dropout, not train, self.dropout_impl)(scores)
    out = dot(dropped, v, (((3,), (1,)), ((0, 1), (0, 2)))) / total      # [B, H, Wq, Dh]
    out = Dense(d_model, axes=2, name='out', **dense)(out.transpose(0, 2, 1, 3))
    return out, weights


class EncoderBlock(nn.Module):
  """Pre-LayerNorm Transformer block: x + Drop(Attn(LN(x))), then x + Drop(FF(LN(x))). Residuals stay f32."""
  num_heads: int
  d_ff: int
  dropout: float
  attention_dropout: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  dropout_impl: str = 'hash'

  @nn.compact
  def __call__(self, x, *, train: bool):
    dense = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=nn.initializers.xavier_uniform())
    h = nn.LayerNorm(dtype=jnp.float32, param_dtype=self.param_dtype, name='ln_attn')(x)
    h, weights = SelfAttention(self.num_heads, self.attention_dropout, self.dtype, self.param_dtype,
                               self.dropout_impl, name='attn')(h, train=train)
    x = x + Dropout(self.dropout, not train, self.dropout_impl)(h)
    h = nn.LayerNorm(dtype=jnp.float32, param_dtype=self.param_dtype, name='ln_ff')(x)
    h = Dense(self.d_ff, name='ff_in', **dense)(h)
    h = gelu(h)
    h = Dropout(self.dropout, not train, self.dropout_impl)(h)
    h = Dense(x.shape[-1], name='ff_out', **dense)(h)
    x = x + Dropout(self.dropout, not train, self.dropout_impl)(h)
    return x, weights


class Encoder(nn.Module):
  """[B, W, F] -> (sequence [B, W, d_model] f32, encoded [B, d_model] f32, attention list).

  `step_mask` [B, W] bool (pretraining only) replaces the embedded steps where it is True by `mask_token`
  [d_model], a parameter owned by the caller so the encoder's parameters are identical with and without it.
  With 'cls' pooling the attention weights cover W + 1 positions, the CLS token first.
  """
  d_model: int
  num_heads: int
  num_layers: int
  d_ff: int
  dropout: float
  attention_dropout: float
  pooling: str = 'mean'
  pos_encoding: str = 'sinusoidal'
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  dropout_impl: str = 'hash'

  @nn.compact
  def __call__(self, x, *, train: bool, step_mask=None, mask_token=None):
    if self.pooling not in POOLINGS:
      raise ValueError(f'Unknown pooling {self.pooling!r}; expected one of {POOLINGS}.')
    if self.pos_encoding not in POS_ENCODINGS:
      raise ValueError(f'Unknown pos_encoding {self.pos_encoding!r}; expected one of {POS_ENCODINGS}.')
    batch, window, _ = x.shape
    h = Dense(self.d_model, dtype=self.dtype, param_dtype=self.param_dtype,
              kernel_init=nn.initializers.xavier_uniform(), name='embed')(x)
    if step_mask is not None:
      h = jnp.where(step_mask[..., None], mask_token.astype(jnp.float32)[None, None, :], h)
    if self.pos_encoding == 'sinusoidal':
      h = h + jnp.asarray(sinusoidal_encoding(window, self.d_model))[None]
    else:
      table = self.param('pos_embedding', nn.initializers.normal(0.02), (window, self.d_model),
                         self.param_dtype)
      h = h + table.astype(jnp.float32)[None]
    if self.pooling == 'cls':
      cls = self.param('cls_token', nn.initializers.normal(0.02), (self.d_model,), self.param_dtype)
      h = jnp.concatenate([jnp.broadcast_to(cls.astype(jnp.float32), (batch, 1, self.d_model)), h], axis=1)
    h = Dropout(self.dropout, not train, self.dropout_impl)(h)
    attention = []
    for i in range(self.num_layers):
      h, weights = EncoderBlock(self.num_heads, self.d_ff, self.dropout, self.attention_dropout, self.dtype,
                                self.param_dtype, self.dropout_impl, name=f'block_{i}')(h, train=train)
      attention.append(weights)
    h = nn.LayerNorm(dtype=jnp.float32, param_dtype=self.param_dtype, name='ln_final')(h)
    if self.pooling == 'cls':
      encoded, sequence = h[:, 0], h[:, 1:]
    elif self.pooling == 'mean':
      sequence = h
      encoded = h.mean(axis=1)
    else:
      sequence = h
      scores = nn.Dense(1, dtype=jnp.float32, param_dtype=self.param_dtype, name='pool_score')(h)[..., 0]
      encoded = jnp.einsum('bw,bwd->bd', jax.nn.softmax(scores, axis=-1), h)
    return sequence, encoded, attention


def make_encoder(config, name: str = 'encoder') -> Encoder:
  """The Encoder described by a `config.model` section (ConfigDict or mapping)."""
  dropout = float(_get(config, 'dropout', 0.1))
  return Encoder(
      d_model=int(_get(config, 'd_model', 256)),
      num_heads=int(_get(config, 'num_heads', 8)),
      num_layers=int(_get(config, 'num_layers', 6)),
      d_ff=int(_get(config, 'd_ff', 1024)),
      dropout=dropout,
      attention_dropout=float(_get(config, 'attention_dropout', dropout)),
      pooling=str(_get(config, 'pooling', 'mean')),
      pos_encoding=str(_get(config, 'pos_encoding', 'sinusoidal')),
      dtype=_dtype(_get(config, 'dtype', 'float32')),
      param_dtype=_dtype(_get(config, 'param_dtype', 'float32')),
      dropout_impl=str(_get(config, 'dropout_impl', 'hash')),
      name=name)


class MLPHead(nn.Module):
  """Dense(hidden) -> GELU -> Dropout -> Dense(out); the output layer computes in float32."""
  hidden: int
  out: int
  dropout: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  dropout_impl: str = 'hash'

  @nn.compact
  def __call__(self, x, *, train: bool):
    h = Dense(self.hidden, dtype=self.dtype, param_dtype=self.param_dtype, name='hidden')(x)
    h = Dropout(self.dropout, not train, self.dropout_impl)(gelu(h))
    return nn.Dense(self.out, dtype=jnp.float32, param_dtype=self.param_dtype, name='out')(h)


class Heads(nn.Module):
  """The four supervised heads on the pooled embedding: {task: logits float32 [B, classes]}."""
  hidden: int
  dropout: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  dropout_impl: str = 'hash'

  @nn.compact
  def __call__(self, encoded, *, train: bool):
    return {task: MLPHead(self.hidden, n, self.dropout, self.dtype, self.param_dtype, self.dropout_impl,
                          name=task)(encoded, train=train) for task, n in HEAD_CLASSES.items()}


class NatronModel(nn.Module):
  """Multi-task model. `config` is the `config.model` section.

  __call__(x float32 [B, W, F], *, train, return_attention=False) -> dict with buy [B, 2], sell [B, 2],
  direction [B, 3], regime [B, 6] logits (float32), encoded [B, d_model] (float32) and, when asked,
  attention: list (one per layer) of float32 [B, heads, W, W] softmax weights.
  Dropout draws from the 'dropout' RNG stream when train=True.
  """
  config: Any

  @nn.compact
  def __call__(self, x, *, train: bool, return_attention: bool = False):
    _, encoded, attention = make_encoder(self.config)(x, train=train)
    cfg = self.config
    heads = Heads(int(_get(cfg, 'head_hidden', 128)), float(_get(cfg, 'dropout', 0.1)),
                  _dtype(_get(cfg, 'dtype', 'float32')), _dtype(_get(cfg, 'param_dtype', 'float32')),
                  str(_get(cfg, 'dropout_impl', 'hash')), name='heads')(encoded, train=train)
    out = dict(heads, encoded=encoded)
    if return_attention:
      out['attention'] = attention
    return out


class NatronPretrain(nn.Module):
  """Self-supervised wrapper: the same 'encoder' + reconstruction and projection heads + a mask token.

  __call__(x [B, W, F], mask [B, W] bool (True = replaced by the learned mask token), *, train) ->
  dict(reconstruction float32 [B, W, F] (per-step linear map back to the F features), projection float32
  [B, projection_dim] (MLP for InfoNCE), encoded float32 [B, d_model]). `mask=None` encodes the window
  unmasked (used for the contrastive views).
  """
  config: Any
  projection_dim: int = 64

  @nn.compact
  def __call__(self, x, mask=None, *, train: bool):
    cfg = self.config
    d_model = int(_get(cfg, 'd_model', 256))
    param_dtype = _dtype(_get(cfg, 'param_dtype', 'float32'))
    dtype = _dtype(_get(cfg, 'dtype', 'float32'))
    mask_token = self.param('mask_token', nn.initializers.normal(0.02), (d_model,), param_dtype)
    sequence, encoded, _ = make_encoder(cfg)(x, train=train, step_mask=mask, mask_token=mask_token)
    reconstruction = nn.Dense(x.shape[-1], dtype=jnp.float32, param_dtype=param_dtype,
                              name='reconstruction')(sequence)
    h = nn.Dense(d_model, dtype=jnp.float32, param_dtype=param_dtype, dot_general=dot_general_for(dtype),
                 name='projection_hidden')(encoded)
    projection = nn.Dense(self.projection_dim, dtype=jnp.float32, param_dtype=param_dtype,
                          name='projection_out')(gelu(h))
    return dict(reconstruction=reconstruction, projection=projection, encoded=encoded)
