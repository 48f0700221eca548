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
