"""Multi-host training for real: two processes joined by jax.distributed on one machine (a local coordinator,
gloo CPU collectives over loopback) train pretrain + finetune and reach the metrics of one process with the
same global batch; then run features, rl (the seeds spread over the processes), backtest and inspect on copies
of the trained workdir and give the one-process PPO agents bit for bit; only process 0 writes files.

Each process is `launch.py` with --config.distributed=True and an explicit config.cluster (the command a cluster
runs on every host, with the coordinator given instead of detected), 1 CPU device each, so the 2-process mesh
has 2 devices and every global batch of 32 windows is two host shards of 16. The reference is the same command
in one process (1 device, the whole batch of 32). Tiny sizes: 2,000 synthetic bars, window 16, one layer of
d_model 16, pretrain 3 steps, finetune 2 epochs of ~20 steps (finetune initialised from that pretrain checkpoint,
so the multi-host restore path runs too). ~80 CPU-seconds with a cold compilation cache (about a minute on an
idle 2-core machine: the reference run, then the two processes side by side). The later phases (`later_runs`)
add ~45 s on 2 cores shared with another job (one process ~15 s, the two ~30 s: each starts a PPO worker).
"""
import json
import os
import shutil
import socket
import subprocess
import sys

import flax
import numpy as np
import pytest

from conftest import gamma32, model_path_terms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = '''
from configs import finetune, inspect, pretrain, rl

def get_config(arg=None):
  config = finetune.get_config('quick')
  config.phase = ''
  config.phases = ('pretrain', 'finetune')
  config.pretrain = pretrain.section(quick=True)
  config.data.synthetic_bars = 2000
  config.dataset.window = 16
  config.model.update(d_model=16, num_heads=2, num_layers=1, d_ff=32, head_hidden=16)
  config.pretrain.update(epochs=1, batch_size=32, max_steps_per_epoch=3, eval_max_batches=1, log_every=1,
                         projection_dim=16)
  config.finetune.update(epochs=2, batch_size=32, eval_batch_size=64, log_every=2, model_init='auto',
                         patience=0)
  config.baselines.linear_epochs = 1
  config.evaluation.bootstrap = 50
  if arg == 'later':   # the phases after training, on a copy of the trained workdir (tiny PPO: 3 seeds)
    config.phases = ('features', 'rl', 'backtest', 'inspect')
    config.rl = rl.section(quick=True)
    # One CPU worker per process: each seed runs alone in it, the same program whichever process trains it.
    config.rl.update(num_seeds=3, workers='1', num_envs=8, num_steps=32, minibatch_size=128, update_epochs=1,
                     total_timesteps=8 * 32 * 4, checkpoint_every=2, log_every=1, episode_length=32,
                     random_seeds=2)
    config.inspect = inspect.section()
    config.inspect.update(num_windows=1, per_head=False)
  return config
'''

# Runs launch.py as __main__ and records every file or directory this process creates or writes under the
# workdir (Python-level: open for writing, mkdir, rename/replace), for the "process 0 alone writes" check.
WORKER = '''
import json, os, runpy, sys
record, workdir = sys.argv[1], os.path.realpath(sys.argv[2])
writes = []
def hook(event, args):
  if event == 'open' and args[0] is not None and not isinstance(args[0], int):
    mode, flags = args[1], args[2]
    writing = (mode is not None and any(c in mode for c in 'wax+')) or (
        mode is None and flags is not None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
    if writing:
      writes.append(os.fsdecode(args[0]))
  elif event in ('os.mkdir', 'os.rename'):
    writes.append(os.fsdecode(args[0]))
sys.addaudithook(hook)
sys.argv = ['launch.py'] + sys.argv[3:]
sys.path[0] = os.getcwd()   # the repository root, as for `python launch.py`
try:
  runpy.run_path('launch.py', run_name='__main__')
finally:
  mine = sorted({os.path.realpath(p) for p in writes if os.path.realpath(p).startswith(workdir)})
  with open(record, 'w') as f:
    json.dump(mine, f)
'''


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def env():
  out = dict(os.environ, JAX_PLATFORMS='cpu', JAX_DISABLE_MOST_OPTIMIZATIONS='1', NATRON_KEEP_HOST_MEMORY='0')
  out.pop('XLA_FLAGS', None)   # one CPU device per process, whatever the caller set
  return out


def run_one_process(tmp, workdir, *args, record='writes_single.json'):
  """launch.py in one process (the reference) into `workdir`; returns the paths it wrote there."""
  proc = subprocess.run([sys.executable, str(tmp / 'worker.py'), str(tmp / record), str(workdir), *args,
                         f'--workdir={workdir}'], cwd=ROOT, env=env(), capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads((tmp / record).read_text())


def run_two_processes(tmp, workdir, *args, tag=''):
  """The same command as two jax.distributed processes into `workdir`; returns ([paths each wrote], [stderr])."""
  port = free_port()
  procs = [subprocess.Popen(
      [sys.executable, str(tmp / 'worker.py'), str(tmp / f'writes{tag}_{i}.json'), str(workdir), *args,
       f'--workdir={workdir}', '--config.distributed=True',
       f'--config.cluster.coordinator_address=127.0.0.1:{port}', '--config.cluster.num_processes=2',
       f'--config.cluster.process_id={i}'],
      cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=600))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for i, (p, (_, err)) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f'process {i}:\n{err[-4000:]}'
  assert 'process 1 of 2' in outs[1][1]
  return [json.loads((tmp / f'writes{tag}_{i}.json').read_text()) for i in range(2)], [err for _, err in outs]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """(single-process workdir, two-process workdir, [paths each process wrote])."""
  tmp = tmp_path_factory.mktemp('multihost')
  (tmp / 'tiny_config.py').write_text(CONFIG)
  (tmp / 'worker.py').write_text(WORKER)
  # The config imports configs.*: run from the repository root with it on the path.
  common = [f'--config={tmp / "tiny_config.py"}']
  single = tmp / 'single'
  run_one_process(tmp, single, *common)
  multi = tmp / 'multi'
  writes, _ = run_two_processes(tmp, multi, *common)
  return single, multi, writes


def metrics(workdir, phase):
  with open(workdir / phase / 'metrics.jsonl') as f:
    return [json.loads(line) for line in f]


# The tolerance. Both runs start from the same parameters and see the same global batches in the same order
# (the same dropout and masking noise too: random bits do not depend on the sharding); they differ only in how
# float32 sums are split: the two-process run reduces each loss and gradient over two shards of 16 and adds them
# in an all-reduce, the single process over 32 at once, and XLA may vectorise a batch of 16 differently from one
# of 32. Each sum of n terms is exact to Higham's gamma_n = n u / (1 - n u) relative to the sum of its magnitudes
# (u = 2^-24); along the model path to one logit that is n = conftest.model_path_terms = 281 roundings here,
# gamma ~ 1.7e-5 relative per evaluation. A loss is a mean of O(1) terms, so it inherits that bound; the
# parameters drift apart by ~S * lr * e after S steps (Adam normalises the gradient, so a relative gradient error
# e moves each update by ~e * lr; S <= 40, lr 1e-3), which moves the losses far less than e itself. rtol =
# 4 gamma_n = 6.7e-5 on every loss and norm (the runs measured <= 2.6e-7, a few ulps); a real fault (a wrong or
# duplicated shard, half a batch) changes which windows a loss averages, an O(1) relative change per window.
def loss_rtol():
  terms = model_path_terms(dict(d_model=16, d_ff=32, head_hidden=16, num_layers=1), window=16, num_features=137,
                           feature_terms=0)
  return 4 * gamma32(terms)


@pytest.mark.timeout(900)
def test_two_processes_train_to_the_metrics_of_one(runs):
  single, multi, _ = runs
  rtol = loss_rtol()
  assert rtol < 1e-4
  for phase in ('pretrain', 'finetune'):
    a, b = metrics(single, phase), metrics(multi, phase)
    assert [r['step'] for r in a] == [r['step'] for r in b] and len(a) >= 3
    for ra, rb in zip(a, b):
      for key in ra:
        if 'loss' in key or key.split('/')[-1] in ('reconstruction', 'contrastive', 'grad_norm', 'param_norm'):
          np.testing.assert_allclose(rb[key], ra[key], rtol=rtol, err_msg=f'{phase} step {ra["step"]} {key}')
  ra = json.loads((single / 'finetune' / 'report.json').read_text())
  rb = json.loads((multi / 'finetune' / 'report.json').read_text())
  assert ra['run']['best_step'] == rb['run']['best_step']
  for split in ('val', 'test'):
    np.testing.assert_allclose(rb[split]['loss'], ra[split]['loss'], rtol=rtol)
    for task in ('buy', 'sell', 'direction', 'regime'):
      # Predictions are argmaxes of logits equal to ~1e-5: a flip needs a near-tie; allow one window per task.
      n = ra[split][task]['n']
      assert rb[split][task]['n'] == n
      assert abs(rb[split][task]['accuracy'] - ra[split][task]['accuracy']) <= 1 / n + 1e-12, (split, task)


def test_only_process_zero_writes_and_the_outputs_match_one_process(runs):
  single, multi, (writes0, writes1) = runs
  # Process 1 wrote nothing of ours; Orbax (which needs every process in a multi-host save) is the only writer
  # it may contain, inside checkpoint and bundle parameter directories.
  ours = [p for p in writes1 if '/checkpoints' not in p and '/bundle/params' not in p]
  assert ours == [], ours
  assert any(p.endswith('finetune/report.json') for p in writes0)
  # Orbax names its data files by content hashes: compare the files outside Orbax's directories.
  files = lambda root: sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root)
                              for f in fs if not any(s in d for s in ('tensorboard', '/checkpoints', '/params')))
  assert files(multi) == files(single)
  for phase in ('pretrain', 'finetune'):   # one event file each: process 1 opened no TensorBoard writer
    assert len(os.listdir(multi / phase / 'tensorboard')) == 1
  assert len(metrics(multi, 'finetune')) == len(metrics(single, 'finetune'))   # no duplicated lines
  from natron import checkpoint  # pylint: disable=g-import-not-at-top
  params_a, meta_a = checkpoint.load_bundle(str(single / 'finetune' / 'bundle'))
  params_b, meta_b = checkpoint.load_bundle(str(multi / 'finetune' / 'bundle'))
  assert meta_a['step'] == meta_b['step'] and meta_a['scaler'] == meta_b['scaler']
  fa = flax.traverse_util.flatten_dict(params_a, sep='/')
  fb = flax.traverse_util.flatten_dict(params_b, sep='/')
  assert fa.keys() == fb.keys()
  for key in fa:
    np.testing.assert_allclose(fb[key], fa[key], rtol=loss_rtol(), atol=1e-5, err_msg=key)


# ==================================================================================== after training
# features, rl, backtest and inspect on two copies of the one-process trained workdir (the same bundle, so the
# same embeddings: any difference would come from the phases themselves). rl trains 3 seeds x 4 PPO updates in
# chunks of 2 (two checkpoints): process 0 trains seeds 0 and 2, process 1 seed 1 (uneven shares: the gather
# pads), each in one CPU worker (rl.workers=1) where every seed runs alone, so a seed's numbers cannot depend on
# which process trained it: the test asks for bit-identical agents, not a float32 bound. (Trained in-process,
# jax.vmap over seeds, a process vmaps over its share, not all seeds, and XLA may round a different vmap width
# differently: the same tiny run differed in the last bits from update 12 on; see README.)
@pytest.fixture(scope='module')
def later_runs(runs):
  """(one-process workdir, two-process workdir, [paths each process wrote], [stderr of each process])."""
  trained = runs[0]
  tmp = trained.parent
  args = [f'--config={tmp / "tiny_config.py"}:later']
  one, two = tmp / 'later_single', tmp / 'later_multi'
  for workdir in (one, two):
    shutil.copytree(trained, workdir)
  run_one_process(tmp, one, *args, record='writes_later_single.json')
  writes, errs = run_two_processes(tmp, two, *args, tag='_later')
  return one, two, writes, errs


TIMING = ('train_seconds', 'env_steps_per_s')   # wall-clock figures in rl/metrics.json


@pytest.mark.timeout(900)
def test_two_processes_train_the_rl_seeds_of_one_bit_for_bit(later_runs):
  one, two, _, errs = later_runs
  assert 'process 0 of 2 trains seeds [0, 2]' in errs[0] and 'process 1 of 2 trains seeds [1]' in errs[1]
  ra, rb = (json.loads((w / 'rl' / 'metrics.json').read_text()) for w in (one, two))
  assert (ra.pop('processes'), rb.pop('processes')) == (1, 2) and ra['num_seeds'] == 3 and ra['num_updates'] == 4
  assert {k: v for k, v in rb.items() if k not in TIMING} == {k: v for k, v in ra.items() if k not in TIMING}
  assert (two / 'rl' / 'train_metrics.jsonl').read_text() == (one / 'rl' / 'train_metrics.jsonl').read_text()
  from natron import checkpoint  # pylint: disable=g-import-not-at-top
  # The checkpoint holds every seed's whole runner state (params, optimizer, env state, RNG), gathered from
  # both processes: equal bit for bit, and the seeds are three different agents.
  state_a, meta_a, step_a = checkpoint.restore_numpy(str(one / 'rl' / 'checkpoints'))
  state_b, meta_b, step_b = checkpoint.restore_numpy(str(two / 'rl' / 'checkpoints'))
  assert step_a == step_b == 4 and meta_a == meta_b
  leaves_a, leaves_b = jax_leaves(state_a), jax_leaves(state_b)
  assert len(leaves_a) == len(leaves_b) > 10
  for x, y in zip(leaves_a, leaves_b):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(y, x)
  kernels = [x for x in leaves_a if x.ndim == 3 and x.dtype == np.float32]   # [seed, in, out] weights
  assert kernels and all(not np.array_equal(k[0], k[1]) and not np.array_equal(k[1], k[2]) for k in kernels)
  params_a, policy_a = checkpoint.load_bundle(str(one / 'rl' / 'policy'))
  params_b, policy_b = checkpoint.load_bundle(str(two / 'rl' / 'policy'))
  # The policy's meta names the bundle it was trained on: the same finetune/bundle, in each workdir.
  assert policy_a.pop('bundle') == str(one / 'finetune' / 'bundle')
  assert policy_b.pop('bundle') == str(two / 'finetune' / 'bundle')
  assert policy_b == policy_a
  for x, y in zip(jax_leaves(params_a), jax_leaves(params_b)):
    np.testing.assert_array_equal(y, x)
  npz_a, npz_b = (np.load(w / 'rl' / 'policy_test.npz', allow_pickle=True) for w in (one, two))
  for key in npz_a.files:
    np.testing.assert_array_equal(npz_b[key], npz_a[key], err_msg=key)
  for table in ('rl/test/metrics.json', 'backtest/SYNTH/metrics.json', 'backtest/settings.json'):
    assert json.loads((two / table).read_text()) == json.loads((one / table).read_text()), table


def jax_leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_after_training_only_process_zero_writes(later_runs):
  one, two, (writes0, writes1), _ = later_runs
  # Process 1 took part in the Orbax saves of the rl checkpoints and policy (every process must) and wrote no
  # file of ours.
  ours = [p for p in writes1 if '/rl/checkpoints' not in p and '/rl/policy/params' not in p]
  assert ours == [], ours
  for path in ('features/features_summary.json', 'rl/metrics.json', 'rl/train_metrics.jsonl',
               'backtest/settings.json', 'inspect/index.json', 'inspect/confusion_buy.png'):
    assert str(two / path) in writes0, path
  files = lambda root: sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root)
                              for f in fs if not any(s in d for s in ('tensorboard', '/checkpoints', '/params')))
  assert files(two) == files(one)
  ia, ib = (json.loads((w / 'inspect' / 'index.json').read_text()) for w in (one, two))
  assert (ib['files'], ib['windows'], ib['test']) == (ia['files'], ia['windows'], ia['test'])
  fa, fb = (np.load(w / 'features' / 'features.npz') for w in (one, two))
  for key in fa.files:
    np.testing.assert_array_equal(fb[key], fa[key], err_msg=key)
