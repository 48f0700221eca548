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
