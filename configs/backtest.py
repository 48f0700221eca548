r"""Backtests every policy on each symbol's held-out test span (natron.backtest.run_phase).

  python launch.py --config=configs/backtest.py:quick --workdir=runs/demo    # after finetune (+ rl) there

Compares, net of costs and with next-bar execution: the PPO policy (workdir/rl/policy_test.npz, if the rl
phase ran), the supervised BUY/SELL/HOLD signal of workdir/finetune/bundle, buy-and-hold, always-flat and a
random policy. Writes workdir/backtest/<symbol>/{metrics.json, table.md, equity.png} and settings.json.

The test span comes from config.data / labels / dataset exactly as in training: pass the same data overrides
(--config.data.path=..., split) as the run that made the bundle, and the same variant (`:quick` after a quick
pipeline). Costs: --config.backtest.cost_bps (per unit traded, plus half the bar's spread when the data has
one); annualisation: --config.backtest.periods_per_year (260 for 24x5 FX, 252 for exchanges).
Runtime: seconds to a minute on 2 CPU cores (one pass of the model over the series).
"""
from configs import base


def get_config(arg=None):
  args = base.parse_arg(arg)
  config = base.get_base_config()
  config.phase = 'backtest'
  if args.get('quick'):
    base.apply_quick(config)
  return config
