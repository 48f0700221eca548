"""Test-wide settings: CPU only, and one persistent XLA compilation cache for the whole run.

The feature graph takes ~20 s to compile per input length; tests that start subprocesses (launch.py, the
uvicorn server) would pay it again in every process. The cache lives in the checkout (git-ignored), so a
CI run starts cold and stays self-contained. Environment variables reach the subprocesses too.
"""
import os

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(_ROOT, '.jax_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '2')


import contextlib  # noqa: E402  (after the environment is set, before jax is imported)

import pytest  # noqa: E402


@contextlib.contextmanager
def fewer_xla_optimisations():
  """Tiny test models are compile-bound: skip most XLA optimisation passes (as the Flax examples' tests do)."""
  import jax  # pylint: disable=g-import-not-at-top
  previous = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  try:
    yield
  finally:
    jax.config.update('jax_disable_most_optimizations', previous)


@pytest.fixture(scope='module', autouse=True)
def _fast_compile_module(request):
  """For every test module that sets FAST_COMPILE = True, before any of its own fixtures."""
  if getattr(request.module, 'FAST_COMPILE', False):
    with fewer_xla_optimisations():
      yield
  else:
    yield


@pytest.fixture
def fast_compile():
  """The same for one test only (request it by name)."""
  with fewer_xla_optimisations():
    yield


# ------------------------------------------------------------------------------------------ float32 error budget
# Tests that compare one float32 computation done two ways (other batch shapes, chunkings, device counts or
# reduction orders) take their tolerances from rounding-error analysis, never from what one machine printed:
# XLA's CPU code differs between CPUs (AVX2 vs AVX-512 vectorise and reassociate reductions differently).
U32 = 2.0**-24            # unit roundoff of float32 (half an ulp of 1.0)


def gamma32(n: int) -> float:
  """Higham's gamma_n = n u / (1 - n u): relative bound on n accumulated float32 roundings (a length-n sum or
  dot product, in any order), relative to the sum of the magnitudes of its terms."""
  return n * U32 / (1.0 - n * U32)


def model_path_terms(model: dict, window: int, num_features: int, feature_terms: int = 100) -> int:
  """Roundings that accumulate along a NatronModel forward pass from candles to one logit.

  Per encoder layer: the attention scores (d_model terms), the attention average (window terms), the
  output projection (d_model) and the two FFN dots (d_model + d_ff); plus the input projection
  (num_features), pooling (window) and the head MLP (d_model + head_hidden). `feature_terms` covers the
  feature graph: windowed sums (<= ~200 terms, blocked) and contractive recursions, whose accumulated
  rounding is ~u / alpha (~50u for EMA 100), so ~100 roundings bound a feature's relative error.
  """
  d, ff, h = int(model['d_model']), int(model['d_ff']), int(model['head_hidden'])
  layer = d + window + d + d + ff
  return feature_terms + num_features + int(model['num_layers']) * layer + window + d + h


def prob_atol(model: dict, window: int, num_features: int, magnitude: float = 8.0) -> float:
  """Absolute bound on the difference of a head probability computed by the same float32 model twice.

  A logit's rounding error is at most gamma_n times the sum of |terms| along its path; LayerNorm keeps
  activations O(1) and `magnitude` bounds that sum in units of the logit scale (the test bundles scale their
  random weights by 3, giving |logits| of a few units). A sigmoid/softmax probability moves by at most 1/4 /
  1/2 of its logit's change, so 1/2 * gamma_n * magnitude bounds it.
  """
  return 0.5 * gamma32(model_path_terms(model, window, num_features)) * magnitude
