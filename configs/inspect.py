r"""Inspection of a fine-tuned model: attention heatmaps over the window and test-split confusion matrices.

Run after the finetune phase, in the same workdir (it reads workdir/finetune/bundle and rebuilds the test
split from the bundle's data config, checking that the scaler matches the bundle's):

  python launch.py --config=configs/inspect.py:quick --workdir=runs/ft_quick
  python launch.py --config=configs/inspect.py --workdir=runs/ft --config.inspect.num_windows=5

Expected: a few seconds on CPU (one forward pass over the test split plus matplotlib); writes into
workdir/inspect/: attention_w<k>_layer<l>_mean.png (head-averaged query x key heatmap, close prices of the
window above it, mean attention each time step receives below it), attention_w<k>_layer<l>_heads.png (one
heatmap per head), confusion_<task>.png (test split, counts + row-normalised colours, accuracy beside the
training-majority baseline) and index.json listing them.
"""
import ml_collections

from configs import base


def section(quick: bool = False) -> ml_collections.ConfigDict:
  """The `config.inspect` block (also composed by configs/pipeline.py)."""
  c = ml_collections.ConfigDict()
  # 'bundle': rebuild the test split from the data/labels/dataset config stored in the bundle (what the model
  # was evaluated on); 'config': from this config's sections (e.g. new candles via --config.data.path).
  c.data_from = 'bundle'
  c.num_windows = 3          # test windows, evenly spaced over the test split
  c.window_index = ()        # or explicit positions in the test split's labelled windows (overrides num_windows)
  c.layers = ()              # encoder layers to draw; () = all
  c.per_head = True          # also one figure per layer with every head's heatmap
  c.dpi = 100
  c.eval_batch_size = 256
  if quick:
    c.num_windows = 2
  return c


def get_config(arg=None) -> ml_collections.ConfigDict:
  """`configs/inspect.py[:quick]`: model and (by default) data settings come from the bundle."""
  args = base.parse_arg(arg)
  config = base.get_base_config()
  config.phase = 'inspect'
  config.inspect = section(quick=args.quick)
  if args.quick:
    base.apply_quick(config)
  return config
