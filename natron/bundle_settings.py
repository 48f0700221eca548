"""Later phases read the data and split settings the fine-tuning run recorded in its bundle.

rl, backtest (and inspect, with inspect.data_from) rebuild the dataset the model was trained on: the same data
source, labels, windows and purged splits. Asking the user to repeat the training run's overrides invites a
silent mismatch (another split, another scaler: "test" bars the model trained on), so these sections come from
the bundle's `meta['config']` (big_vision: evaluators are built from the same config as training), and every
key the user's config sets differently is named in a warning. `config.data_from = 'config'` keeps the user's
sections instead (e.g. to backtest a trained bundle on new data; the scaler check then decides).
"""
from __future__ import annotations

import os

from absl import logging
import ml_collections

from natron import checkpoint
from natron.errors import UserError

SECTIONS = ('data', 'labels', 'dataset')


def _flat(d, prefix=''):
  out = {}
  for k, v in (d or {}).items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = list(v) if isinstance(v, tuple) else v
  return out


def bundle_meta(workdir: str) -> dict | None:
  """The meta of workdir/finetune/bundle (or of `workdir` itself when it is a bundle), or None."""
  for candidate in (os.path.join(workdir, 'finetune', 'bundle'), workdir):
    if checkpoint.is_bundle(candidate):
      return checkpoint.load_meta(candidate)
  return None


def resolve(config, workdir: str, phase: str):
  """`config` with its data / labels / dataset sections taken from the bundle the phase consumes.

  Returns a new ConfigDict (the caller's stays untouched). Without a bundle, or with config.data_from =
  'config', the user's sections are used as they are.
  """
  data_from = str(config.get('data_from', 'bundle') or 'bundle')
  if data_from not in ('bundle', 'config'):
    raise UserError(f"data_from must be 'bundle' or 'config', got {data_from!r}.")
  meta = bundle_meta(workdir)
  if data_from == 'config' or meta is None or 'config' not in meta:
    return config
  recorded = meta['config']
  out = ml_collections.ConfigDict(config.to_dict())
  differs = []
  for section in SECTIONS:
    if section not in recorded:
      continue
    mine, theirs = _flat(config.get(section, {}).to_dict() if section in config else {}), _flat(recorded[section])
    differs += [f'{section}.{k}={mine[k]!r} (bundle: {theirs[k]!r})' for k in sorted(theirs)
                if k in mine and mine[k] != theirs[k]]
    with out.unlocked():
      out[section] = ml_collections.ConfigDict(recorded[section])
  if differs:
    logging.warning('%s: data and split settings come from the bundle the model was trained with; ignoring '
                    '%s. Set data_from=config to use your own.', phase, '; '.join(differs))
  return out
