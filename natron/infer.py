"""Batch inference phase: one prediction row per input bar (configs/infer.py).

  python launch.py --config=configs/infer.py --workdir=DIR --config.data.path=bars.csv

Uses `natron.predictor.Predictor.predict_series` (features once over each whole series with the training
code, the model over every window in fixed-size jitted batches) and `natron.signals` for the table.
"""
from __future__ import annotations

import os
import time as time_lib

from absl import logging
import numpy as np
import pandas as pd

from natron.predictor import Predictor, optional_threshold
from natron.signals import SIGNALS


def _write_table(table: pd.DataFrame, path: str) -> None:
  """CSV via pyarrow (pandas' to_csv needs ~20 s for a million rows); .parquet by extension."""
  import pyarrow as pa   # pylint: disable=g-import-not-at-top
  import pyarrow.csv as pa_csv   # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq   # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  arrow = pa.Table.from_pandas(table, preserve_index=False)
  if path.endswith('.parquet'):
    pq.write_table(arrow, path)
  else:
    pa_csv.write_csv(arrow, path)


def run_phase(config, workdir: str) -> dict:
  """Writes one prediction row per input bar to config.output (default workdir/infer/predictions.csv)."""
  from natron.data import load_market   # pylint: disable=g-import-not-at-top
  start = time_lib.perf_counter()
  predictor = Predictor.load(config.get('bundle') or workdir,
                             threshold=optional_threshold(config.get('threshold', -1.0)),
                             series_batch=int(config.get('batch_size', 128)),
                             dtype=config.get('dtype', '') or None)
  frame = load_market(config.data)
  output = config.get('output') or os.path.join(workdir, 'infer', 'predictions.csv')
  tables = []
  symbols = frame['symbol'].unique() if 'symbol' in frame else [None]
  for symbol in symbols:
    part = frame if symbol is None else frame[frame['symbol'] == symbol].reset_index(drop=True)
    logging.info('infer: %s, %d bars', symbol or 'series', len(part))
    pred = predictor.predict_series(part, with_encoded=bool(config.get('encoded_output', '')),
                                    progress=True, desc=f'predict {symbol or ""}'.strip())
    table = predictor.table(pred)
    if symbol is not None:
      table.insert(1 if 'time' in table else 0, 'symbol', symbol)
    tables.append(table)
    if config.get('encoded_output', ''):
      path = config.encoded_output if len(symbols) == 1 else f'{config.encoded_output}.{symbol}.npy'
      np.save(path, pred['encoded'])
  table = pd.concat(tables, ignore_index=True) if len(tables) > 1 else tables[0]
  _write_table(table, output)
  seconds = time_lib.perf_counter() - start
  counts = table.loc[table['valid'], 'signal'].value_counts().to_dict()
  summary = {'bars': int(len(table)), 'predicted': int(table['valid'].sum()), 'output': os.path.abspath(output),
             'seconds': round(seconds, 2), 'bars_per_s': round(len(table) / seconds, 1),
             'signals': {s: int(counts.get(s, 0)) for s in SIGNALS}, 'model_version': predictor.model_version}
  logging.info('infer: wrote %d rows to %s in %.1f s (%s)', len(table), output, seconds, summary['signals'])
  return summary
