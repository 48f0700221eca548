r"""Walk-forward evaluation (natron.walkforward): fine-tune + PPO + test repeated over successive folds.

  python launch.py --config=configs/walkforward.py:quick --workdir=runs/wf

Fold k trains on every bar before its validation block (mode='expanding'; 'rolling' keeps a fixed-length
window), picks its epoch / PPO seed on that validation block and is tested on test block k; the last
test_frac of the bars are cut into `folds` consecutive, disjoint test blocks (or blocks of test_bars each),
purged from validation and training by dataset.purge. Each fold sees no bar after its test block. Output:
runs/wf/walkforward/{plan.json, summary.json, report.md, fold_<k>/...}: per fold and symbol every policy's
total return, Sharpe, max drawdown and trades (PPO, supervised signal, buy-and-hold, flat, random), the
supervised test accuracy / macro-F1 per task, and across folds mean ± std, the compounded return of the
chained test blocks and the share of folds in which PPO / the supervised signal beat flat and buy-and-hold.
Re-running the command resumes (finished folds are skipped, an interrupted phase resumes by itself).
Folds are cut on one calendar for all symbols (common dates, purged per symbol). Costs are resolved for
every symbol before the first fold (data without a spread needs backtest.spread, see configs/backtest.py),
and report.md states the cost model each fold's backtest applied.

On a cluster, one task per fold and a gather (which refuses missing folds and folds run with another config):

  python launch.py --config=configs/walkforward.py:quick --workdir=runs/wf --fold=$K    # K = 0..folds-1
  python launch.py --config=configs/walkforward.py:quick --workdir=runs/wf --gather

Slow by design, and not part of configs/pipeline.py: it costs `folds` fine-tunings and PPO trainings.
Expected runtime on 2 CPU cores (quick: 20,000 synthetic bars, d_model 64, 2 layers, 2 epochs, PPO 2 seeds
x 262k steps, 3 expanding folds with test blocks of 2,000 bars): about 3-4 min per fold, 10-12 min in all
(an estimate from the finetune and rl quick runtimes, ~100 s + ~60 s per fold, not a timed end-to-end run;
a tiny 2-fold run with all three phases takes ~35 s with warm compile caches). Full scale: `folds` times the
finetune + rl configs' runtimes: a GPU job. Expected result (not yet measured over folds): on the synthetic
market, whose structure the single-split quick pipeline learns (PPO +63% vs flat 0% on its test span, see
configs/rl.py), PPO and the supervised signal should beat always-flat after costs in most folds; on real
data the report shows whatever happened, fold by fold, losses included.
To reuse one self-supervised encoder, run configs/pretrain.py into the same workdir first (model_init='auto'
then picks workdir/pretrain for every fold); for a strictly out-of-sample encoder per fold, add 'pretrain' to
walkforward.phases instead.
"""
import ml_collections

from configs import base
from configs import finetune
from configs import rl


def section(quick: bool = False) -> ml_collections.ConfigDict:
  """The `config.walkforward` block."""
  c = ml_collections.ConfigDict()
  c.folds = 3
  c.mode = 'expanding'            # 'expanding': train from the first bar; 'rolling': fixed-length window
  c.test_frac = 0.3               # the last 30% of the bars, in `folds` equal test blocks ...
  c.test_bars = 0                 # ... or this many bars per test block (> 0 overrides test_frac)
  c.val_bars = -1                 # validation bars before each test block; -1: one test block
  c.train_bars = 0                # rolling window length; 0: as long as fold 0's training span
  c.min_train_bars = 0            # 0: feature warm-up + window + one test block
  c.phases = ('finetune', 'rl', 'backtest')   # run in each fold's workdir, in order
  # One fold per invocation (a SLURM array / Kubernetes job / Ray task each), then one gather (launch.py --fold=k
  # and --gather set these): -1 runs every fold in order and writes the tables.
  c.fold = -1
  c.gather = False                # run nothing: build plan/summary/report from the folds already in the workdir
  del quick   # the same fold layout at both scales: the quick variant shrinks the model and the training
  return c


def get_config(arg=None) -> ml_collections.ConfigDict:
  """`configs/walkforward.py` (seed scale) or `configs/walkforward.py:quick` (small model, minutes per fold)."""
  args = base.parse_arg(arg)
  quick = args.quick
  config = base.get_base_config()
  config.phase = 'walkforward'
  config.walkforward = section(quick)
  config.finetune = finetune.section(quick)
  config.finetune.model_init = 'auto'   # workdir/pretrain when it exists, else from scratch
  config.finetune.rl_holdout = 0.3      # each fold's PPO trains on out-of-sample encoder outputs
  config.rl = rl.section(quick)
  if quick:
    base.apply_quick(config)
    config.rl.total_timesteps = 262_144   # 2 seeds x 32 updates of 64 envs x 128 steps per fold
  return config
