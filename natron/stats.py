"""Uncertainty and verdicts: block-bootstrap intervals, the Probabilistic and Deflated Sharpe Ratio.

Every figure Natron reports is one draw of a serially dependent process (overlapping labels, regimes that last
hundreds of bars), so intervals come from a CIRCULAR BLOCK BOOTSTRAP (Politis & Romano 1992): a replicate
concatenates `n / block` blocks of `block` consecutive rows starting at uniform positions (wrapping round the
end), cut to n rows. Blocks at least as long as the label horizon keep a label's overlap with its neighbours
inside one block. Replicates are seeded (np.random.default_rng(seed)) and computed as [n_boot, n] index arrays:
one vectorised numpy pass per statistic, no Python loop over replicates.

Comparisons are PAIRED: the model and every baseline are evaluated on the SAME replicate rows, so the interval
of a margin (model - baseline) reflects the noise of the difference, not of each figure separately.

Intervals are percentile intervals at `level` (default 0.95). A verdict reads "skill over <baseline>" only when
the whole interval of the margin lies above zero; otherwise "no evidence of skill over <baseline>".

Sharpe statistics (Bailey & López de Prado, "The Deflated Sharpe Ratio", 2014), on per-period (daily) returns:
  SR = mean / std (ddof 1), not annualised; skew g3 and (non-excess) kurtosis g4 of the returns;
  PSR(SR*) = Phi((SR - SR*) sqrt(n - 1) / sqrt(1 - g3 SR + (g4 - 1) / 4 SR^2))   the probability that the true
             Sharpe exceeds SR* given n observations with those higher moments;
  DSR = PSR(SR0) with SR0 = sqrt(V) ((1 - e) Z^-1(1 - 1/N) + e Z^-1(1 - 1/(N e))), e = Euler-Mascheroni, N the
        number of configurations tried and V the variance of their Sharpe estimates (the variance of the SR
        estimator, (1 - g3 SR + (g4 - 1)/4 SR^2) / (n - 1), when the trials' Sharpes are not given). N = 1 -> DSR
        = PSR(0).
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np
from scipy import stats as scipy_stats

EULER_GAMMA = 0.5772156649015329
LEVEL = 0.95
N_BOOT = 1000


# ---------------------------------------------------------------------------------------------- resampling
def block_indices(n: int, *, block: int, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
  """int64 [n_boot, n]: circular block-bootstrap row indices (blocks of `block` consecutive rows, wrapping)."""
  if n < 1:
    raise ValueError('cannot bootstrap an empty series')
  block = int(min(max(int(block), 1), n))
  n_blocks = -(-n // block)
  starts = np.random.default_rng(seed).integers(0, n, size=(int(n_boot), n_blocks))
  idx = (starts[:, :, None] + np.arange(block)[None, None, :]) % n
  return idx.reshape(int(n_boot), n_blocks * block)[:, :n]


def interval(samples: np.ndarray, level: float = LEVEL) -> list[float]:
  """[lo, hi] percentile interval of bootstrap `samples` (non-finite replicates ignored)."""
  samples = np.asarray(samples, np.float64)
  samples = samples[np.isfinite(samples)]
  if not samples.size:
    return [float('nan'), float('nan')]
  alpha = (1.0 - level) / 2.0
  lo, hi = np.quantile(samples, [alpha, 1.0 - alpha])
  return [float(lo), float(hi)]


# ---------------------------------------------------------------------------------- classification metrics
def confusion_matrices(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
  """int64 [..., C, C] confusion matrices of the rows of `labels` / `preds` ([..., n], classes 0..C-1)."""
  labels, preds = np.asarray(labels, np.int64), np.asarray(preds, np.int64)
  lead = labels.shape[:-1]
  flat = labels.reshape(-1, labels.shape[-1]) * num_classes + preds.reshape(-1, labels.shape[-1])
  offset = np.arange(flat.shape[0])[:, None] * num_classes * num_classes
  counts = np.bincount((flat + offset).ravel(), minlength=flat.shape[0] * num_classes * num_classes)
  return counts.reshape(*lead, num_classes, num_classes)


def accuracy_of(cm: np.ndarray) -> np.ndarray:
  """[...]: trace / total of confusion matrices [..., C, C] (0 for an empty one)."""
  total = cm.sum(axis=(-2, -1))
  return np.divide(np.trace(cm, axis1=-2, axis2=-1), total, out=np.zeros(total.shape), where=total > 0)


def macro_f1_of(cm: np.ndarray) -> np.ndarray:
  """[...]: mean F1 over the classes present in labels or predictions (natron.train.evaluate.macro_f1's rule)."""
  cm = np.asarray(cm, np.float64)
  tp = np.diagonal(cm, axis1=-2, axis2=-1)
  predicted, actual = cm.sum(axis=-2), cm.sum(axis=-1)
  # F1 = 2 TP / (predicted + actual): the same as 2PR / (P + R), 0 where the class never occurs.
  f1 = np.divide(2 * tp, predicted + actual, out=np.zeros_like(tp), where=(predicted + actual) > 0)
  present = (predicted + actual) > 0
  count = present.sum(axis=-1)
  return np.divide((f1 * present).sum(axis=-1), count, out=np.zeros(count.shape), where=count > 0)


def classification_intervals(labels: np.ndarray, preds: Mapping[str, np.ndarray], num_classes: int, *,
                             block: int, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL) -> dict:
  """Accuracy and macro-F1 of several predictors of the same rows, with paired block-bootstrap samples.

  Args:
    labels: int [n] true classes in chronological order (-1 rows are dropped first).
    preds: {name: int [n]} predictions of each predictor for the same rows.
    block: bootstrap block length in rows (at least the label horizon).
  Returns:
    {name: {'accuracy', 'accuracy_ci', 'macro_f1', 'macro_f1_ci', '_accuracy_samples', '_macro_f1_samples'}};
    the underscore entries ([n_boot] arrays) are for `margin` and are not JSON.
  """
  labels = np.asarray(labels).reshape(-1)
  keep = labels >= 0
  y = labels[keep]
  out = {}
  if not y.size:
    nan = float('nan')
    return {name: {'accuracy': nan, 'accuracy_ci': [nan, nan], 'macro_f1': nan, 'macro_f1_ci': [nan, nan],
                   '_accuracy_samples': np.full(n_boot, nan), '_macro_f1_samples': np.full(n_boot, nan)}
            for name in preds}
  idx = block_indices(len(y), block=block, n_boot=n_boot, seed=seed)
  y_boot = y[idx]
  for name, p in preds.items():
    p = np.asarray(p).reshape(-1)[keep]
    cm = confusion_matrices(y, p, num_classes)
    cm_boot = confusion_matrices(y_boot, p[idx], num_classes)
    acc, f1 = accuracy_of(cm_boot), macro_f1_of(cm_boot)
    out[name] = {'accuracy': float(accuracy_of(cm)), 'accuracy_ci': interval(acc, level),
                 'macro_f1': float(macro_f1_of(cm)), 'macro_f1_ci': interval(f1, level),
                 '_accuracy_samples': acc, '_macro_f1_samples': f1}
  return out


def public(entry: Mapping) -> dict:
  """`entry` without its bootstrap samples (the JSON-able part)."""
  return {k: v for k, v in entry.items() if not k.startswith('_')}


# ------------------------------------------------------------------------------------------- margins, verdict
def margin(model: Mapping, baseline: Mapping, metric: str, level: float = LEVEL) -> dict:
  """{'value', 'ci'}: model - baseline in `metric`, with the interval of the paired bootstrap differences."""
  value = float(model[metric] - baseline[metric])
  return {'value': value, 'ci': interval(model[f'_{metric}_samples'] - baseline[f'_{metric}_samples'], level)}


def verdict(margin_entry: Mapping, baseline: str, *, metric: str, scale: float = 100.0, unit: str = ' pts',
            level: float = LEVEL) -> str:
  """Words for a margin: skill only when the whole interval lies above zero.

  'skill over momentum: accuracy +2.1 pts [+0.4, +3.9] (95% CI)' or
  'no evidence of skill over momentum: accuracy -0.3 pts [-2.0, +1.5] (95% CI includes 0)' (or '... below 0'
  when the model is reliably worse).
  """
  v, (lo, hi) = margin_entry['value'], margin_entry['ci']
  figure = (f'{metric} {scale * v:+.1f}{unit} [{scale * lo:+.1f}, {scale * hi:+.1f}] '
            f'({100 * level:.0f}% CI')
  if not (np.isfinite(lo) and np.isfinite(hi)):
    return f'no evidence of skill over {baseline}: {metric} margin undefined (no rows)'
  if lo > 0:
    return f'skill over {baseline}: {figure})'
  where = 'includes 0' if hi >= 0 else 'below 0: worse than the baseline'
  return f'no evidence of skill over {baseline}: {figure} {where})'


def has_skill(verdict_text: str) -> bool:
  return verdict_text.startswith('skill over')


# ------------------------------------------------------------------------------------------ returns, Sharpe
def sharpe(returns: np.ndarray) -> float:
  """Per-period Sharpe ratio mean / std (ddof 1); 0 for a constant or too short series."""
  r = np.asarray(returns, np.float64)
  if r.size < 2:
    return 0.0
  std = r.std(ddof=1)
  return float(r.mean() / std) if std > 0 else 0.0


def _moments(r: np.ndarray) -> tuple[float, float]:
  """(skewness, kurtosis) (non-excess, biased estimators as in Bailey & López de Prado); (0, 3) if constant."""
  if r.size < 3 or np.std(r) == 0:
    return 0.0, 3.0
  return float(scipy_stats.skew(r)), float(scipy_stats.kurtosis(r, fisher=False))


def sharpe_variance(returns: np.ndarray) -> float:
  """Variance of the per-period Sharpe estimator: (1 - g3 SR + (g4 - 1) / 4 SR^2) / (n - 1)."""
  r = np.asarray(returns, np.float64)
  if r.size < 2:
    return float('nan')
  sr = sharpe(r)
  g3, g4 = _moments(r)
  return max(1.0 - g3 * sr + (g4 - 1.0) / 4.0 * sr * sr, 1e-12) / (r.size - 1)


def probabilistic_sharpe(returns: np.ndarray, benchmark: float = 0.0) -> float:
  """PSR: P(true per-period Sharpe > benchmark); 0.5 for a series without variation (nothing to judge)."""
  r = np.asarray(returns, np.float64)
  if r.size < 2 or r.std(ddof=1) == 0:
    return 0.5
  return float(scipy_stats.norm.cdf((sharpe(r) - benchmark) / math.sqrt(sharpe_variance(r))))


def expected_max_sharpe(trials: int, variance: float) -> float:
  """SR0: the expected maximum of `trials` Sharpe estimates of zero-skill strategies with that variance."""
  trials = int(trials)
  if trials <= 1:
    return 0.0
  z = scipy_stats.norm.ppf
  return float(math.sqrt(variance) * ((1 - EULER_GAMMA) * z(1 - 1 / trials)
                                      + EULER_GAMMA * z(1 - 1 / (trials * math.e))))


def deflated_sharpe(returns: np.ndarray, trials: int = 1, trial_sharpes=None) -> float:
  """DSR = PSR(SR0), SR0 the expected best of `trials` zero-skill configurations (module docstring)."""
  r = np.asarray(returns, np.float64)
  if trial_sharpes is not None and len(trial_sharpes) > 1:
    variance = float(np.var(np.asarray(trial_sharpes, np.float64), ddof=1))
  else:
    variance = sharpe_variance(r)
  if not np.isfinite(variance):
    return 0.5
  return probabilistic_sharpe(r, expected_max_sharpe(trials, variance))


def return_intervals(daily: Mapping[str, np.ndarray], *, block: int, periods_per_year: float,
                     n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL) -> dict:
  """Block-bootstrap intervals of total return and annualised Sharpe for policies traded on the same days.

  Args:
    daily: {policy: float [D] daily net returns}, all of the same D days (paired resampling).
    block: block length in days.
  Returns:
    {policy: {'total_return_ci', 'sharpe_ci', '_total_return_samples', '_sharpe_samples'}}.
  """
  lengths = {len(v) for v in daily.values()}
  if len(lengths) != 1:
    raise ValueError(f'policies cover different numbers of days: {sorted(lengths)}')
  d = lengths.pop()
  idx = block_indices(d, block=block, n_boot=n_boot, seed=seed) if d else None
  out = {}
  for name, r in daily.items():
    r = np.asarray(r, np.float64)
    if idx is None:
      out[name] = {'total_return_ci': [0.0, 0.0], 'sharpe_ci': [0.0, 0.0],
                   '_total_return_samples': np.zeros(n_boot), '_sharpe_samples': np.zeros(n_boot)}
      continue
    boot = r[idx]
    # Compounded growth as a sum of log1p (exact enough in float64 for thousands of days; no cumprod).
    total = np.expm1(np.log1p(boot).sum(axis=1))
    std = boot.std(axis=1, ddof=1) if d > 1 else np.zeros(n_boot)
    shp = np.divide(boot.mean(axis=1), std, out=np.zeros(n_boot), where=std > 0) * math.sqrt(periods_per_year)
    out[name] = {'total_return_ci': interval(total, level), 'sharpe_ci': interval(shp, level),
                 '_total_return_samples': total, '_sharpe_samples': shp}
  return out
