"""Shared keys every phase reads. Phase configs call `get_base_config()` and override what they own.

Not a runnable config by itself: see configs/pipeline.py for the main job.
"""
import difflib

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.phase = ''          # one phase name, run by launch.py
  config.phases = ()         # or several, run in order into one workdir (pipeline)
  # Phases that consume a bundle (rl, backtest) rebuild data, labels and splits from the settings it recorded
  # ('bundle'), or from this config's data / labels / dataset sections ('config', e.g. new data).
  config.data_from = 'bundle'

  # --- Data: '' -> the built-in synthetic market; else a path, or comma-separated paths (one symbol each).
  config.data = ml_collections.ConfigDict()
  config.data.path = ''
  config.data.synthetic_bars = 20_000
  config.data.synthetic_seed = 0
  config.data.synthetic_symbols = 1
  config.data.timeframe = '15min'
  config.data.repair = False       # sort / drop duplicate bars (reported); never silent
  config.data.synthetic_preset = 'learnable'   # learnable (the demo) | realistic (real-FX-weak structure)
  # Quote grid: the price increment (MT5 SYMBOL_POINT), e.g. 1e-5 EURUSD, 1e-3 USDJPY, 0.01 stocks. None: inferred
  # from the quotes' decimals (the load summary says which). Per symbol: 'EURUSD=1e-5,USDJPY=1e-3'. Features are
  # computed on prices in points (exact in float32) and MT5 spreads in points are converted with it.
  config.data.point = ml_collections.config_dict.placeholder(str)
  # Time zone of naive timestamps (MT5 exports and the EA use broker server time): an IANA name such as 'EET' or
  # a fixed offset such as '+02:00'. None: taken as UTC, and the load summary says so.
  config.data.tz = ml_collections.config_dict.placeholder(str)

  # --- Labels (natron.labels): horizons in bars; thresholds fitted on the training span only.
  config.labels = ml_collections.ConfigDict()
  config.labels.horizon = 12
  config.labels.pt = 2.0
  config.labels.sl = 1.0
  config.labels.vol_span = 100
  config.labels.direction_shares = (1 / 3, 1 / 3, 1 / 3)   # UP, DOWN, NEUTRAL
  config.labels.regime_horizon = 48
  config.labels.regime_vol_lookback = 2000   # trailing bars of sigma whose median defines "normal" vol
  config.labels.regime_shares = ()           # () -> fixed thresholds below; 6 shares -> fitted on train
  config.labels.regime_volatile_ratio = 1.6  # forward realised vol / trailing median sigma
  config.labels.regime_range_z = 2.0         # |t-stat of forward drift| below: RANGE
  config.labels.regime_strong_z = 5.0        # at or above: STRONG, else WEAK

  # --- Dataset (natron.dataset): windows, scaler, purged chronological splits, batches.
  config.dataset = ml_collections.ConfigDict()
  config.dataset.window = 96
  config.dataset.split = (0.7, 0.15, 0.15)
  config.dataset.split_dates = ()    # or (val_start, test_start) as ISO dates: split by date instead
  config.dataset.purge = -1          # -1: max label horizon + window
  config.dataset.max_gap_bars = 0    # 0: no limit; else longer time gaps are not crossed by a window
  config.dataset.scaler_clip = 5.0
  config.dataset.batch_size = 128

  # --- Model (natron.model): the seed's scale by default.
  config.model = ml_collections.ConfigDict()
  config.model.d_model = 256
  config.model.num_heads = 8
  config.model.num_layers = 6
  config.model.d_ff = 1024
  config.model.dropout = 0.1
  config.model.attention_dropout = 0.1       # on the attention weights
  config.model.dropout_impl = 'hash'         # counter-hash masks (1.4x faster step on CPU); 'jax': jax.random
  config.model.pooling = 'mean'              # mean | cls | attention
  config.model.pos_encoding = 'sinusoidal'   # sinusoidal | learned
  config.model.head_hidden = 128
  config.model.dtype = 'float32'             # compute dtype; 'bfloat16' keeps params/logits/LN stats f32
  config.model.param_dtype = 'float32'

  # --- Backtest (natron.backtest): costs and annualisation used by every report.
  config.backtest = ml_collections.ConfigDict()
  config.backtest.cost_bps = 1.0
  # Spread for data without one (a CSV without a spread column): '1.2 points' / '0.00012' (price units), or per
  # symbol 'EURUSD=1.2 points,USDJPY=1.5 points'. Data without a spread and no value here is an error: a
  # backtest never falls back silently to commission only.
  config.backtest.spread = ml_collections.config_dict.placeholder(str)
  # Trading day for daily Sharpe: a day starts at this local time (FX: 17:00 New York, so a Sunday-evening open
  # joins Monday and a 24x5 week has exactly 5 days, whether the data came in UTC or broker time).
  config.backtest.trading_day = '17:00 America/New_York'
  config.backtest.periods_per_year = 260     # trading days: 260 for 24x5 FX, 252 for exchanges
  config.backtest.threshold = 0.6            # supervised BUY/SELL signal confidence

  # --- Baselines (natron.baselines), fitted on the training span only, shown beside every reported skill.
  config.baselines = ml_collections.ConfigDict()
  config.baselines.linear_epochs = 10         # DLinear-style logistic regression; the best val epoch is kept
  config.baselines.linear_lr = 1e-3
  config.baselines.linear_weight_decay = 1e-2
  config.baselines.linear_batch_size = 256

  # --- Evaluation (natron.stats): block-bootstrap intervals, verdicts and the Deflated Sharpe's trial count.
  config.evaluation = ml_collections.ConfigDict()
  config.evaluation.bootstrap = 1000          # replicates
  config.evaluation.level = 0.95              # interval coverage
  config.evaluation.block = -1                # windows per block; -1: the longest label horizon
  config.evaluation.block_days = -1           # backtests: days per block; -1: max(label horizon, D^(1/3) days)
  config.evaluation.trials = 1                # configurations tried (sweep size x seeds) for the Deflated Sharpe

  # --- Multi-host (one process per host, the same command on every host; README "More than one machine").
  config.distributed = False                 # jax.distributed.initialize() for multi-host runs
  # Unset (''/0/-1): detected from the cluster (SLURM, Open MPI, Kubernetes, Cloud TPU). Set all three to launch
  # the processes yourself (process_id differs per process), e.g. two processes on one machine in the tests.
  config.cluster = ml_collections.ConfigDict()
  config.cluster.coordinator_address = ''    # 'host:port' of process 0
  config.cluster.num_processes = 0
  config.cluster.process_id = -1
  return config


def apply_quick(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks data and model so any phase runs in minutes on 2 CPU cores (the `:quick` variants)."""
  config.data.synthetic_bars = 20_000
  config.model.d_model = 64
  config.model.num_heads = 4
  config.model.num_layers = 2
  config.model.d_ff = 128
  config.model.head_hidden = 64
  config.dataset.batch_size = 128
  config.baselines.linear_epochs = 5
  return config


_TRUE, _FALSE = ('true', '1', 'yes', ''), ('false', '0', 'no')


def parse_arg(arg, **spec) -> ml_collections.ConfigDict:
  """Strictly parses a config variant string (big_vision's `parse_arg`): 'quick' or 'quick=False,n=3'.

  `spec` names every accepted key with its default, whose type the value is parsed to (default: `quick=False`).
  An unknown key ('quik') or a malformed value ('quick=maybe') raises ValueError naming the known keys, so a
  typo never silently runs another variant.
  """
  spec = spec or {'quick': False}
  out = ml_collections.ConfigDict(dict(spec))
  for part in (arg or '').split(','):
    part = part.strip()
    if not part:
      continue
    key, has_value, value = part.partition('=')
    key, value = key.strip(), value.strip()
    if key not in spec:
      close = difflib.get_close_matches(key, list(spec), n=1)
      hint = f' (did you mean {close[0]}?)' if close else ''
      raise ValueError(f'unknown config variant {key!r}{hint}; known: {", ".join(sorted(spec))}')
    default = spec[key]
    try:
      if isinstance(default, bool):
        if value.lower() not in _TRUE + _FALSE:
          raise ValueError(value)
        out[key] = value.lower() in _TRUE
      elif has_value and default is not None:
        out[key] = type(default)(value)
      else:
        out[key] = value if has_value else True
    except ValueError:
      raise ValueError(f'config variant {key}={value!r} is not a valid {type(default).__name__}') from None
  return out
