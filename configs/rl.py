r"""Phase 3: PPO trading agent over the fine-tuned encoder's frozen embeddings (natron.rl.phase).

  python launch.py --config=configs/rl.py:quick --workdir=runs/demo     # after finetune in the same workdir

Reads workdir/finetune/bundle, embeds every bar once, trains PPO in the jitted gymnax environment on the
training span only (episodes never reach validation/test bars), checkpoints into workdir/rl/, and evaluates
the greedy policy on the test span against always-flat, buy-and-hold and random policies, costs included.
Costs (natron.backtest.resolve_costs, as in the backtest phase): commission rl.cost_bps (-1: backtest.cost_bps)
plus half the data's spread, or backtest.spread for data without one (else an error); the same spread enters
the reward and every evaluation, and workdir/rl/metrics.json (`cost_model`) states it.

Expected runtime on 2 shared CPU cores (quick, 20,000 synthetic bars, fine-tuned quick bundle): embedding the
series ~20-40 s, PPO (2 seeds x 1M env steps, in this process: too short to repay worker start-up) ~20 s;
evaluation a few seconds; full: PPO ~5M steps per seed (one seed: this process). Runs of >= 8M env steps over
>= 2 seeds train in one worker process per core (`rl.workers`): ~10-25 s of start-up (import, single-threaded
compile), then ~175k env steps/s on 2 cores against ~85k on one (experiments/bench_rl.py).
PPO trains on the bars the bundle's fine-tuning never saw labels of (finetune.rl_holdout, 0.3 in the
pipeline: out-of-sample observations); with a bundle fine-tuned on the whole training span it warns.
Data and split settings come from the bundle (config.data_from='bundle').
Expected result (configs/pipeline.py:quick, measured December 2026): on the synthetic market's test span
(2,856 bars) PPO returned +54.7% [95% CI +26.4, +86.8] net of costs vs the supervised signal +57.5%, the
momentum rule +58.1%, the linear signal +52.4%, always-flat 0%, buy-and-hold -6.8%: "no evidence of skill over
momentum"; numbers in workdir/rl/metrics.json and workdir/rl/test/{table.md, metrics.json}.
"""
import ml_collections

from configs import base


def section(quick: bool = False) -> ml_collections.ConfigDict:
  """The `config.rl` block."""
  rl = ml_collections.ConfigDict()
  # --- Environment (natron.rl.env): reward = position * next log return - costs - penalties.
  rl.episode_length = 256         # steps per training episode (time limit = truncation)
  rl.alpha = 0.0                  # turnover penalty per unit traded, on top of the real cost
  rl.beta = 0.1                   # penalty per unit increase of the episode's drawdown
  rl.reward_scale = -1.0          # -1: 1 / std of training-span log returns (unit-size rewards)
  rl.use_head_probs = True        # append buy/sell/direction/regime probabilities to the embedding
  rl.cost_bps = -1.0              # -1: config.backtest.cost_bps
  rl.symbol = ''                  # which symbol to trade ('' = the first; one symbol per run)
  # --- PPO (natron.rl.ppo), PureJaxRL defaults.
  rl.num_envs = 64
  rl.num_steps = 128              # env steps per env per update
  rl.total_timesteps = 5_000_000
  rl.update_epochs = 4
  rl.minibatch_size = 256
  rl.lr = 3e-4
  rl.anneal_lr = True
  rl.gamma = 0.99
  rl.gae_lambda = 0.95
  rl.clip_eps = 0.2
  rl.clip_value = True
  rl.vf_coef = 0.5
  rl.ent_coef = 0.01
  rl.max_grad_norm = 0.5
  rl.hidden = (64, 64)
  rl.activation = 'tanh'
  rl.num_seeds = 1                # agents trained side by side; the best on validation is kept
  # Where the seeds train (natron.rl.workers): 'auto' = on CPU one worker process per core (at most one per
  # seed), each pinned with one XLA thread, when that makes >= 2 workers and the run has >= 8M env steps
  # (AUTO_MIN_ENV_STEPS: shorter runs finish sooner without the workers' start-up); otherwise, and on a GPU,
  # this process (jax.vmap over seeds). An integer N: N CPU
  # worker processes (0: this process). With workers a seed's numbers do not depend on N; one agent does not
  # go faster on more cores, so set num_seeds to a multiple of the cores to use them all. Multi-host
  # (config.distributed): process p of P trains seeds p, p+P, ... and this setting applies to its share.
  rl.workers = 'auto'
  # --- Loop, checkpoints, evaluation.
  rl.log_every = 10               # updates between train_metrics.jsonl lines (and progress lines in this
                                  # process; worker processes log one progress line per chunk)
  rl.checkpoint_every = 100       # updates per jitted chunk; a checkpoint after each (resume point)
  rl.random_seeds = 20            # random-policy baselines averaged on the test span
  if quick:
    rl.episode_length = 128
    rl.num_envs = 64
    rl.total_timesteps = 1_048_576
    rl.log_every = 8
    rl.checkpoint_every = 32
    rl.num_seeds = 2
  return rl


def get_config(arg=None) -> ml_collections.ConfigDict:
  args = base.parse_arg(arg)
  config = base.get_base_config()
  config.phase = 'rl'
  config.rl = section(quick=args.quick)
  if args.quick:
    base.apply_quick(config)
  return config
