r"""Backtests every policy on each symbol's held-out test span (natron.backtest.run_phase).

  python launch.py --config=configs/backtest.py:quick --workdir=runs/demo    # after finetune (+ rl) there

Compares, net of costs and with next-bar execution: the PPO policy (workdir/rl/policy_test.npz, if the rl
phase ran), the supervised BUY/SELL/HOLD signal of workdir/finetune/bundle, the momentum rule and the linear
model's signal (workdir/finetune/baselines), buy-and-hold, always-flat and a random policy. Writes
workdir/backtest/<symbol>/{metrics.json, table.md, equity.png} and settings.json; each policy's entry has
95% block-bootstrap intervals of total return and Sharpe, PSR, DSR (evaluation.trials x PPO seeds) and a
verdict against the best of flat, buy-and-hold, momentum and linear.

The test span comes from the data / labels / dataset settings the bundle recorded (the fine-tuning run's), so
no override needs repeating; a differing one is named in a warning (--config.data_from=config uses yours, e.g.
to backtest on new data). Costs, per unit traded: --config.backtest.cost_bps (commission) plus half the bar's spread: the
data's spread (MT5 points converted to price units at load), or for data without one
--config.backtest.spread='1.2 points' (with the point from data.point or inferred from the quotes), '0.00012'
(price units) or per symbol 'EURUSD=1.2 points,USDJPY=0.015'. Data without a spread and no backtest.spread
stops with an error: a backtest never falls back to commission only. Every symbol's metrics.json, table.md
and settings.json state the cost model applied (commission, spread source, mean spread in price units and
points). The position held into the last bar is closed there and pays its exit cost.
Annualisation: --config.backtest.periods_per_year (260 for 24x5 FX, 252 for exchanges) over trading days
that start at 17:00 New York (natron.backtest.trading_days: a 24x5 week is 5 days, in UTC or broker time).
Runtime: seconds to a minute on 2 CPU cores (one pass of the model over the series).
"""
from configs import base


def get_config(arg=None):
  args = base.parse_arg(arg)
  config = base.get_base_config()
  config.phase = 'backtest'
  if args.quick:
    base.apply_quick(config)
  return config
