r"""Computes Natron's feature matrix (137 causal, scale-free features in 11 categories) and its summary.

  python launch.py --config=configs/features.py --workdir=runs/features
  python launch.py --config=configs/features.py:quick --workdir=runs/features_quick
  python launch.py --config=configs/features.py --workdir=runs/eurusd --config.data.path=EURUSD_M15.csv

Writes runs/<...>/features/features.npz (features float32 [rows, F], names, time, symbol) and
features_summary.json (counts per category, WARMUP, schema hash, NaN-free rows, compute time, per-feature
mean/std/min/max).

Runtime on 2 CPU cores: ~15-40 s, almost all of it the one-off jit compile of the feature graph (the
compute itself is a few seconds per million bars).
Expected (synthetic market, default seed): 137 features; the first WARMUP = 1000 rows of each symbol are
NaN and every later row is finite (20,000 bars -> 19,000 NaN-free rows; quick: 6,000 bars -> 5,000).
"""
import ml_collections

from configs import base


def section(quick: bool = False) -> ml_collections.ConfigDict:
  """The config.features block."""
  del quick   # the features are the same at every scale; the quick variant only shrinks the data
  features = ml_collections.ConfigDict()
  features.save_matrix = True    # write features.npz (the summary is always written)
  features.check_finite = True   # a NaN/inf after the warm-up stops the phase, naming the row and features
  return features


def get_config(arg=None) -> ml_collections.ConfigDict:
  """`configs/features.py` (20,000 synthetic bars) or `configs/features.py:quick` (6,000 bars)."""
  args = base.parse_arg(arg)
  config = base.get_base_config()
  config.phase = 'features'
  config.features = section(args.quick)
  if args.quick:
    base.apply_quick(config)
    config.data.synthetic_bars = 6_000
  return config
