"""The phase registry: name -> module exposing `run_phase(config, workdir) -> dict`.

Shared by launch.py and natron.walkforward (which runs phases per fold and cannot import launch.py, whose
absl flags may be defined only once).
"""
PHASES = {
    'features': 'natron.features.phase',
    'dataset': 'natron.dataset',
    'pretrain': 'natron.train.pretrain',
    'finetune': 'natron.train.finetune',
    'inspect': 'natron.train.inspect',
    'rl': 'natron.rl.phase',
    'backtest': 'natron.backtest',
    'infer': 'natron.infer',
    'export': 'natron.export',
    'serve': 'natron.serve.app',
    'walkforward': 'natron.walkforward',
    'seeds': 'natron.seeds',
    'report': 'natron.report',
}
