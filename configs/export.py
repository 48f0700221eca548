r"""Export a fine-tuned bundle for MetaTrader 5 and for fast server start-up (natron.export.run_phase).

  python launch.py --config=configs/export.py --workdir=runs/demo        # reads runs/demo/finetune/bundle
  python launch.py --config=configs/export.py --workdir=x --config.bundle=path/to/bundle --config.onnx=False

Writes workdir/export/natron.onnx (the whole raw-candles-to-probabilities function, opset 14, input float32
[1, required_candles, 5] with the prices in points), natron.jax (the same function as jax.export StableHLO,
symbolic batch) and natron.json (layout, outputs, classes, thresholds, hashes, opset). Copy natron.onnx and
natron.json next to mt5/NatronEA.mq5 (mt5/README.md); serve with --config.exported=runs/demo/export.

Expected runtime on 2 CPU cores: the jax2onnx conversion walks the feature graph's ~100 features (minutes at
any model size); the jax.export serialisation takes about one trace of the feature graph (~10-20 s).
"""
import ml_collections

from configs import base


def section(quick: bool = False) -> ml_collections.ConfigDict:
  """The export keys (top level of the config: --config.opset=14)."""
  del quick   # the bundle decides the model size
  export = ml_collections.ConfigDict()
  export.bundle = ''         # '' -> workdir/finetune/bundle
  export.output_dir = ''     # '' -> workdir/export
  export.onnx = True         # False: only natron.jax + natron.json (no jax2onnx needed)
  export.opset = 14          # ONNX opset (the lowest the converter emits); MT5's ONNX Runtime 1.14 runs <= 18
  export.platforms = ''      # jax.export platforms, comma-separated ('' -> this machine's, e.g. 'cpu,cuda')
  export.threshold = -1.0    # signal threshold written to natron.json; < 0 -> the bundle's thresholds.signal
  return export


def get_config(arg=None):
  args = base.parse_arg(arg)
  config = base.get_base_config()
  config.phase = 'export'
  config.update(section(args.quick))
  return config
