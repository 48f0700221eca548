r"""Several draws (natron.seeds): the same phases for N seeds, mean and spread of every figure.

  python launch.py --config=configs/seeds.py:quick --workdir=runs/seeds

Seed k fine-tunes (from scratch), trains PPO and backtests on a synthetic market of its own (data seed + k)
with model seed + k, into runs/seeds/seeds/seed_<k>/; runs/seeds/seeds/report.md gives each figure's mean ±
std across seeds, the model's margins over momentum and linear per seed with their 95% intervals, and the
number of seeds whose verdict is skill. Expected runtime on 2 CPU cores at :quick: about 4-6 minutes a seed
(finetune ~2 min, rl ~2-3 min, backtest ~20 s), i.e. 15-20 minutes for the default 3 seeds. Add
--config.data.synthetic_preset=realistic for the market without much structure; --config.seeds.vary_data=False
keeps one market and varies only the model seed (needed with --config.data.path).
"""
import ml_collections

from configs import base
from configs import finetune
from configs import rl


def section() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.n = 3
  c.vary_data = True             # a new synthetic market per seed (else only the model seed changes)
  c.phases = ('finetune', 'rl', 'backtest')
  return c


def get_config(arg=None) -> ml_collections.ConfigDict:
  args = base.parse_arg(arg)
  config = base.get_base_config()
  config.phase = 'seeds'
  config.seeds = section()
  config.finetune = finetune.section(args.quick)
  config.finetune.model_init = ''
  config.finetune.rl_holdout = 0.3    # PPO on out-of-sample encoder outputs
  config.rl = rl.section(args.quick)
  if args.quick:
    base.apply_quick(config)
  return config
