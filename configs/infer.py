r"""Batch inference: one prediction row per bar of a series (natron.infer.run_phase).

  python launch.py --config=configs/infer.py --workdir=runs/demo --config.data.path=bars.csv \
      --config.output=predictions.csv

Reads the bundle at workdir/finetune/bundle (or --config.bundle), loads the candles with natron.data (CSV,
MT5 export, Parquet; '' -> the built-in synthetic market; comma-separated paths -> one symbol each), computes
the features once over each whole series (the training code path), runs the model on every window in
fixed-size jitted batches with a progress bar, and writes time, [symbol,] valid, buy_prob, sell_prob,
direction (+ prob_UP/DOWN/NEUTRAL), regime (+ regime_confidence and the six prob_<REGIME>), signal,
confidence, model_version. Bars before required_candles - 1 have valid=False, empty probabilities and HOLD.
A `.parquet` output path writes Parquet instead of CSV.

Expected runtime on 2 CPU cores: the model dominates, ~21 MFLOP per bar at the quick size (d_model 64,
2 layers, window 96): ~4,500 bars/s on a quiet 2-core Intel Xeon, ~3,000 on one core (experiments/bench_infer.py),
so 1M bars take ~4 min, plus one compile of the feature graph per series length (~5-20 s). At the seed's size
(~1 GFLOP per bar) use a GPU, or --config.dtype=bfloat16 on a CPU with AMX.
"""
import ml_collections

from configs import base


def section(quick: bool = False) -> ml_collections.ConfigDict:
  """The batch-inference keys (top level of the config: --config.output=...)."""
  del quick
  infer = ml_collections.ConfigDict()
  infer.bundle = ''          # '' -> workdir/finetune/bundle
  infer.output = ''          # '' -> workdir/infer/predictions.csv
  infer.encoded_output = ''  # optional .npy path for the pooled embeddings [T, d_model]
  infer.batch_size = 128     # windows per jitted model call (128 measured fastest per window on 2 cores)
  infer.threshold = -1.0     # < 0 -> the bundle's thresholds.signal
  # Matmul input dtype: '' -> the bundle's model.dtype; 'bfloat16' -> bf16 inputs with float32 accumulation
  # (faster where the CPU has AMX/AVX512-BF16 or on a GPU; probabilities differ from float32 by ~1e-2 at most,
  # measured and tested in tests/test_predictor.py); 'float32' -> exact float32.
  infer.dtype = ''
  return infer


def get_config(arg=None):
  args = base.parse_arg(arg)
  config = base.get_base_config()
  config.phase = 'infer'
  config.update(section(args.quick))   # the bundle decides the model size
  return config
