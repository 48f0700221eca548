r"""The whole Natron pipeline in one workdir: dataset -> pretrain -> finetune -> inspect -> rl -> backtest -> report.

The README's main job (built-in synthetic market, 2 CPU cores, about 5-8 minutes):

  python launch.py --config=configs/pipeline.py:quick --workdir=runs/demo

then read runs/demo/report.md. At the seed's scale (d_model 256, 6 layers, 100 fine-tuning epochs) drop
`:quick` and point it at your candles: --config.data.path=EURUSD_M15.csv (hours on a CPU; use a GPU).

Each phase hands over through the workdir: pretrain/ (Orbax checkpoint) is the fine-tuning encoder init
(finetune.model_init='auto'), finetune/bundle/ is what the RL phase, the backtests and the server load.
"""
from configs import base
from configs import finetune
from configs import pretrain
from configs import rl
from configs import walkforward


def get_config(arg=None):
  args = base.parse_arg(arg)
  quick = args.quick
  config = base.get_base_config()
  config.phases = ('dataset', 'pretrain', 'finetune', 'inspect', 'rl', 'backtest', 'report')
  config.pretrain = pretrain.section(quick)
  config.finetune = finetune.section(quick)
  config.finetune.model_init = 'auto'    # the encoder from this workdir's pretrain/ checkpoint
  # PPO trains on the last 30% of the training span, which fine-tuning never saw (purged by label end): its
  # observations are out-of-sample encoder outputs, as they will be on the test span.
  config.finetune.rl_holdout = 0.3
  config.rl = rl.section(quick)
  config.inspect = finetune_inspect_section()
  # Not run by default (slow): add 'walkforward' to --config.phases to repeat finetune + rl + backtest
  # over successive purged folds.
  config.walkforward = walkforward.section(quick)
  if quick:
    base.apply_quick(config)
  return config


def finetune_inspect_section():
  from configs import inspect as inspect_config  # pylint: disable=g-import-not-at-top
  return inspect_config.section()
