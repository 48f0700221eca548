r"""Export a fine-tuned bundle for MetaTrader 5 and for fast server start-up (natron.export.run_phase).

  python launch.py --config=configs/export.py --workdir=runs/demo        # reads runs/demo/finetune/bundle
  python launch.py --config=configs/export.py --workdir=x --config.bundle=path/to/bundle --config.onnx=False

Writes workdir/export/natron.onnx (the whole raw-candles-to-probabilities function, opset 14, input float32
[1, required_candles, 5] with the prices in points), natron.jax (the same function as jax.export StableHLO,
symbolic batch) and natron.json (layout, outputs, classes, thresholds, hashes, opset). Copy natron.onnx and
natron.json next to mt5/NatronEA.mq5 (mt5/README.md); serve with --config.exported=runs/demo/export.

Writes too executables/<key id>/ (--config.executables=False: not): every serving bucket and the series
chunk compiled for this machine, which `--config.exported=DIR` servers on the same kind of machine load
instead of compiling (natron.export, "Compiled executables"). Export on the serving machine (or one with the
same CPU features and jaxlib); running the phase again on another kind of machine adds its set beside.

Expected runtime on 2 CPU cores: the jax2onnx conversion walks the feature graph's ~100 features (minutes at
any model size); the jax.export serialisation takes about one trace of the feature graph (~10-20 s); the
executables take one cold compile of every bucket and the series chunk (~1.5 CPU-minutes at the quick size;
4.5-9 min wall measured on 2 cores shared with other jobs). A server then starts in seconds (README).
"""
import ml_collections

from configs import base
from configs import serve


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
  # Compiled serving executables for THIS machine (executables/<key id>/): a server started with
  # --config.exported=DIR on a machine with the same CPU features, jaxlib and compile options loads them
  # instead of compiling (seconds instead of minutes); elsewhere it compiles as before and logs why.
  export.executables = True
  export.buckets = serve.section().buckets   # the server's batch buckets: compile what it will ask for
  export.series_chunk = -1   # < 0: the server's series chunk (natron.serve.engine.DEFAULT_SERIES_CHUNK)
  return export


def get_config(arg=None):
  args = base.parse_arg(arg)
  config = base.get_base_config()
  config.phase = 'export'
  config.update(section(args.quick))
  return config
