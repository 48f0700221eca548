"""Server start-up from compiled executables (natron.export "Compiled executables", natron.serve.engine).

The export phase writes every serving bucket and the series chunk compiled for this machine; a server
started with exported=DIR loads them and compiles nothing. These tests check that:
- the loaded engine traces and compiles nothing, and its predictions (window buckets, padding, splitting, and
  the series chunk) equal bit for bit those of an engine compiled here from the same natron.jax;
- a set made for another machine (other CPU features, another jaxlib or compile options), for another model
  or code, a damaged file, or an executable whose probe outputs differ is never loaded: the reason is named
  and the engine compiles instead (the same predictions).
The tiny test bundle (tests/test_predictor.py), one bucket (4) and an 8-window series chunk: the export
compiles two programs afresh; everything else is loaded, checked without compiling, or hits the cache.
"""
import functools
import json
import os
import shutil
import tempfile

import numpy as np
import pytest

from natron import export as export_lib
from natron.serve import engine as engine_lib
from natron.serve.engine import ServingPredictor
from natron.predictor import COLUMNS
from test_predictor import BUCKETS, SERIES_CHUNK, bundle_dir, market

NAMES = sorted([f'window_{b}' for b in BUCKETS] + [f'chunk_{SERIES_CHUNK}'])


@functools.lru_cache(maxsize=None)
def export_dir() -> str:
  """The export phase (no ONNX) of the tiny bundle with the test buckets, into a fresh directory."""
  from configs import export as export_config   # pylint: disable=g-import-not-at-top
  config = export_config.get_config()
  config.bundle, config.onnx = bundle_dir(), False
  config.buckets, config.series_chunk = BUCKETS, SERIES_CHUNK
  config.output_dir = tempfile.mkdtemp(prefix='natron-executables-')
  summary = export_lib.run_phase(config, config.output_dir)
  assert summary['executables']['names'] == NAMES
  return config.output_dir


@pytest.fixture(scope='module')
def loaded():
  return ServingPredictor.load(bundle_dir(), buckets=BUCKETS, series_chunk=SERIES_CHUNK, exported=export_dir())


@pytest.fixture(scope='module')
def compiled():
  """The same engine compiled here from the same natron.jax (the executables ignored)."""
  return ServingPredictor.load(bundle_dir(), buckets=BUCKETS, series_chunk=SERIES_CHUNK, exported=export_dir(),
                               executables=False)


def _copy(tmp_path) -> tuple[str, str]:
  """A copy of the export directory, and the path of its (only) executables set."""
  target = str(tmp_path / 'export')
  shutil.copytree(export_dir(), target)
  sets = export_lib.glob_manifests(os.path.join(target, export_lib.EXECUTABLES_DIR))
  assert len(sets) == 1
  return target, os.path.dirname(sets[0])


def _load(engine, directory):
  """What the engine's loader would load from `directory`, and why not the rest (nothing is compiled)."""
  # pylint: disable=protected-access
  return export_lib.load_executables(directory, engine.program_key(), engine._executable_specs(),
                                     engine._in_tree(), engine._probe)


def test_loaded_engine_compiles_nothing(loaded):
  assert loaded.executables_loaded == NAMES and loaded.executables_skipped == []
  assert loaded.trace_count == 0                       # nothing traced, so nothing compiled
  assert loaded.info()['executables'] == NAMES and loaded.info()['program'] == 'jax.export'
  assert loaded.buckets == BUCKETS and loaded.series_chunk == SERIES_CHUNK


def test_manifest_keys_on_machine_and_program(loaded):
  manifest_path, = export_lib.glob_manifests(os.path.join(export_dir(), export_lib.EXECUTABLES_DIR))
  with open(manifest_path) as f:
    manifest = json.load(f)
  host = manifest['key']['host']
  assert host == export_lib.host_key() and host['cpu_features'] == export_lib.cpu_features()
  assert {'backend', 'jaxlib', 'cpu_features', 'xla_flags', 'compile_options'} <= set(host)
  assert set(manifest['key']['program']) == {'natron_jax', 'params', 'meta', 'required_candles'}
  assert manifest['executables'][f'chunk_{SERIES_CHUNK}']['spec']['code']       # the chunk is traced code
  assert manifest['executables'][f'window_{BUCKETS[0]}']['spec'] == {
      'shape': [BUCKETS[0], loaded.required_candles, 5], 'code': ''}    # its program is natron.jax


def test_loaded_predictions_equal_compiled_ones_bit_for_bit(loaded, compiled):
  assert compiled.executables_loaded == [] and compiled.trace_count == len(NAMES)
  candles = market()[list(COLUMNS)].to_numpy(np.float64)
  r = loaded.required_candles
  ends = np.linspace(r, len(candles), 11).astype(int)
  windows = np.stack([candles[e - r:e] for e in ends])
  for n in (1, 3, 4, 11):                   # padded to the bucket, exactly one bucket, split over buckets
    got, want = loaded.predict(windows[:n], point=1e-5), compiled.predict(windows[:n], point=1e-5)
    for key in export_lib.OUTPUTS:
      np.testing.assert_array_equal(got[key], want[key], err_msg=f'{n} windows {key}')
    assert list(got['signal']) == list(want['signal'])
  got = loaded.predict_recent(candles[:r + 2 * SERIES_CHUNK + 3], point=1e-5)
  want = compiled.predict_recent(candles[:r + 2 * SERIES_CHUNK + 3], point=1e-5)
  for key in export_lib.OUTPUTS:
    np.testing.assert_array_equal(got[key], want[key], err_msg=f'series {key}')
  assert loaded.trace_count == 0


def test_another_cpu_is_refused_by_its_features(loaded, monkeypatch):
  """AVX-512 code must never run on an AVX2-only CPU (SIGILL): a set made where the flags differ is skipped."""
  here = export_lib.cpu_features()
  avx2_only = [f for f in here if not f.startswith('avx512')]
  monkeypatch.setattr(export_lib, 'cpu_features', lambda: avx2_only if avx2_only != here else here[1:])
  executables, reasons = _load(loaded, export_dir())
  assert executables == {}
  assert len(reasons) == 1 and 'CPU features differ (this CPU lacks' in reasons[0]


@pytest.mark.parametrize('field', ['jaxlib', 'xla_flags', 'compile_options'])
def test_another_jaxlib_or_compile_options_are_refused(loaded, monkeypatch, field):
  key = export_lib.host_key()
  key[field] = {'jax_disable_most_optimizations': 'other'} if field == 'compile_options' else 'other'
  monkeypatch.setattr(export_lib, 'host_key', lambda: key)
  executables, reasons = _load(loaded, export_dir())
  assert executables == {} and f'host {field} differs' in reasons[0]


def test_another_model_or_code_is_refused(loaded, monkeypatch):
  key = loaded.program_key()
  monkeypatch.setattr(loaded, 'program_key', lambda: dict(key, params='0' * 64))
  executables, reasons = _load(loaded, export_dir())
  assert executables == {} and 'program params differs' in reasons[0]
  monkeypatch.undo()
  monkeypatch.setattr(engine_lib, '_chunk_code_hash', lambda: 'edited')
  executables, reasons = _load(loaded, export_dir())
  assert sorted(executables) == [f'window_{b}' for b in BUCKETS]      # natron.jax is frozen; the chunk is not
  assert len(reasons) == 1 and 'code it is traced from changed' in reasons[0]


def test_damaged_file_or_other_probe_outputs_are_refused(loaded, tmp_path):
  _, set_dir = _copy(tmp_path)
  window = f'window_{BUCKETS[0]}'
  with open(os.path.join(set_dir, f'{window}.xla'), 'r+b') as f:
    f.truncate(1000)
  manifest_path = os.path.join(set_dir, export_lib.MANIFEST_FILE)
  with open(manifest_path) as f:
    manifest = json.load(f)
  manifest['executables'][f'chunk_{SERIES_CHUNK}']['probe_sha256'] = '0' * 64
  with open(manifest_path, 'w') as f:
    json.dump(manifest, f)
  executables, reasons = _load(loaded, str(tmp_path / 'export'))
  assert executables == {}
  assert any('sha256' in r and window in r for r in reasons)
  assert any('probe input differ' in r for r in reasons)


def test_fallback_compiles_what_cannot_be_loaded_with_the_same_predictions(compiled, tmp_path, caplog):
  export, set_dir = _copy(tmp_path)
  os.remove(os.path.join(set_dir, f'chunk_{SERIES_CHUNK}.xla'))     # a partial copy
  engine = ServingPredictor.load(bundle_dir(), buckets=BUCKETS, series_chunk=SERIES_CHUNK, exported=export)
  assert engine.executables_loaded == [f'window_{b}' for b in BUCKETS]
  assert engine.trace_count == 1 and 'FileNotFoundError' in engine.executables_skipped[0]
  assert f'compiling [\'chunk_{SERIES_CHUNK}\']' in caplog.text       # logged, never silent
  candles = market()[list(COLUMNS)].to_numpy(np.float64)[:engine.required_candles + 5]
  got, want = engine.predict_recent(candles, point=1e-5), compiled.predict_recent(candles, point=1e-5)
  for key in export_lib.OUTPUTS:
    np.testing.assert_array_equal(got[key], want[key])
