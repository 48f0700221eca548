"""Looks inside a fine-tuned model: attention over the window's time steps and test-split confusion matrices.

  python launch.py --config=configs/inspect.py --workdir=DIR     # after the finetune phase in DIR

Loads the bundle at DIR/finetune/bundle (the model is rebuilt from the bundle's own model config), rebuilds
the test split (from the bundle's data config by default) and checks its scaler equals the bundle's, so the
pictures show exactly the inputs the model was evaluated on. Writes PNGs into DIR/inspect/ (matplotlib's Agg
canvas through `Figure`, no pyplot global state) and index.json listing them with the chosen windows.

Multi-host (jax.distributed): every process computes the predictions and the summary (the same on each, so a
user error stops every process alike); process 0 alone draws and writes the files.
"""
from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np
from matplotlib.figure import Figure

from natron import checkpoint
from natron import data as data_lib
from natron import dataset as dataset_lib
from natron import labels as labels_lib
from natron.errors import UserError
from natron.model import NatronModel
from natron.train import evaluate
from natron.train import state as train_state

PHASE = 'inspect'
TASKS = labels_lib.TASKS


def _get(section, key: str, default):
  if section is None:
    return default
  value = section.get(key, default) if hasattr(section, 'get') else getattr(section, key, default)
  return default if value is None else value


# ----------------------------------------------------------------------------------------------------------
# Choosing windows and computing attention.
# ----------------------------------------------------------------------------------------------------------
def choose_windows(num_test: int, num_windows: int, window_index: Sequence[int] = ()) -> np.ndarray:
  """Positions in the test split to draw: `window_index` if given, else `num_windows` evenly spaced."""
  if num_test <= 0:
    raise UserError('The test split has no labelled windows to inspect; use more bars.')
  if window_index:
    idx = np.asarray(window_index, np.int64)
    bad = idx[(idx < -num_test) | (idx >= num_test)]
    if bad.size:
      raise UserError(f'inspect.window_index {bad.tolist()} outside the {num_test} test windows.')
    return np.mod(idx, num_test)
  n = max(1, min(int(num_windows), num_test))
  return np.unique(np.linspace(0, num_test - 1, n).round().astype(np.int64))


def make_attention_fn(model):
  """jit(params, x [B, W, F]) -> (outputs {task: logits}, attention list per layer of float32 [B, H, W', W'])."""

  @jax.jit
  def attend(params, x):
    out = model.apply({'params': params}, x, train=False, return_attention=True)
    return {t: out[t] for t in TASKS}, out['attention']

  return attend


# ----------------------------------------------------------------------------------------------------------
# Figures.
# ----------------------------------------------------------------------------------------------------------
def attention_figure(weights: np.ndarray, close: np.ndarray | None, title: str) -> Figure:
  """Head-averaged attention [Q, K] as a heatmap, the window's closes above it, the attention each key
  (time step) receives on average below it."""
  fig = Figure(figsize=(7.5, 9.0))
  grid = fig.add_gridspec(3, 2, height_ratios=(1.0, 4.0, 1.0), width_ratios=(30, 1), hspace=0.35, wspace=0.05)
  ax_price, ax_map, ax_cbar = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[1, 0]), fig.add_subplot(grid[1, 1])
  ax_recv = fig.add_subplot(grid[2, 0])
  q, k = weights.shape
  if close is not None:
    # With CLS pooling the keys include the CLS token first: align the closes with the time-step keys.
    ax_price.plot(np.arange(k - len(close), k), close, color='black', linewidth=1.0)
  ax_price.set_xlim(-0.5, k - 0.5)
  ax_price.set_ylabel('close')
  ax_price.set_title(title, fontsize=9)
  image = ax_map.imshow(weights, aspect='auto', cmap='viridis', interpolation='nearest')
  ax_map.set_xlabel('key time step (0 = oldest bar of the window)')
  ax_map.set_ylabel('query time step')
  fig.colorbar(image, cax=ax_cbar, label='attention weight')
  ax_recv.bar(np.arange(k), weights.mean(axis=0), width=1.0, color='tab:blue')
  ax_recv.set_xlim(-0.5, k - 0.5)
  ax_recv.set_xlabel('time step')
  ax_recv.set_ylabel('mean received')
  return fig


def heads_figure(weights: np.ndarray, title: str) -> Figure:
  """One heatmap per head: weights [H, Q, K]."""
  heads = weights.shape[0]
  cols = min(4, heads)
  rows = int(np.ceil(heads / cols))
  fig = Figure(figsize=(3.2 * cols, 3.0 * rows + 0.6))
  axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).reshape(-1)
  for h, ax in enumerate(axes):
    if h >= heads:
      ax.set_axis_off()
      continue
    ax.imshow(weights[h], aspect='auto', cmap='viridis', interpolation='nearest')
    ax.set_title(f'head {h}', fontsize=9)
    ax.tick_params(labelsize=7)
    ax.set_xlabel('key time step', fontsize=7)
    ax.set_ylabel('query time step', fontsize=7)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return fig


def confusion_figure(cm: np.ndarray, names: Sequence[str], title: str) -> Figure:
  """Counts in each cell, colours row-normalised (recall per true class) so rare classes stay readable."""
  cm = np.asarray(cm, np.int64)
  row = cm.sum(axis=1, keepdims=True)
  frac = np.divide(cm, row, out=np.zeros(cm.shape, np.float64), where=row > 0)
  size = 1.2 + 0.75 * len(names)
  fig = Figure(figsize=(size + 1.5, size))
  ax = fig.subplots()
  image = ax.imshow(frac, cmap='Blues', vmin=0.0, vmax=1.0)
  ax.set_xticks(range(len(names)), names, rotation=45, ha='right', fontsize=8)
  ax.set_yticks(range(len(names)), names, fontsize=8)
  ax.set_xlabel('predicted')
  ax.set_ylabel('true')
  for i in range(cm.shape[0]):
    for j in range(cm.shape[1]):
      ax.text(j, i, f'{cm[i, j]}\n{frac[i, j]:.0%}', ha='center', va='center', fontsize=7,
              color='white' if frac[i, j] > 0.6 else 'black')
  fig.colorbar(image, ax=ax, label='share of the true class')
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  return fig


def _save(make_figure, path: str, dpi: int, write: bool = True) -> str:
  """Builds the figure (`make_figure()`) and writes it to `path` when `write` (process 0); returns `path`."""
  if write:
    make_figure().savefig(path, dpi=dpi)
  return path


# ----------------------------------------------------------------------------------------------------------
# The phase.
# ----------------------------------------------------------------------------------------------------------
def _data_config(config, meta: Mapping, data_from: str):
  """The config whose data/labels/dataset sections rebuild the test split."""
  if data_from == 'config':
    return config
  if data_from != 'bundle':
    raise UserError(f"inspect.data_from must be 'bundle' or 'config', got {data_from!r}.")
  return ml_collections.ConfigDict(meta['config'])


def _check_scaler(ds, meta: Mapping, tolerance: float = 1e-4) -> None:
  """The rebuilt scaler must equal the bundle's up to float32 noise: every statistic within `tolerance` of
  the feature's scale (a shift that small moves no scaled input by more than 1e-4 robust units)."""
  saved = meta['scaler']
  scale = np.abs(np.asarray(saved['scale'], np.float64))
  same = (list(ds.feature_names) == list(meta['feature_names'])
          and np.all(np.abs(np.asarray(ds.scaler['center']) - saved['center']) <= tolerance * scale)
          and np.all(np.abs(np.asarray(ds.scaler['scale']) - saved['scale']) <= tolerance * scale))
  if not same:
    raise UserError('The rebuilt dataset does not match the bundle (different feature names or scaler): '
                    'inspect with the data settings of the fine-tuning run (inspect.data_from=bundle).')


def run_phase(config, workdir: str) -> dict:
  """Writes attention heatmaps and confusion matrices for the bundle in workdir/finetune/bundle."""
  cfg = config.get('inspect') if hasattr(config, 'get') else None
  bundle_dir = os.path.join(workdir, 'finetune', 'bundle')
  if not checkpoint.is_bundle(bundle_dir):
    raise UserError(f'No fine-tuned bundle at {bundle_dir}: run the finetune phase in this workdir first.')
  params, meta = checkpoint.load_bundle(bundle_dir)
  checkpoint.check_feature_schema(meta)
  out_dir = os.path.join(workdir, PHASE)
  write = train_state.is_main_process()   # multi-host: process 0 alone writes
  if write:
    os.makedirs(out_dir, exist_ok=True)
  dpi = int(_get(cfg, 'dpi', 100))

  # Data: the test split, exactly as the model saw it.
  source = _data_config(config, meta, str(_get(cfg, 'data_from', 'bundle')))
  ds = dataset_lib.build_dataset(data_lib.load_market(source.data), source)
  _check_scaler(ds, meta)
  test_ends = ds.split_ends('test')
  train_labels = {t: ds.labels.task(t)[ds.split_ends('train')] for t in TASKS}

  # Model from the bundle's own config, so the parameters always fit.
  model = NatronModel(ml_collections.ConfigDict(meta['config']['model']))
  files = []

  # Confusion matrices over the whole test split.
  predict_fn = evaluate.make_predict_fn(model)
  result = evaluate.predict_split(predict_fn, params, ds.batches(
      'test', int(_get(cfg, 'eval_batch_size', 256)), shuffle=False))
  metrics = evaluate.evaluate_predictions(result['preds'], result['labels'], train_labels,
                                          labels_lib.NUM_CLASSES)
  for task in TASKS:
    m = metrics[task]
    title = (f'{task} (test, {m["n"]} windows): accuracy {m["accuracy"]:.3f}, '
             f'majority baseline {m["majority_baseline"]:.3f}, macro-F1 {m["macro_f1"]:.3f}')
    files.append(_save(lambda: confusion_figure(np.asarray(m['confusion_matrix']), labels_lib.CLASS_NAMES[task],
                                                title),
                       os.path.join(out_dir, f'confusion_{task}.png'), dpi, write))

  # Attention heatmaps for the chosen test windows.
  chosen = choose_windows(len(test_ends), int(_get(cfg, 'num_windows', 3)), tuple(_get(cfg, 'window_index', ())))
  ends = test_ends[chosen]
  outputs, attention = jax.device_get(make_attention_fn(model)(params, ds.windows(ends)))
  num_layers = len(attention)
  layers = [int(l) for l in _get(cfg, 'layers', ())] or list(range(num_layers))
  if any(not 0 <= l < num_layers for l in layers):
    raise UserError(f'inspect.layers {layers} outside the model\'s {num_layers} layers.')
  windows = []
  for k, end in enumerate(ends):
    close = ds.close[end - ds.window + 1:end + 1]
    when = (np.datetime_as_string(np.datetime64(ds.time[end], 'm')).replace('T', ' ') + ' UTC'
            if ds.time is not None else f'row {end}')
    truth = {t: _class_name(t, int(ds.labels.task(t)[end])) for t in TASKS}
    pred = {t: _class_name(t, int(np.argmax(outputs[t][k]))) for t in TASKS}
    desc = ', '.join(f'{t} {pred[t]}/{truth[t]}' for t in TASKS)
    windows.append({'index': int(chosen[k]), 'end_row': int(end), 'time': when, 'symbol': str(ds.symbol[end]),
                    'predicted': pred, 'label': truth})
    for layer in layers:
      w = np.asarray(attention[layer][k], np.float32)                      # [H, Q, K]
      title = f'window ending {when} ({ds.symbol[end]}), layer {layer}, heads averaged\npred/label: {desc}'
      files.append(_save(lambda: attention_figure(w.mean(axis=0), close, title),
                         os.path.join(out_dir, f'attention_w{k}_layer{layer}_mean.png'), dpi, write))
      if bool(_get(cfg, 'per_head', True)):
        files.append(_save(lambda: heads_figure(w, f'window ending {when}, layer {layer}: attention per head'),
                           os.path.join(out_dir, f'attention_w{k}_layer{layer}_heads.png'), dpi, write))

  index = {'bundle': os.path.abspath(bundle_dir), 'model_version': meta.get('model_version'),
           'windows': windows, 'files': [os.path.basename(f) for f in files],
           'test': {t: {k: metrics[t][k] for k in ('accuracy', 'macro_f1', 'majority_baseline')} for t in TASKS}}
  if write:
    with open(os.path.join(out_dir, 'index.json'), 'w') as f:
      json.dump(index, f, indent=2)
    logging.info('inspect: wrote %d PNGs to %s', len(files), out_dir)
  return {'pngs': len(files), 'windows': len(windows),
          **{f'test_{t}_accuracy': metrics[t]['accuracy'] for t in TASKS}}


def _class_name(task: str, label: int) -> str:
  return labels_lib.CLASS_NAMES[task][label] if label >= 0 else 'none'
