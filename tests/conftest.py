"""Test-wide settings: CPU only, so results do not depend on which machine runs CI."""
import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
