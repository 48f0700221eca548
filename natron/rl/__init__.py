"""Phase 3: a gymnax trading environment over frozen encoder embeddings and PPO in one `jax.jit`.

- `natron.rl.env`: `TradingEnv`, `EnvParams`, `EnvState`, `make_params` (the only module touching gymnax).
- `natron.rl.ppo`: `make_train` / `make_trainer`, `compute_gae`, `evaluate`, `ActorCritic`.
- `natron.rl.phase`: `run_phase(config, workdir)` (launch.py's `rl` phase), `load_policy`.
- `natron.rl.workers`: `SeedWorkers`, PPO seeds in worker processes, one per CPU core (`rl.workers`).
"""
from natron.rl.env import EnvParams, EnvState, TradingEnv, make_params
from natron.rl.ppo import ActorCritic, compute_gae, evaluate, make_train, make_trainer

__all__ = ['ActorCritic', 'EnvParams', 'EnvState', 'TradingEnv', 'compute_gae', 'evaluate', 'make_params',
           'make_train', 'make_trainer']
