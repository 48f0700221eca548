"""The serving engine: `predict_fn` compiled ahead of time per batch bucket, so no request ever compiles.

- `ServingPredictor.predict(candles [B, N, 5])`: raw windows (prices in price units) -> points
  (`candles_in_points`, float64) -> the compiled `make_apply(meta)` for the smallest bucket that holds B (the
  rows are padded with copies of a real window; larger batches are split) -> `Decoder.finish`.
- `ServingPredictor.predict_recent(candles [N, 5])` (the server's /batch_predict series mode): the prediction
  /predict would give at every bar t >= R - 1, in compiled chunks of `series_chunk` consecutive windows that
  share one feature computation over R + chunk - 1 candles.

Both are compiled when the engine is built (default buckets 1, 8, 32, 128), lowering serially (tracing is
Python and bumps `trace_count`) and compiling in parallel threads (XLA compiles outside the GIL).
`exported=DIR` loads the window function from DIR/natron.jax (the `jax.export` serialisation written by the
export phase, natron.export) instead of tracing the feature graph, and, when DIR/executables holds a set
compiled on a machine like this one for this very program (natron.export.load_executables: same backend,
jaxlib, CPU features, compile options, parameters, code and shapes, and bit-identical outputs on a probe
input), loads every bucket and the series chunk already compiled: nothing is traced or compiled, start-up
takes seconds. Whatever cannot be loaded is compiled as without it, and the reason is logged
(`executables_skipped`); `info()['executables']` says which were loaded.
The micro-batching of concurrent requests onto these calls is natron.serve.app.MicroBatcher.
"""
from __future__ import annotations

import concurrent.futures
import glob
import hashlib
import json
import os
import time as time_lib
from typing import Optional, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from natron import predictor as predictor_lib
from natron.errors import UserError
from natron.predictor import TooFewCandles, candles_in_points

DEFAULT_BUCKETS = (1, 8, 32, 128)
DEFAULT_SERIES_CHUNK = 128
PROBE_SEED = 20261201
# The source the series-chunk program is traced from (the window programs come frozen in natron.jax): a
# loaded chunk executable must have been compiled from this code, else it is recompiled.
_CHUNK_CODE = ('natron/features', 'natron/model.py', 'natron/predictor.py', 'natron/dataset.py',
               'natron/serve/engine.py')


class ServingPredictor(predictor_lib.Predictor):
  """A Predictor plus the bucketed window path and the series-chunk path (module docstring)."""

  def __init__(self, params, meta, *, buckets: Sequence[int] = DEFAULT_BUCKETS, threshold: Optional[float] = None,
               series_batch: int = 128, series_chunk: int = DEFAULT_SERIES_CHUNK, exported=None,
               executables_dir: str = '', verify_executables: bool = True):
    super().__init__(params, meta, threshold=threshold, series_batch=series_batch)
    self.buckets = tuple(sorted({int(b) for b in buckets}))
    if not self.buckets or self.buckets[0] < 1:
      raise UserError(f'Batch buckets must be one or more positive integers, got {tuple(buckets)}.')
    self.series_chunk = int(series_chunk)
    self.exported = exported       # a jax.export.Exported of the window function, or None
    self.trace_count = 0           # Python side effect of tracing: grows only when something compiles
    self.executables_loaded: list[str] = []     # names loaded compiled from executables_dir
    self.executables_skipped: list[str] = []    # why the others were compiled here
    self._apply = predictor_lib.make_apply(meta)
    self.compile_seconds = self._compile(executables_dir, verify_executables)

  @classmethod
  def load(cls, path: str, *, buckets: Sequence[int] = DEFAULT_BUCKETS, threshold: Optional[float] = None,
           check_schema: bool = True, series_batch: int = 128, series_chunk: int = DEFAULT_SERIES_CHUNK,
           exported: str = '', executables: bool = True, verify_executables: bool = True) -> 'ServingPredictor':
    """Restores the bundle at `path` and compiles every bucket (and the series chunk unless 0).

    exported: '' traces predict_fn; else a directory with natron.jax + natron.json from the export phase of
    this same bundle (refused when its model version or feature schema differs); its compiled executables
    for this machine are loaded instead of compiling unless executables=False (module docstring).
    verify_executables: run each loaded executable once on the probe input and compare bit for bit.
    """
    params, meta, bundle = predictor_lib.load_bundle(path, check_schema=check_schema)
    program = None
    if exported:
      from natron import export as export_lib   # pylint: disable=g-import-not-at-top
      program = export_lib.load_jax_export(exported, meta)
    engine = cls(params, meta, buckets=buckets, threshold=threshold, series_batch=series_batch,
                 series_chunk=series_chunk, exported=program,
                 executables_dir=exported if (exported and executables) else '',
                 verify_executables=verify_executables)
    engine.bundle_dir = bundle
    return engine

  # --- Compilation --------------------------------------------------------------------------------------
  def _window_forward(self, params, candles):
    """candles float32 [B, R, 5] in points -> probabilities. Traced once per bucket."""
    self.trace_count += 1
    if self.exported is not None:
      return self.exported.call(candles)
    return self._apply(params, candles)

  def _chunk_forward(self, params, candles):
    """candles float32 [R + C - 1, 5] in points -> outputs for the C windows ending at rows R - 1 .. R + C - 2.

    Features are computed once over the chunk, so C consecutive bars cost about one window's features; every
    window still sees >= R candles of history, the /predict guarantee (parity to float32 rounding).
    """
    self.trace_count += 1
    x = predictor_lib.scale(predictor_lib.features_jax(candles), self._scaler).astype(jnp.float32)
    starts = jnp.arange(self.series_chunk) + (self.required_candles - self.window)
    windows = jax.vmap(lambda s: jax.lax.dynamic_slice_in_dim(x, s, self.window))(starts)   # [C, W, F]
    return predictor_lib.heads(self._model, params, windows)

  def _jobs_shapes(self) -> dict:
    """{name: input shape}: window_B [B, R, 5] per bucket, chunk_C [R + C - 1, 5] (module docstring)."""
    shapes = {f'window_{b}': (b, self.required_candles, 5) for b in self.buckets}
    if self.series_chunk > 0:
      shapes[f'chunk_{self.series_chunk}'] = (self.required_candles + self.series_chunk - 1, 5)
    return shapes

  def _jobs(self) -> dict:
    """{name: (jitted function, input spec)} of every program the engine runs."""
    return {name: (jax.jit(self._chunk_forward if name.startswith('chunk') else self._window_forward),
                   jax.ShapeDtypeStruct(shape, jnp.float32)) for name, shape in self._jobs_shapes().items()}

  def _compile(self, executables_dir: str = '', verify: bool = True) -> float:
    """Loads what executables_dir holds for this machine, compiles the rest; returns the wall seconds."""
    start = time_lib.perf_counter()
    jobs = self._jobs()
    executables = {}
    if executables_dir:
      if self.exported is None:
        raise UserError('Compiled executables are loaded only with the exported program they were made from.')
      from natron import export as export_lib   # pylint: disable=g-import-not-at-top
      executables, self.executables_skipped = export_lib.load_executables(
          executables_dir, self.program_key(), self._executable_specs(), self._in_tree(),
          self._probe if verify else None)
      self.executables_loaded = sorted(executables)
      if self.executables_skipped:
        logging.warning('natron serve: compiling %s instead of loading it from %s: %s',
                        sorted(set(jobs) - set(executables)), executables_dir, '; '.join(self.executables_skipped))
    lowered = {k: fn.lower(self._device_params, spec) for k, (fn, spec) in jobs.items() if k not in executables}
    if lowered:
      with concurrent.futures.ThreadPoolExecutor(max(1, min(len(lowered), os.cpu_count() or 1))) as pool:
        executables.update(zip(lowered, pool.map(lambda low: low.compile(), lowered.values())))
    self._executables = executables
    self._compiled = {b: executables[f'window_{b}'] for b in self.buckets}
    self._chunk = executables.get(f'chunk_{self.series_chunk}')
    return time_lib.perf_counter() - start

  # --- Compiled executables (natron.export) ---------------------------------------------------------------
  def _in_tree(self):
    return jax.tree.structure(((self._device_params, 0), {}))

  def program_key(self) -> dict:
    """What every compiled program depends on besides the machine: the natron.jax program, the parameters,
    the meta (scaler, config), required_candles (per program: `_executable_specs`)."""
    params = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(self.params):
      leaf = np.asarray(leaf)
      params.update(f'{jax.tree_util.keystr(path)}:{leaf.dtype}:{leaf.shape};'.encode())
      params.update(np.ascontiguousarray(leaf).tobytes())
    meta = json.dumps(self.meta, sort_keys=True, default=str).encode()
    exported = self.exported.mlir_module_serialized if self.exported is not None else b''
    return {'natron_jax': hashlib.sha256(exported).hexdigest(), 'params': params.hexdigest(),
            'meta': hashlib.sha256(meta).hexdigest(), 'required_candles': self.required_candles}

  def _executable_specs(self) -> dict:
    """{name: what that one program depends on}: its input shape, and for the chunk the code it is traced from."""
    return {name: {'shape': list(shape), 'code': _chunk_code_hash() if name.startswith('chunk') else ''}
            for name, shape in self._jobs_shapes().items()}

  def probe_input(self, name: str) -> np.ndarray:
    """A fixed, valid candles input (in points) of the shape of executable `name`: a seeded random walk."""
    shape = self._jobs_shapes()[name]
    rows = int(np.prod(shape[:-1]))
    rng = np.random.default_rng(PROBE_SEED)
    close = 100_000 + np.cumsum(rng.integers(-20, 21, rows))
    open_ = np.concatenate([[close[0]], close[:-1]])
    high = np.maximum(open_, close) + rng.integers(0, 10, rows)
    low = np.minimum(open_, close) - rng.integers(0, 10, rows)
    volume = rng.integers(1, 500, rows)
    return np.stack([open_, high, low, close, volume], -1).astype(np.float32).reshape(shape)

  def _probe(self, name: str, executable) -> str:
    """sha256 of `executable`'s outputs on probe_input(name): equal only for bit-identical outputs."""
    out = executable(self._device_params, self.probe_input(name))
    digest = hashlib.sha256()
    for key in sorted(out):
      value = np.asarray(out[key])
      digest.update(f'{key}:{value.dtype}:{value.shape};'.encode())
      digest.update(value.tobytes())
    return digest.hexdigest()

  def save_executables(self, directory: str) -> dict:
    """Writes this engine's compiled programs to directory/executables/<key id> (natron.export); returns the
    manifest. Compile the engine inside natron.export.fresh_compiles (the export phase does)."""
    if self.exported is None:
      raise UserError('Only an engine built from an exported program (exported=...) can save executables.')
    from natron import export as export_lib   # pylint: disable=g-import-not-at-top
    return export_lib.save_executables(directory, self.program_key(), self._executables,
                                       self._executable_specs(), self._probe)

  # --- Window path ----------------------------------------------------------------------------------------
  def _run_bucketed(self, candles: np.ndarray) -> dict:
    """candles float32 [B, R, 5] in points -> dict of numpy outputs [B, ...], in bucket-sized compiled calls."""
    largest = self.buckets[-1]
    parts = []
    for start in range(0, candles.shape[0], largest):
      chunk = candles[start:start + largest]
      n = chunk.shape[0]
      bucket = next(b for b in self.buckets if b >= n)
      if bucket > n:
        # Pad with copies of a real window: valid candles keep the padded rows finite and cheap.
        chunk = np.concatenate([chunk, np.broadcast_to(chunk[-1:], (bucket - n,) + chunk.shape[1:])])
      out = self._compiled[bucket](self._device_params, chunk)
      parts.append(jax.tree.map(lambda a, n=n: np.asarray(a)[:n], out))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def predict(self, candles, times=None, point: Optional[float] = None) -> dict:
    """Predictions for windows of raw candles.

    candles: float [B, N, 5] or [N, 5] (open, high, low, close, volume; oldest first; prices in price units on
      the quote grid: float64 keeps any grid exact, float32 only below ~2**22 points), N >= required_candles
      (only the last required_candles are used). times: optional [B] bar times of the last candles (any
      numpy/pandas datetime, or int64 ns). point: the price increment (None: inferred per window).
      Returns `finish(...)`'s dict of numpy arrays, one row per window.
    """
    candles = np.asarray(candles)
    if candles.ndim == 2:
      candles = candles[None]
    if candles.ndim != 3 or candles.shape[-1] != 5:
      raise UserError(f'Expected candles [batch, candles, 5] (open, high, low, close, volume), got shape '
                      f'{candles.shape}.')
    if candles.shape[1] < self.required_candles:
      raise TooFewCandles(
          f'{candles.shape[1]} candles per window is too few: this model needs {self.required_candles} '
          f'(window {self.window} + feature warm-up {self.warmup}).')
    if candles.shape[0] == 0:
      raise UserError('No windows to predict.')
    raw = self._run_bucketed(candles_in_points(candles[:, -self.required_candles:], point))
    return self.finish(raw, times=times)

  # --- Series-chunk path ----------------------------------------------------------------------------------
  def predict_recent(self, candles, times=None, point: Optional[float] = None) -> dict:
    """Predictions for every bar t >= R - 1 of one series of raw candles [N, 5] -> N - R + 1 rows.

    Row k is the prediction for bar R - 1 + k, from the R candles ending there (what /predict would return,
    to float32 rounding), computed in compiled chunks of `series_chunk` windows: no compile per request.
    times: optional [N] bar times (row k gets times[R - 1 + k]). point: as in `predict` (one per series).
    """
    if self._chunk is None:
      raise UserError('This engine was built with series_chunk=0; predict_recent is unavailable.')
    candles = np.asarray(candles)
    r, c = self.required_candles, self.series_chunk
    if candles.ndim != 2 or candles.shape[1] != 5:
      raise UserError(f'Expected one series of candles [N, 5], got shape {candles.shape}.')
    if len(candles) < r:
      raise TooFewCandles(f'{len(candles)} candles is too few: this model needs {r} (window {self.window} + '
                          f'feature warm-up {self.warmup}) for one prediction.')
    n_out = len(candles) - r + 1
    candles = candles_in_points(candles, point)
    parts = []
    for start in range(0, n_out, c):
      chunk = candles[start:start + r + c - 1]
      n = min(c, n_out - start)
      if len(chunk) < r + c - 1:   # pad at the END: features are causal, so real rows are unaffected
        chunk = np.concatenate([chunk, np.broadcast_to(chunk[-1:], (r + c - 1 - len(chunk), 5))])
      out = self._chunk(self._device_params, chunk)
      parts.append(jax.tree.map(lambda a, n=n: np.asarray(a)[:n], out))
    raw = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    if times is not None:
      times = predictor_lib.signals.as_ns(times)[r - 1:]
    return self.finish(raw, times=times)

  def info(self) -> dict:
    return dict(super().info(), batch_buckets=list(self.buckets),
                program='jax.export' if self.exported is not None else 'traced',
                executables=list(self.executables_loaded))


def _chunk_code_hash() -> str:
  """sha256 of the source files in _CHUNK_CODE (relative to the repository root), in order."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  digest = hashlib.sha256()
  for entry in _CHUNK_CODE:
    path = os.path.join(root, entry)
    files = sorted(glob.glob(os.path.join(path, '**', '*.py'), recursive=True)) if os.path.isdir(path) else [path]
    for file in files:
      digest.update(os.path.relpath(file, root).encode())
      with open(file, 'rb') as f:
        digest.update(f.read())
  return digest.hexdigest()
