r"""Export phase: the whole candles-to-probabilities function as ONNX (for MT5) and as `jax.export` StableHLO.

  python launch.py --config=configs/export.py --workdir=DIR          # reads DIR/finetune/bundle

writes DIR/export/:
- natron.onnx: `predict_fn(params, meta)` (natron.predictor: features -> scaler -> model -> softmax), made
  with jax2onnx. Input `candles` float32 [1, required_candles, 5], oldest bar first, columns open, high, low,
  close, volume, the four prices IN POINTS (MathRound(price / _Point) in double in the EA: exact integers,
  for any instrument whose prices stay below 2**24 points). Outputs, in this order: buy_prob [1],
  sell_prob [1], direction_probs [1, 3], regime_probs [1, 6] (class order in natron.json).
- natron.jax: `jax.export` serialisation of the same function with a symbolic batch size (prices in points
  too), which `natron.serve.engine.ServingPredictor.load(..., exported=DIR/export)` calls instead of
  tracing the feature graph.
- natron.json: the contract the EA and the server check (layout, outputs, label classes, thresholds, model
  version, feature-schema hash, sha256 of both files, opset, converter versions).
- executables/<key id>/: the serving engine's COMPILED programs (every batch bucket and the series chunk) for
  the machine the export ran on, so a server starts in seconds instead of compiling for minutes (see
  "Compiled executables" below).

Compiled executables: XLA:CPU code is compiled for the host's instruction set (an AVX-512 executable dies
with SIGILL on an AVX2-only CPU), its jaxlib, its XLA flags and jax's compile options, so each set is keyed
by `host_key()` (backend, jax/jaxlib versions, devices, the CPU's feature flags, XLA_FLAGS, the compile
options) plus the engine's program key (the natron.jax program, parameters, meta, the code of the series
path, the shapes). `load_executables` loads a set only when every key field matches (else says which field
differs) and then runs each executable on a fixed probe input, comparing the outputs bit for bit with what
the export recorded: a mismatch or an error falls back to compiling, never to a wrong answer. Run the export
on each kind of serving machine to add its set; they live side by side. The files are pickles: load only
export directories you made (jax.experimental.serialize_executable's warning).

Why points go in, not prices: the graph compares and differences price levels, which float32 holds exactly
only as grid integers (natron.data.grid). rint(price / point) computed INSIDE a float32 graph is exact only
while the float32 spacing of the price is under half a point (price / point below ~2**22), and rounds twice;
MQL5 computes MathRound(price / _Point) in double, exact for every real instrument, so the EA converts.
The features are scale-free, so the EA's _Point need not equal the grid the model was trained on.

Opset: ONNX_OPSET (14), the lowest jax2onnx emits for this graph (at 13 its Reshape carries the opset-14
'allowzero' attribute). MetaTrader 5's documentation points at ONNX Runtime 1.14's operator kernels
(https://www.mql5.com/en/docs/onnx/onnx_mql5), which run opsets up to 18; `check_operators` refuses a graph
with an operator outside ORT_1_14_CPU_OPS (every op below has a CPU float kernel in ORT 1.14 at opset 14).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import platform
import shutil
import tempfile
import time as time_lib
from typing import Callable, Mapping, Optional

from absl import logging
import jax
import jax.numpy as jnp
from natron import predictor as predictor_lib
from natron import signals
from natron.errors import UserError

EXPORT_FORMAT = 'natron-export-v1'
ONNX_OPSET = 14          # the lowest jax2onnx 0.17.1 emits for this graph (13 fails: Reshape 'allowzero')
INPUT_NAME = 'candles'
OUTPUTS = signals.PROBABILITIES          # ONNX output names, in order
ONNX_FILE, JAX_FILE, META_FILE = 'natron.onnx', 'natron.jax', 'natron.json'
EXECUTABLES_DIR, MANIFEST_FILE = 'executables', 'manifest.json'

# ai.onnx operators with float32 (and int64/bool where they index or mask) CPU kernels in ONNX Runtime 1.14 at
# opset 14 (docs/OperatorKernels.md of onnxruntime rel-1.14.0, the version MT5's documentation cites).
ORT_1_14_CPU_OPS = frozenset('''
Abs Add And ArgMax ArgMin Cast Ceil Clip Concat Constant ConstantOfShape Conv CumSum Div Einsum Equal Erf Exp
Expand Flatten
Floor Gather GatherElements GatherND Gemm Greater GreaterOrEqual Identity If IsInf IsNaN LayerNormalization
Less LessOrEqual Log Loop MatMul Max MaxPool Mean Min Mod Mul Neg Not Or Pad Pow Range Reciprocal ReduceL2
ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Round Scan
ScatterElements ScatterND Shape Sigmoid Sign Slice Softmax Split Sqrt Squeeze Sub Sum Tanh Tile TopK
Transpose Trilu Unsqueeze Where Xor
'''.split())


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def _tuple_fn(params, meta: Mapping):
  """predict_fn with its outputs as a tuple in OUTPUTS order (the exporters' positional outputs)."""
  fn = predictor_lib.predict_fn(params, meta)
  return lambda candles: tuple(fn(candles)[k] for k in OUTPUTS)


# ---------------------------------------------------------------------------------------------------------
# ONNX.
# ---------------------------------------------------------------------------------------------------------
# jax2onnx optimizer passes that scan the whole graph per candidate node (quadratic: minutes at ~15,000 nodes).
# They only tidy (ConvTranspose biases and Transpose chains the graph does not contain, no-op Casts); the graph
# is correct without them, which the parity tests check.
_SKIPPED_PASSES = frozenset({'fold_conv_transpose_constant_bias', 'remove_redundant_transpose_add_forests',
                             'remove_redundant_transpose_pairs', 'remove_redundant_casts',
                             'remove_redundant_casts_after_propagation'})


@contextlib.contextmanager
def _jax2onnx_speedups():
  """Two workarounds for jax2onnx 0.17.x (pinned in requirements-dev.txt) on a ~15,000-node graph.

  1. After lowering each equation it checks that the outputs are connected by scanning every node built so far:
     quadratic (over 10 minutes for the feature graph on 2 cores, 4 s without it). A value produced by a
     node, a graph input or an initializer is connected, so that is answered first; anything else still goes
     through jax2onnx's own check.
  2. The optimizer passes in _SKIPPED_PASSES are skipped. If a later jax2onnx renames these internals, the
     patches do not apply and the export is only slower.
  """
  from jax2onnx.converter import ir_optimizations, output_binding   # pylint: disable=g-import-not-at-top
  saved = {}
  check = getattr(output_binding, '_value_is_graph_connected', None)
  run_pass = getattr(ir_optimizations, '_run_top_level_optimizer_pass', None)
  if check is not None:
    def connected(ctx, value):
      if value.producer() is not None or value.is_graph_input() or value.is_initializer():
        return True
      return check(ctx, value)
    saved[(output_binding, '_value_is_graph_connected')] = check
    output_binding._value_is_graph_connected = connected   # pylint: disable=protected-access
  if run_pass is not None:
    def run(opt_pass, model):
      if getattr(opt_pass, 'name', None) not in _SKIPPED_PASSES:
        run_pass(opt_pass, model)
    saved[(ir_optimizations, '_run_top_level_optimizer_pass')] = run_pass
    ir_optimizations._run_top_level_optimizer_pass = run   # pylint: disable=protected-access
  try:
    yield
  finally:
    for (module, name), original in saved.items():
      setattr(module, name, original)


def to_onnx(params, meta: Mapping, *, opset: int = ONNX_OPSET):
  """The ONNX ModelProto of predict_fn for one window [1, required_candles, 5] (prices in points)."""
  try:
    import jax2onnx   # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError('The ONNX export needs jax2onnx: pip install -r requirements-dev.txt (it pins the version '
                    'the parity tests ran with).') from None
  spec = jax.ShapeDtypeStruct((1, int(meta['required_candles']), len(predictor_lib.COLUMNS)), jnp.float32)
  try:
    with _jax2onnx_speedups():
      model = jax2onnx.to_onnx(_tuple_fn(params, meta), [spec], model_name='natron', opset=int(opset),
                               input_names=[INPUT_NAME], output_names=list(OUTPUTS), return_mode='proto')
  finally:
    # jax2onnx traces with its own primitives patched into jax.numpy (e.g. 'jax.numpy.full'); jaxprs JAX cached
    # during that trace would poison later jits in this process (no XLA lowering rule for those primitives).
    jax.clear_caches()
  _clear_placeholder_dims(model)
  check_operators(model, opset)
  return model


def _graphs(graph):
  """The graph and every subgraph (Loop / Scan / If bodies), depth first."""
  yield graph
  for node in graph.node:
    for attr in node.attribute:
      if attr.g is not None and attr.g.node:
        yield from _graphs(attr.g)
      for sub in attr.graphs:
        yield from _graphs(sub)


def _clear_placeholder_dims(model) -> int:
  """Makes jax2onnx's placeholder dimension names unknown dimensions; returns how many it cleared.

  jax2onnx 0.17 declares the stacked outputs of every Loop (a lax.scan) with one shared dim_param,
  JAX2ONNX_DYNAMIC_DIM_SENTINEL. ONNX Runtime takes equal dim_params as equal sizes and reuses buffers
  between those outputs, which fails at run time when scans differ in length (e.g. 1016 vs 1001 steps:
  "Shape mismatch attempting to re-use buffer"). An unnamed dimension promises nothing.
  """
  cleared = 0
  for graph in _graphs(model.graph):
    for values in (graph.value_info, graph.output, graph.input):
      for value in values:
        for dim in value.type.tensor_type.shape.dim:
          if dim.HasField('dim_param') and dim.dim_param.startswith('JAX2ONNX_'):
            dim.ClearField('dim_param')
            cleared += 1
  return cleared


def operators(model) -> dict[str, int]:
  """{op_type: count} over the graph and every subgraph (Loop / Scan / If bodies)."""
  counts: dict[str, int] = {}
  for graph in _graphs(model.graph):
    for node in graph.node:
      key = node.op_type if node.domain in ('', 'ai.onnx') else f'{node.domain}.{node.op_type}'
      counts[key] = counts.get(key, 0) + 1
  return dict(sorted(counts.items()))


def check_operators(model, opset: int) -> None:
  """Refuses a graph MT5's ONNX Runtime (1.14) could not run: opset above 18 or an operator off the list."""
  stamped = {o.domain or 'ai.onnx': o.version for o in model.opset_import}
  if stamped.get('ai.onnx', 0) > 18 or int(opset) > 18:
    raise UserError(f'ONNX opset {stamped} is newer than ONNX Runtime 1.14 (MT5) runs (<= 18).')
  unknown = sorted(set(operators(model)) - ORT_1_14_CPU_OPS)
  if unknown:
    raise UserError(f'The ONNX graph uses operators outside the ONNX Runtime 1.14 CPU set that MT5 embeds: '
                    f'{unknown}. Write the feature that needs them in other primitives (natron.features).')


# ---------------------------------------------------------------------------------------------------------
# jax.export.
# ---------------------------------------------------------------------------------------------------------
def to_jax_export(params, meta: Mapping, *, platforms=None):
  """`jax.export.Exported` of predict_fn over candles float32 [b, required_candles, 5] (b symbolic)."""
  batch, = jax.export.symbolic_shape('b')
  spec = jax.ShapeDtypeStruct((batch, int(meta['required_candles']), len(predictor_lib.COLUMNS)), jnp.float32)
  fn = predictor_lib.predict_fn(params, meta)
  return jax.export.export(jax.jit(fn), platforms=platforms)(spec)


def read_meta(directory: str) -> dict:
  path = os.path.join(directory, META_FILE)
  if not os.path.exists(path):
    raise UserError(f'No {META_FILE} in {directory!r}: run the export phase first '
                    '(python launch.py --config=configs/export.py --workdir=DIR).')
  with open(path) as f:
    return json.load(f)


def load_jax_export_file(path: str):
  with open(path, 'rb') as f:
    return jax.export.deserialize(bytearray(f.read()))


def load_jax_export(directory: str, meta: Mapping):
  """The Exported in directory/natron.jax, after checking it was made from a bundle with this `meta`."""
  info = read_meta(directory)
  for key in ('model_version', 'feature_schema_hash', 'required_candles'):
    if str(info.get(key)) != str(meta.get(key)):
      raise UserError(f'{os.path.join(directory, META_FILE)} was exported from another model: {key} '
                      f'{info.get(key)!r} != the bundle\'s {meta.get(key)!r}. Re-run the export phase.')
  path = os.path.join(directory, JAX_FILE)
  if _sha256(path) != info['files'][JAX_FILE]['sha256']:
    raise UserError(f'{path} does not match the sha256 in {META_FILE}: a partial copy? Re-run the export.')
  exported = load_jax_export_file(path)
  backend = jax.default_backend()
  if backend not in exported.platforms:
    raise UserError(f'{path} was exported for {list(exported.platforms)}, not for this {backend!r} backend; '
                    f'export again with --config.platforms=cpu,{backend}.')
  return exported


# ---------------------------------------------------------------------------------------------------------
# Compiled executables (module docstring).
# ---------------------------------------------------------------------------------------------------------
# jax options that change the code XLA emits (compile options, not cache settings).
_COMPILE_OPTIONS = ('jax_disable_most_optimizations', 'jax_enable_x64', 'jax_default_matmul_precision',
                    'jax_exec_time_optimization_effort', 'jax_memory_fitting_effort', 'jax_optimization_level')


def _jax_option(name: str):
  try:
    value = jax.config.read(name)
  except AttributeError:       # options with a context manager are read as attributes
    value = getattr(jax.config, name, None)
  return value if isinstance(value, (bool, int, float, str, type(None))) else str(value)


def cpu_features() -> list[str]:
  """The CPU's instruction-set flags as the kernel reports them (/proc/cpuinfo), sorted.

  XLA:CPU compiles for the host's features; where they cannot be read, the host name stands in for them, so
  executables are then only reused on the machine that compiled them.
  """
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        name, _, value = line.partition(':')
        if name.strip() in ('flags', 'Features'):     # x86 / arm64
          return sorted(set(value.split()))
  except OSError:
    pass
  return [f'host:{platform.node()}']


def host_key() -> dict:
  """What an XLA executable compiled here depends on besides its program (module docstring)."""
  import jaxlib   # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  return {
      'backend': jax.default_backend(),
      'platform_version': str(devices[0].client.platform_version),
      'devices': [devices[0].device_kind, len(devices)],
      'jax': jax.__version__, 'jaxlib': jaxlib.__version__,
      'machine': platform.machine(),
      'cpu_features': cpu_features(),
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'compile_options': {name: _jax_option(name) for name in _COMPILE_OPTIONS},
  }


def _key_id(key: Mapping) -> str:
  return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _why_not(key: Mapping, other: Mapping) -> str:
  """The first key fields in which `other` (a stored set) differs from `key` (this process), in words."""
  reasons = []
  for part in ('host', 'program'):
    mine, theirs = key.get(part, {}), other.get(part, {})
    for field in sorted(set(mine) | set(theirs)):
      if mine.get(field) == theirs.get(field):
        continue
      if field == 'cpu_features':
        lacking = sorted(set(theirs.get(field) or ()) - set(mine.get(field) or ()))
        reasons.append(f'CPU features differ (this CPU lacks {lacking[:8] or "none"}'
                       f'{" ..." if len(lacking) > 8 else ""}; XLA:CPU code is compiled for its host)')
      else:
        reasons.append(f'{part} {field} differs ({str(theirs.get(field))[:60]!r} there, '
                       f'{str(mine.get(field))[:60]!r} here)')
  return '; '.join(reasons[:4]) or 'unknown difference'


@contextlib.contextmanager
def fresh_compiles():
  """Compiles without the persistent compilation cache, inside the block.

  An XLA:CPU executable that came out of the cache (jaxlib 0.10.2) re-serialises without its object code:
  loaded again it fails with "NOT_FOUND: Function ... not found". What we write must be compiled afresh.
  """
  from jax.experimental.compilation_cache import compilation_cache   # pylint: disable=g-import-not-at-top
  previous = _jax_option('jax_enable_compilation_cache')
  jax.config.update('jax_enable_compilation_cache', False)
  compilation_cache.reset_cache()       # jax decides once per process whether to use the cache
  try:
    yield
  finally:
    jax.config.update('jax_enable_compilation_cache', bool(previous))
    compilation_cache.reset_cache()


def save_executables(directory: str, program: Mapping, compiled: Mapping[str, 'jax.stages.Compiled'],
                     specs: Mapping[str, Mapping], probe: Callable[[str, 'jax.stages.Compiled'], str]) -> dict:
  """Writes directory/executables/<key id>/{NAME.xla, manifest.json}; returns the manifest.

  compiled: {name: jax.stages.Compiled} (compiled afresh: `fresh_compiles`); specs: {name: {field: value}}
  that a loader must match per executable (its input shape, the code it was traced from);
  probe(name, executable) -> a digest of its outputs on a fixed input. Every executable is deserialised
  again here and must give the probe outputs of the original bit for bit, else nothing is written.
  """
  from jax.experimental import serialize_executable   # pylint: disable=g-import-not-at-top
  key = {'host': host_key(), 'program': dict(program)}
  root = os.path.join(directory, EXECUTABLES_DIR)
  os.makedirs(root, exist_ok=True)
  target = os.path.join(root, _key_id(key))
  staging = tempfile.mkdtemp(dir=root, prefix='.partial-')
  files = {}
  try:
    for name, executable in sorted(compiled.items()):
      blob = pickle.dumps(serialize_executable.serialize(executable))
      digest = probe(name, executable)
      again = serialize_executable.deserialize_and_load(*pickle.loads(blob))
      if probe(name, again) != digest:
        raise UserError(f'The compiled {name} does not survive serialisation on this machine (jax '
                        f'{jax.__version__}); serve without executables (--config.executables=False).')
      path = os.path.join(staging, f'{name}.xla')
      with open(path, 'wb') as f:
        f.write(blob)
      files[name] = {'file': f'{name}.xla', 'spec': dict(specs[name]), 'sha256': _sha256(path),
                     'bytes': len(blob), 'probe_sha256': digest}
    manifest = {'key': key, 'key_id': _key_id(key), 'executables': files,
                'cpu_model': _cpu_model(), 'written': time_lib.strftime('%Y-%m-%dT%H:%M:%SZ', time_lib.gmtime())}
    with open(os.path.join(staging, MANIFEST_FILE), 'w') as f:
      json.dump(manifest, f, indent=2)
    shutil.rmtree(target, ignore_errors=True)
    os.chmod(staging, 0o755)        # mkdtemp's 0700 would hide it from the server's user
    os.replace(staging, target)     # readers see a whole set or none
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return manifest


def load_executables(directory: str, program: Mapping, wanted: Mapping[str, Mapping], in_tree,
                     probe: Optional[Callable[[str, 'jax.stages.Compiled'], str]] = None
                     ) -> tuple[dict, list[str]]:
  """({name: jax.stages.Compiled} of the `wanted` {name: spec} this machine can use, [reasons]).

  Loads from directory/executables/<key id> only when the host and program keys match exactly, each file's
  sha256 and spec (save_executables) match, and (unless probe is None) its probe outputs equal the recorded
  ones bit for bit. What is not loaded is named in the reasons (the caller compiles it).
  """
  from jax.experimental import serialize_executable   # pylint: disable=g-import-not-at-top
  key = {'host': host_key(), 'program': dict(program)}
  root = os.path.join(directory, EXECUTABLES_DIR)
  path = os.path.join(root, _key_id(key), MANIFEST_FILE)
  if not os.path.isfile(path):
    others = sorted(glob_manifests(root))
    if not others:
      return {}, [f'no compiled executables in {root} (the export phase writes them)']
    reasons = []
    for other in others[:3]:
      with open(other) as f:
        reasons.append(f'{os.path.basename(os.path.dirname(other))}: {_why_not(key, json.load(f)["key"])}')
    return {}, ['no executables for this machine and program: ' + ' | '.join(reasons)]
  with open(path) as f:
    manifest = json.load(f)
  if manifest.get('key') != key:   # a hash collision, or a hand-edited manifest
    return {}, [f'{path}: {_why_not(key, manifest.get("key", {}))}']
  loaded, reasons = {}, []
  for name, spec in wanted.items():
    entry = manifest['executables'].get(name)
    if entry is None:
      reasons.append(f'{name}: not among the exported executables {sorted(manifest["executables"])}')
      continue
    differs = sorted(k for k in set(spec) | set(entry['spec']) if entry['spec'].get(k) != spec.get(k))
    if differs:
      reasons.append(f'{name}: its {", ".join(differs)} differ{"s" if len(differs) == 1 else ""} from the '
                     f'exported one' + (' (the natron code it is traced from changed since the export)'
                                        if 'code' in differs else ''))
      continue
    file = os.path.join(os.path.dirname(path), entry['file'])
    try:
      with open(file, 'rb') as f:
        blob = f.read()
      if hashlib.sha256(blob).hexdigest() != entry['sha256']:
        reasons.append(f'{name}: {file} does not match its sha256 (a partial copy?)')
        continue
      serialized, stored_in_tree, out_tree = pickle.loads(blob)
      if stored_in_tree != in_tree:
        reasons.append(f'{name}: the parameter tree differs from the one it was compiled for')
        continue
      executable = serialize_executable.deserialize_and_load(serialized, stored_in_tree, out_tree)
      if probe is not None and probe(name, executable) != entry['probe_sha256']:
        reasons.append(f'{name}: its outputs on the probe input differ from the exported ones')
        continue
    except Exception as e:   # pylint: disable=broad-except  (any failure means: compile instead)
      reasons.append(f'{name}: {type(e).__name__}: {str(e)[:200]}')
      continue
    loaded[name] = executable
  return loaded, reasons


def glob_manifests(root: str) -> list[str]:
  if not os.path.isdir(root):
    return []
  return [os.path.join(root, d, MANIFEST_FILE) for d in os.listdir(root)
          if not d.startswith('.') and os.path.isfile(os.path.join(root, d, MANIFEST_FILE))]


def _cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.partition(':')[2].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------------------------
# The phase.
# ---------------------------------------------------------------------------------------------------------
def describe(predictor: predictor_lib.Predictor, *, opset: int) -> dict:
  """natron.json without the file hashes (see the module docstring)."""
  meta, r = predictor.meta, predictor.required_candles
  data = meta.get('config', {}).get('data', {})
  dims = {'buy_prob': [1], 'sell_prob': [1], 'direction_probs': [1, len(predictor.directions)],
          'regime_probs': [1, len(predictor.regimes)]}
  return {
      'format': EXPORT_FORMAT,
      'model_version': predictor.model_version,
      'feature_schema_hash': meta.get('feature_schema_hash'),
      'required_candles': r,
      'window': predictor.window,
      'warmup': predictor.warmup,
      # Scalars the EA reads with its one-key JSON extractor (mt5/NatronEA.mq5 OnnxInit) to set the shapes.
      'num_columns': len(predictor_lib.COLUMNS),
      'num_direction_classes': len(predictor.directions),
      'num_regime_classes': len(predictor.regimes),
      'input': {
          'name': INPUT_NAME, 'shape': [1, r, len(predictor_lib.COLUMNS)], 'dtype': 'float32',
          'columns': list(predictor_lib.COLUMNS),
          'order': 'oldest bar first; the last row is the last CLOSED bar',
          'prices': 'in points: round(price / point) computed in double (MQL5: MathRound(price / _Point)); '
                    'exact integers below 2**24. Any quote grid the prices lie on gives the same features '
                    '(they are scale-free), so the EA uses its symbol\'s _Point.',
          'volume': 'tick volume (or real volume if the training data had it), as a float',
          'training_point': data.get('point'),
      },
      'time': 'The model reads no clock. The HTTP API speaks UTC (mt5/README.md, Time convention); the ONNX '
              'engine needs no times: it runs on the bars the terminal has, once per newly closed bar.',
      'outputs': [{'name': k, 'shape': dims[k]} for k in OUTPUTS],
      'label_classes': {'direction': list(predictor.directions), 'regime': list(predictor.regimes)},
      'thresholds': {'signal': predictor.threshold},
      'signal_rule': signals.SIGNAL_RULE,
      'opset': int(opset),
      'onnx_runtime': 'MT5 documents ONNX Runtime 1.14 operator kernels (opsets <= 18); the graph uses only '
                      'operators with CPU kernels there (natron.export.ORT_1_14_CPU_OPS).',
  }


def run_phase(config, workdir: str) -> dict:
  """Writes workdir/export/{natron.onnx, natron.jax, natron.json, executables/} (or config.output_dir)."""
  start = time_lib.perf_counter()
  predictor = predictor_lib.Predictor.load(
      config.get('bundle') or workdir, threshold=predictor_lib.optional_threshold(config.get('threshold', -1.0)))
  out_dir = config.get('output_dir') or os.path.join(workdir, 'export')
  os.makedirs(out_dir, exist_ok=True)
  opset = int(config.get('opset', ONNX_OPSET))
  info = describe(predictor, opset=opset)
  files, seconds = {}, {}
  t = time_lib.perf_counter()
  platforms = [p for p in str(config.get('platforms', '') or '').split(',') if p] or None
  exported = to_jax_export(predictor.params, predictor.meta, platforms=platforms)
  with open(os.path.join(out_dir, JAX_FILE), 'wb') as f:
    f.write(exported.serialize())
  files[JAX_FILE] = {'platforms': list(exported.platforms), 'batch': 'symbolic (b >= 1)'}
  seconds['jax_export'] = round(time_lib.perf_counter() - t, 2)
  executables = None
  if config.get('executables', True):
    t = time_lib.perf_counter()
    executables = write_serving_executables(predictor, out_dir, config)
    seconds['executables'] = round(time_lib.perf_counter() - t, 2)
  if config.get('onnx', True):
    import onnx   # pylint: disable=g-import-not-at-top
    t = time_lib.perf_counter()
    model = to_onnx(predictor.params, predictor.meta, opset=opset)
    model.doc_string = f'Natron {predictor.model_version}: raw candles (in points) -> probabilities; see natron.json'
    onnx.save(model, os.path.join(out_dir, ONNX_FILE))
    files[ONNX_FILE] = {'operators': operators(model)}
    seconds['onnx'] = round(time_lib.perf_counter() - t, 2)
  for name, entry in files.items():
    path = os.path.join(out_dir, name)
    entry.update(sha256=_sha256(path), bytes=os.path.getsize(path))
  info['files'] = files
  info['versions'] = _versions()
  with open(os.path.join(out_dir, META_FILE), 'w') as f:
    json.dump(info, f, indent=2)
  summary = {'output_dir': os.path.abspath(out_dir), 'files': sorted(files) + [META_FILE], 'opset': opset,
             'seconds': seconds, 'total_seconds': round(time_lib.perf_counter() - start, 2),
             'model_version': predictor.model_version}
  if executables is not None:
    summary['executables'] = {'dir': os.path.join(EXECUTABLES_DIR, executables['key_id']),
                              'names': sorted(executables['executables']), 'cpu_model': executables['cpu_model']}
  logging.info('export: %s', summary)
  return summary


def write_serving_executables(predictor: predictor_lib.Predictor, out_dir: str, config) -> dict:
  """Compiles the serving engine from out_dir/natron.jax afresh, as `ServingPredictor.load(exported=out_dir)`
  will build it (config.buckets, config.series_chunk), and saves its executables; returns their manifest."""
  from natron.serve import engine as engine_lib   # pylint: disable=g-import-not-at-top
  program = load_jax_export_file(os.path.join(out_dir, JAX_FILE))   # what the server will call, byte for byte
  chunk = int(config.get('series_chunk', -1))
  with fresh_compiles():
    engine = engine_lib.ServingPredictor(
        predictor.params, predictor.meta, buckets=tuple(config.get('buckets', engine_lib.DEFAULT_BUCKETS)),
        series_chunk=engine_lib.DEFAULT_SERIES_CHUNK if chunk < 0 else chunk, exported=program,
        threshold=predictor.threshold)
  return engine.save_executables(out_dir)


def _versions() -> dict:
  from importlib import metadata   # pylint: disable=g-import-not-at-top
  out = {}
  for package in ('jax', 'jaxlib', 'flax', 'jax2onnx', 'onnx'):
    try:
      out[package] = metadata.version(package)
    except metadata.PackageNotFoundError:
      pass
  return out


def sha256_of(path: str) -> str:
  return _sha256(path)


__all__ = ['EXPORT_FORMAT', 'INPUT_NAME', 'ONNX_OPSET', 'OUTPUTS', 'check_operators', 'cpu_features',
           'describe', 'fresh_compiles', 'host_key', 'load_executables', 'load_jax_export', 'operators',
           'read_meta', 'run_phase', 'save_executables', 'to_jax_export', 'to_onnx']
