r"""Training-step throughput and single-window latency of the Natron model, side by side with PyTorch.

  python experiments/bench_train.py                      # Natron f32 + bf16 vs PyTorch f32 + bf16, 1 and 2 cores
  python experiments/bench_train.py --cores=2 --scales=quick --rounds=5
  python experiments/bench_train.py --mode=separate --variants=hash,threefry,rbg    # the dropout study
  python experiments/bench_train.py --convergence        # quick config: bf16 reaches f32's val metrics

Side by side (default, `--mode=interleaved`): for each core count ONE process, pinned to those cores
(taskset) with XLA's and PyTorch's thread pools sized to match, builds every variant, then times them in
alternating rounds (`--rounds` x `--steps` train steps, then `--latency_calls` batch-1 forward passes), so
a load change on a shared machine hits every variant alike. Reported: median and best samples/s per
variant, p50/p99 inference latency, and the ratios Natron / PyTorch (each side's best mode) for training
and inference. Variants (`--variants`, comma-separated):
  hash        Natron, float32 (dropout from counter-based hash bits, natron.model.Dropout impl='hash')
  hash@bf16   Natron, model.dtype='bfloat16': bf16 inputs, f32 accumulation in every dot (natron.model)
  torch_f32   PyTorch eager, the same architecture, float32
  torch_bf16  PyTorch eager under torch.autocast('cpu', bfloat16) (oneDNN; AMX on CPUs that have it)
  threefry / rbg / hash_noattn / nodrop (each also @bf16): the dropout study (jax.random.bernoulli with
            threefry or 'rbg' keys; no dropout on attention weights; no dropout at all)
PyTorch is an optional benchmark dependency (never imported by natron): when `import torch` fails, the
torch variants are reported as skipped and the figures of shared/MEASUREMENTS.md are printed beside ours,
labelled as reference figures from another run. Install the CPU build (e.g. a local
torch-*+cpu wheel) into a separate directory and put it on PYTHONPATH.

Scales: seed (batch 128, window 96, 100 features, d_model 256, 6 layers, 8 heads, d_ff 1024, dropout 0.1)
and quick (configs/base.apply_quick: d_model 64, 2 layers, 4 heads, d_ff 128).

`--convergence`: runs the fine-tuning phase (configs/finetune.py:quick from scratch, `--convergence_epochs`)
once in float32 and once in bfloat16 with the same seed, and prints both runs' val/test metrics and their
differences (tests/test_model.py checks the same property on a tiny model in seconds).

Measured 2026-12-01 on a 2-vCPU Intel Xeon (KVM; AVX-512, AVX512_BF16, AMX), torch 2.13.0+cpu, jax 0.10.2,
seed scale, one interleaved process per core count at nice -15 (other jobs kept the load average at 3-5),
host memory kept (both frameworks), 5 rounds:
  1 core, train samples/s (median): Natron f32 21.6, bf16 40.9 | torch f32 28.5, bf16 autocast 52.7
    -> Natron bf16 / torch best 0.78x; batch-1 inference p50: Natron bf16 6.97 ms, f32 9.91 | torch f32
    10.8, bf16 11.2 -> 1.55x.
  2 cores: rounds swung 19-76 samples/s under the load (torch's OpenMP threads collapse when the cores are
    oversubscribed: 0.5 s inference p50 in some rounds); best rounds Natron bf16 75.6 vs torch bf16 71.5
    (1.06x); inference p50 Natron bf16 6.45 ms vs torch bf16 6.87 ms (1.07x).
Re-measured 2026-12-01 after the bf16 backward fix (natron.model: XLA:CPU had silently upcast to float32
every dense layer's backward product g @ kernel^T and several attention products, because their operand
copies reached it as transposed layouts; see `_materialized_transpose`), same machine, interleaved, 3
rounds, before = the previous model.py in an alternating process:
  1 core, two alternating pairs (load 1.2-3.3): Natron bf16 39.4 / 40.8 -> 51.6 / 51.2 samples/s vs torch
    bf16 54.8 / 53.1 -> 55.2 / 54.6 in the same processes: 0.72x / 0.77x -> 0.93x / 0.94x; batch-1
    inference p50 Natron bf16 6.3-6.9 -> 5.7-6.1 ms vs torch 8.8-9.8 ms (1.4-1.6x). At load ~5.5:
    38.2 -> 44.7 vs torch 47.2 / 52.6 (0.81x -> 0.85x).
  2 cores (load ~5): Natron bf16 48.7 -> 62.7 vs torch bf16 47.1 / 46.2 (1.04x -> 1.36x); inference p50
    7.0 -> 6.6 ms vs torch 7.7 / 7.2 ms.
  Where a 1-core bf16 step's time goes now (XLA profile): dense dots 29% (350-420 GFLOP/s at the model's
  shapes in isolation, as fast as a 1024^3 bf16 dot: the AMX/AVX512_BF16 path; float32: ~75), hash dropout
  17% (masks hashed in the forward and again in the backward; storing them instead measured no faster),
  attention softmax/transposes 14%, attention dots 11% (~40 GFLOP/s: 1024 matmuls of 96x32x96),
  operand copies 10%, LayerNorm 9%, GELU (erf) 6%, optimizer < 1%. XLA:CPU options of jaxlib 0.10.2
  (`--xla_cpu_experimental_onednn_custom_call`, `..._onednn_fusion_type`, `..._ynn_fusion_type` +ELTWISE /
  +REDUCE, `--xla_cpu_enable_fast_math`, `--xla_cpu_prefer_vector_width=512`) left the compiled step
  unchanged or were within the noise of alternating processes.
Re-measured 2026-12-01 after the second round (natron.model: narrower-operand weight-gradient transposes,
bias gradients from the rounded cotangent, stacked q/k/v cotangents, erf-form GELU, one-round dropout hash),
same machine, interleaved, 5 rounds, load 0.9-1.7:
  1 core: Natron bf16 58.4 samples/s vs torch bf16 54.4 (1.07x); f32 20.8 vs torch f32 28.4; batch-1
    inference p50 Natron bf16 6.69 ms vs torch bf16 10.9 / f32 11.3 ms (1.64x).
  2 cores: Natron bf16 103.3 vs torch bf16 72.9 (1.42x); f32 43.9 vs 46.4; inference p50 6.46 ms vs torch
    f32 6.57 ms (1.02x).
Without `keep_host_memory_mapped` (glibc defaults) a bf16 step at 1 core took 6.2 s instead of 3.3 s
(~670k page faults per step: YNNPACK's and XLA's buffers above 32 MB are mmap'd afresh on every call).
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'experiments'))
from machine import run_pinned  # pylint: disable=g-import-not-at-top,wrong-import-position

SCALES = {
    'seed': dict(d_model=256, num_heads=8, num_layers=6, d_ff=1024, head_hidden=128),
    'quick': dict(d_model=64, num_heads=4, num_layers=2, d_ff=128, head_hidden=64),
}
BATCH, WINDOW, FEATURES = 128, 96, 100
TASK_CLASSES = {'buy': 2, 'sell': 2, 'direction': 3, 'regime': 6}
DEFAULT_VARIANTS = 'hash,hash@bf16,torch_f32,torch_bf16'

# shared/MEASUREMENTS.md, Intel Xeon 2 vCPUs with AMX (torch 2.13.0+cpu), seed scale: printed when torch is
# missing, always labelled as figures from ANOTHER run.
TORCH_REFERENCE = {
    'source': 'shared/MEASUREMENTS.md (Intel Xeon AVX-512/AMX, torch 2.13.0+cpu), NOT this run',
    'seed': {'train_samples_per_sec': {'torch_f32': {'1': 15.2, '2': 21.1}, 'torch_bf16': {'1': 30.2, '2': 32.2}},
             'infer_b1_p50_ms': {'torch_f32': {'2': 9.8}, 'torch_bf16': {'2': 7.2}}},
}


def _batch(batch_size=BATCH):
  import numpy as np
  rng = np.random.default_rng(0)
  batch = {'x': rng.normal(size=(batch_size, WINDOW, FEATURES)).astype(np.float32),
           'weight': np.ones(batch_size, np.float32), 'mask': np.ones(batch_size, np.float32)}
  for task, n in TASK_CLASSES.items():
    batch[task] = rng.integers(0, n, batch_size).astype(np.int32)
  return batch


def _parse_variant(variant: str):
  base, _, precision = variant.partition('@')
  if precision not in ('', 'bf16'):
    raise ValueError(f'Unknown precision {precision!r} in variant {variant!r}; use NAME or NAME@bf16.')
  return base, 'bfloat16' if precision else 'float32'


# ============================================================================================== Natron
class NatronRun:
  """One Natron configuration: a compiled train step (state carried here) and a jitted batch-1 predict."""

  def __init__(self, scale: str, variant: str):
    import jax
    import jax.numpy as jnp
    import ml_collections
    from natron import losses
    from natron.model import NatronModel
    from natron.train import state as state_lib

    base, dtype = _parse_variant(variant)
    if base not in ('hash', 'threefry', 'rbg', 'hash_noattn', 'nodrop'):
      raise ValueError(f'Unknown Natron variant {variant!r}.')
    cfg = ml_collections.ConfigDict(dict(SCALES[scale], dropout=0.0 if base == 'nodrop' else 0.1,
                                         pooling='mean', pos_encoding='sinusoidal', dtype=dtype,
                                         param_dtype='float32',
                                         dropout_impl='jax' if base in ('threefry', 'rbg') else 'hash'))
    if base == 'hash_noattn':
      cfg.attention_dropout = 0.0
    batch = _batch()
    model = NatronModel(cfg)
    mesh = state_lib.make_mesh()
    opt = state_lib.make_optimizer(ml_collections.ConfigDict(dict(lr=1e-4, warmup_steps=10)), 1000)
    self.state = state_lib.init_state(lambda r, b: model.init(r, b['x'], train=False)['params'], opt, batch,
                                      jax.random.PRNGKey(0), mesh)

    def loss_fn(params, b, key):
      out = model.apply({'params': params}, b['x'], train=True, rngs={'dropout': key})
      return losses.multitask_loss(out, b, task_weights=dict(buy=1, sell=1, direction=1, regime=1), gamma=2.0)

    step = state_lib.make_train_step(loss_fn, opt, mesh)
    # 'rbg' passes a typed rbg key: jax.random.bernoulli inside the model then uses XLA's RngBitGenerator.
    self.key = jax.random.key(1, impl='rbg') if base == 'rbg' else jax.random.PRNGKey(1)
    self.sharded = state_lib.shard_batch(batch, mesh)
    t0 = time.perf_counter()
    self.step = step.lower(self.state, self.sharded, self.key).compile()
    self.compile_s = time.perf_counter() - t0
    self.params_count = sum(int(p.size) for p in jax.tree.leaves(self.state.params))
    self.predict = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))
    self.one = jnp.asarray(batch['x'][:1])
    self.loss = float('nan')
    self.train(1)                                        # warm-up: fresh buffers, first-call costs
    self.infer()

  def train(self, steps: int):
    import jax
    for _ in range(steps):
      self.state, metrics = self.step(self.state, self.sharded, self.key)
    jax.block_until_ready(metrics)
    self.loss = float(metrics['loss'])

  def infer(self):
    import jax
    jax.block_until_ready(self.predict(self.state.params, self.one))


# ============================================================================================= PyTorch
def _torch_model(scale: str, dropout: float = 0.1):
  """The Natron architecture in PyTorch: Dense embed + sinusoidal positions, pre-LN blocks (fused qkv,
  softmax attention with dropout on the weights, exact-GELU FFN), final LN, mean pooling, four MLP heads."""
  import math
  import torch
  from torch import nn
  import torch.nn.functional as F
  s = SCALES[scale]
  d, heads, d_ff = s['d_model'], s['num_heads'], s['d_ff']

  class Block(nn.Module):

    def __init__(self):
      super().__init__()
      self.ln_attn, self.ln_ff = nn.LayerNorm(d), nn.LayerNorm(d)
      self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
      self.ff_in, self.ff_out = nn.Linear(d, d_ff), nn.Linear(d_ff, d)

    def forward(self, x):
      b, w, _ = x.shape
      q, k, v = self.qkv(self.ln_attn(x)).view(b, w, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
      weights = torch.softmax((q * (d // heads) ** -0.5) @ k.transpose(-2, -1), dim=-1)
      h = F.dropout(weights, dropout, self.training) @ v
      h = self.out(h.transpose(1, 2).reshape(b, w, d))
      x = x + F.dropout(h, dropout, self.training)
      h = F.dropout(F.gelu(self.ff_in(self.ln_ff(x))), dropout, self.training)
      return x + F.dropout(self.ff_out(h), dropout, self.training)

  class Model(nn.Module):

    def __init__(self):
      super().__init__()
      self.embed = nn.Linear(FEATURES, d)
      pos = torch.arange(WINDOW, dtype=torch.float64)[:, None]
      div = torch.exp(torch.arange(0, d, 2, dtype=torch.float64) * (-math.log(10000.0) / d))
      table = torch.zeros(WINDOW, d, dtype=torch.float64)
      table[:, 0::2], table[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
      self.register_buffer('pos', table.float())
      self.blocks = nn.ModuleList(Block() for _ in range(s['num_layers']))
      self.ln = nn.LayerNorm(d)
      self.heads = nn.ModuleDict({t: nn.Sequential(nn.Linear(d, s['head_hidden']), nn.GELU(), nn.Dropout(dropout),
                                                   nn.Linear(s['head_hidden'], n))
                                  for t, n in TASK_CLASSES.items()})

    def forward(self, x):
      h = F.dropout(self.embed(x) + self.pos, dropout, self.training)
      for block in self.blocks:
        h = block(h)
      encoded = self.ln(h).mean(dim=1)
      return {t: head(encoded) for t, head in self.heads.items()}

  return Model()


class TorchRun:
  """PyTorch eager train step (AdamW + grad clipping, focal loss gamma 2 on the four heads) and predict."""

  def __init__(self, scale: str, variant: str, threads: int):
    import torch
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    self.torch = torch
    self.bf16 = variant == 'torch_bf16'
    self.model = _torch_model(scale)
    self.params_count = sum(p.numel() for p in self.model.parameters())
    decay = [p for p in self.model.parameters() if p.ndim > 1]
    rest = [p for p in self.model.parameters() if p.ndim <= 1]
    self.opt = torch.optim.AdamW([{'params': decay, 'weight_decay': 0.01}, {'params': rest, 'weight_decay': 0.0}],
                                 lr=1e-4)
    batch = _batch()
    self.batch = {k: torch.from_numpy(v) for k, v in batch.items()}
    for task in TASK_CLASSES:
      self.batch[task] = self.batch[task].long()
    self.one = self.batch['x'][:1].clone()
    self.compile_s = 0.0
    self.loss = float('nan')
    self.train(1)
    self.infer()

  def _autocast(self):
    import contextlib
    return (self.torch.autocast('cpu', dtype=self.torch.bfloat16) if self.bf16 else contextlib.nullcontext())

  def train(self, steps: int):
    torch = self.torch
    self.model.train()
    for _ in range(steps):
      with self._autocast():
        out = self.model(self.batch['x'])
      loss = 0.0
      for task in TASK_CLASSES:
        log_p = torch.log_softmax(out[task].float(), dim=-1)
        log_pt = log_p.gather(1, self.batch[task][:, None])[:, 0]
        loss = loss + (-(1 - log_pt.exp()) ** 2 * log_pt).mean()
      self.opt.zero_grad(set_to_none=True)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
      self.opt.step()
    self.loss = float(loss)

  def infer(self):
    self.model.eval()
    with self.torch.inference_mode(), self._autocast():
      out = self.model(self.one)
    float(out['buy'][0, 0])


# ============================================================================================ measuring
def _pct(values, q):
  import numpy as np
  return round(float(np.percentile(values, q)) * 1e3, 2)


def measure_interleaved(scale: str, variants: list, steps: int, rounds: int, latency_calls: int,
                        threads: int) -> dict:
  """Every variant built in THIS process, then timed in alternating rounds (see the module docstring)."""
  import numpy as np
  runs, skipped = {}, {}
  for variant in variants:
    if variant.startswith('torch'):
      try:
        import torch  # pylint: disable=unused-import,import-outside-toplevel
      except ImportError as e:
        skipped[variant] = f'torch not installed ({e})'
        continue
      runs[variant] = TorchRun(scale, variant, threads)
    else:
      runs[variant] = NatronRun(scale, variant)
  rates = {v: [] for v in runs}
  latency = {v: [] for v in runs}
  for _ in range(rounds):
    for variant, run in runs.items():
      t0 = time.perf_counter()
      run.train(steps)
      rates[variant].append(BATCH * steps / (time.perf_counter() - t0))
    for variant, run in runs.items():
      for _ in range(latency_calls):
        t0 = time.perf_counter()
        run.infer()
        latency[variant].append(time.perf_counter() - t0)
  result = {'scale': scale, 'mode': 'interleaved', 'rounds': rounds, 'steps_per_round': steps,
            'batch': BATCH, 'variants': {}, 'skipped': skipped}
  for variant, run in runs.items():
    result['variants'][variant] = {
        'samples_per_sec_median': round(float(np.median(rates[variant])), 2),
        'samples_per_sec_best': round(max(rates[variant]), 2),
        'samples_per_sec_all': [round(r, 2) for r in rates[variant]],
        'infer_b1_p50_ms': _pct(latency[variant], 50), 'infer_b1_p99_ms': _pct(latency[variant], 99),
        'compile_sec': round(run.compile_s, 1), 'params': run.params_count, 'loss': round(run.loss, 4)}
  result['ratios'] = _ratios(result['variants'])
  result['peak_rss_mb'] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
  return result


def _ratios(variants: dict) -> dict:
  """Natron's best mode over PyTorch's best mode (training: samples/s; inference: p50 latency)."""
  ours = {v: r for v, r in variants.items() if not v.startswith('torch')}
  theirs = {v: r for v, r in variants.items() if v.startswith('torch')}
  if not ours or not theirs:
    return {}
  out = {}
  for key in ('samples_per_sec_median', 'samples_per_sec_best'):
    a = max(ours, key=lambda v: ours[v][key])
    b = max(theirs, key=lambda v: theirs[v][key])
    out[f'train_{key}'] = {'natron': a, 'torch': b, 'ratio': round(ours[a][key] / theirs[b][key], 2)}
  a = min(ours, key=lambda v: ours[v]['infer_b1_p50_ms'])
  b = min(theirs, key=lambda v: theirs[v]['infer_b1_p50_ms'])
  out['infer_b1_p50'] = {'natron': a, 'torch': b,
                         'ratio': round(theirs[b]['infer_b1_p50_ms'] / ours[a]['infer_b1_p50_ms'], 2),
                         'note': 'torch latency / ours: > 1 means Natron is faster'}
  for v in ours:
    for t in theirs:
      out[f'{v}_vs_{t}'] = {'train': round(ours[v]['samples_per_sec_median'] / theirs[t]['samples_per_sec_median'], 2),
                            'infer': round(theirs[t]['infer_b1_p50_ms'] / ours[v]['infer_b1_p50_ms'], 2)}
  return out


def measure_separate(scale: str, variant: str, steps: int, latency_calls: int, threads: int) -> dict:
  """One configuration in this process (peak RSS and compile time are then its own)."""
  import numpy as np
  run = TorchRun(scale, variant, threads) if variant.startswith('torch') else NatronRun(scale, variant)
  t0 = time.perf_counter()
  run.train(steps)
  step_s = (time.perf_counter() - t0) / steps
  times = []
  for _ in range(latency_calls):
    t = time.perf_counter()
    run.infer()
    times.append(time.perf_counter() - t)
  return {'scale': scale, 'variant': variant, 'params': run.params_count, 'batch': BATCH,
          'samples_per_sec': round(BATCH / step_s, 2), 'step_sec': round(step_s, 3),
          'compile_sec': round(run.compile_s, 1), 'loss': round(run.loss, 4),
          'peak_rss_mb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
          'infer_b1_p50_ms': _pct(times, 50), 'infer_b1_p99_ms': _pct(times, 99)}


def run_child(cores: int, payload: dict) -> dict:
  result, error = run_pinned(__file__, cores, dict(payload, threads=cores))
  return dict(payload, cores=cores, error=error) if result is None else dict(result, cores=cores)


def child(payload: dict) -> dict:
  if payload.get('host_memory', 'keep') == 'keep':
    # Before anything allocates: applies to Natron and PyTorch in this process alike.
    sys.path.insert(0, ROOT)
    from natron.train import state as state_lib  # pylint: disable=import-outside-toplevel
    state_lib.keep_host_memory_mapped()
  if payload['mode'] == 'interleaved':
    return measure_interleaved(payload['scale'], payload['variants'], payload['steps'], payload['rounds'],
                               payload['latency_calls'], payload['threads'])
  return measure_separate(payload['scale'], payload['variant'], payload['steps'], payload['latency_calls'],
                          payload['threads'])


# ========================================================================================== convergence
def convergence(epochs: int) -> dict:
  """configs/finetune.py:quick from scratch in float32 and in bfloat16 (same seed): val/test metrics."""
  sys.path.insert(0, ROOT)
  from configs import finetune as finetune_config  # pylint: disable=import-outside-toplevel
  from natron.train import finetune  # pylint: disable=import-outside-toplevel
  runs = {}
  for dtype in ('float32', 'bfloat16'):
    config = finetune_config.get_config('quick')
    config.finetune.model_init = ''
    config.finetune.epochs = epochs
    config.model.dtype = dtype
    with tempfile.TemporaryDirectory() as workdir:
      t0 = time.perf_counter()
      finetune.run_phase(config, workdir)
      seconds = time.perf_counter() - t0
      with open(os.path.join(workdir, 'finetune', 'report.json')) as f:
        report = json.load(f)
    runs[dtype] = {'seconds': round(seconds, 1)}
    for split in ('val', 'test'):
      for task in TASK_CLASSES:
        m = report[split][task]
        runs[dtype][f'{split}_{task}_accuracy'] = round(m['accuracy'], 4)
        runs[dtype][f'{split}_{task}_macro_f1'] = round(m['macro_f1'], 4)
  diff = {k: round(runs['bfloat16'][k] - runs['float32'][k], 4) for k in runs['float32'] if k != 'seconds'}
  return {'config': 'configs/finetune.py:quick, model_init=""', 'epochs': epochs, 'runs': runs,
          'bf16_minus_f32': diff, 'max_abs_difference': max(abs(v) for v in diff.values())}


def _machine() -> dict:
  info = {}
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        key, _, value = line.partition(':')
        info.setdefault(key.strip(), value.strip())
  except OSError:
    pass
  flags = f" {info.get('flags', '')} "
  return {'node': platform.node(), 'cpu_model': info.get('model name', platform.processor()),
          'isa': [x for x in ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16') if f' {x} ' in flags],
          'cpu_count': os.cpu_count(), 'load_avg_at_start': [round(x, 2) for x in os.getloadavg()]}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--cores', default='1,2')
  parser.add_argument('--scales', default='seed')
  parser.add_argument('--variants', default=DEFAULT_VARIANTS)
  parser.add_argument('--mode', choices=('interleaved', 'separate'), default='interleaved')
  parser.add_argument('--steps', type=int, default=2, help='train steps per round at seed scale (x10 at quick)')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--latency_calls', type=int, default=50, help='batch-1 forward passes per round')
  parser.add_argument('--host_memory', choices=('keep', 'default'), default='keep',
                      help="'keep': natron.train.state.keep_host_memory_mapped() in each measuring process "
                      "(both frameworks); 'default': glibc's defaults")
  parser.add_argument('--convergence', action='store_true', help='f32 vs bf16 fine-tuning on the quick config')
  parser.add_argument('--convergence_epochs', type=int, default=2)
  parser.add_argument('--child', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(child(json.loads(args.child))))
    return
  machine = _machine()
  if args.convergence:
    print(json.dumps({'machine': machine, 'convergence': convergence(args.convergence_epochs)}, indent=1))
    return
  variants = args.variants.split(',')
  results = []
  for cores in [int(c) for c in args.cores.split(',')]:
    for scale in args.scales.split(','):
      steps = args.steps * (10 if scale == 'quick' else 1)
      if args.mode == 'interleaved':
        payloads = [dict(mode='interleaved', scale=scale, variants=variants, steps=steps, rounds=args.rounds,
                         latency_calls=args.latency_calls, host_memory=args.host_memory)]
      else:
        payloads = [dict(mode='separate', scale=scale, variant=v, steps=steps * args.rounds,
                         latency_calls=args.latency_calls * args.rounds, host_memory=args.host_memory)
                    for v in variants]
      for payload in payloads:
        result = run_child(cores, payload)
        print(json.dumps(result), file=sys.stderr, flush=True)
        results.append(result)
  machine['load_avg_at_end'] = [round(x, 2) for x in os.getloadavg()]
  out = {'machine': machine, 'results': results}
  if any(r.get('skipped') for r in results):
    out['torch_reference_not_this_run'] = TORCH_REFERENCE
  print(json.dumps(out, indent=1))


if __name__ == '__main__':
  main()
