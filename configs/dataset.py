r"""Builds the labelled, purged dataset and writes its summary (no training).

  python launch.py --config=configs/dataset.py --workdir=runs/dataset
  python launch.py --config=configs/dataset.py:quick --workdir=runs/dataset_quick
  python launch.py --config=configs/dataset.py --workdir=runs/ds2 --config.data.synthetic_symbols=2
  python launch.py --config=configs/dataset.py --workdir=runs/eurusd --config.data.path=EURUSD_M15.csv \
      --config.data.tz=EET --config.dataset.split_dates="('2023-01-01','2023-07-01')" \
      --config.dataset.max_gap_bars=200
  python launch.py --config=configs/dataset.py:quick --workdir=runs/weak --config.data.synthetic_preset=realistic

Data keys (configs/base.py): data.tz is the zone of the files' naive times (MT5 exports are broker server
time: 'EET' for UTC+2/+3 with daylight saving, or a fixed offset '+02:00'; unset: UTC, said in the log);
data.point is the quote grid ('1e-5', or per file stem 'EURUSD=1e-5,USDJPY=1e-3'; unset: inferred from the
quote decimals, said in the log) and converts MT5 spreads in points to price units; data.synthetic_preset
picks the synthetic market: 'learnable' (the demo; the expected figures below are for it) or 'realistic'
(real-FX-weak structure: drift and lag-1 autocorrelation at real magnitudes, so expect much lower agreement).

Writes runs/<...>/dataset/summary.json and summary.md: windows per split, class shares per split and task,
the purge gap measured at every split boundary, scaler statistics, fitted label thresholds, class weights and,
on the synthetic market, the regime labels' agreement with the generator's true regimes.

Runtime: ~30 s on 2 CPU cores for the default 20,000 synthetic bars (mostly compiling the features).
Expected (synthetic, default seed): 12,905 train / 2,856 val / 2,856 test windows, a NEUTRAL direction share
of 1/3 on train (UP/DOWN as the data fall, ~0.30/0.38), regime agreement with the generator's true regimes
~0.86 / 0.89 / 0.87 on train / val / test (about the same with thresholds fitted to equal class shares:
--config.labels.regime_shares="(1,1,1,1,1,1)"); 0.86 on the last 300,000 of 1,000,000 bars.
"""
import ml_collections

from configs import base

# Label keys beyond base.py's (natron.labels.DEFAULTS): the regime classifier's thresholds.
REGIME_LABEL_KEYS = {
    'regime_vol_lookback': 2000,    # bars of trailing sigma whose median is the "normal" volatility
    'regime_shares': (),            # () -> the fixed thresholds below; 6 shares -> thresholds fitted on train
    'regime_volatile_ratio': 1.6,   # forward realised vol / trailing median sigma above this -> VOLATILE
    'regime_range_z': 2.0,          # |t-statistic of the forward drift| below this -> RANGE
    'regime_strong_z': 5.0,         # |t-statistic| at or above this -> BULL_STRONG / BEAR_STRONG
}


def section(quick: bool = False) -> ml_collections.ConfigDict:
  """The config.dataset block: base.py's keys plus the optional ones this phase reads."""
  del quick   # the quick variant shrinks data and model (base.apply_quick), not the dataset's rules
  dataset = base.get_base_config().dataset
  # () -> split by the fractions in `split`; ('YYYY-MM-DD', 'YYYY-MM-DD') -> validation and test start dates.
  dataset.split_dates = ()
  return dataset


def labels_section() -> ml_collections.ConfigDict:
  """config.labels: base.py's keys plus the regime thresholds (natron.labels reads them with defaults)."""
  labels = base.get_base_config().labels
  for key, value in REGIME_LABEL_KEYS.items():
    if key not in labels:
      labels[key] = value
  return labels


def get_config(arg=None):
  args = base.parse_arg(arg)
  config = base.get_base_config()
  config.phase = 'dataset'
  config.dataset = section(args.quick)
  config.labels = labels_section()
  if args.quick:
    base.apply_quick(config)
  return config
