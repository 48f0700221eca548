"""Metric functions against hand-computed examples (no model involved)."""
import numpy as np
import pytest

from natron.train import evaluate


def test_confusion_matrix_counts_rows_true_columns_predicted_and_skips_unlabelled():
  labels = np.array([0, 0, 1, 2, 2, 2, -1, -1])
  preds = np.array([0, 1, 1, 2, 0, 2, 2, 0])
  cm = evaluate.confusion_matrix(labels, preds, 3)
  np.testing.assert_array_equal(cm, [[1, 1, 0],
                                     [0, 1, 0],
                                     [1, 0, 2]])
  assert cm.dtype == np.int64
  assert evaluate.accuracy(cm) == pytest.approx(4 / 6)


def test_precision_recall_and_macro_f1_by_hand():
  # Same example: per class
  #   0: TP 1, FP 1 (row 2 predicted 0), FN 1 -> P 1/2, R 1/2, F1 1/2
  #   1: TP 1, FP 1, FN 0                    -> P 1/2, R 1,   F1 2/3
  #   2: TP 2, FP 0, FN 1                    -> P 1,   R 2/3, F1 4/5
  cm = evaluate.confusion_matrix(np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 0, 2]), 3)
  precision, recall = evaluate.precision_recall(cm)
  np.testing.assert_allclose(precision, [0.5, 0.5, 1.0])
  np.testing.assert_allclose(recall, [0.5, 1.0, 2 / 3])
  np.testing.assert_allclose(evaluate.f1_per_class(cm), [0.5, 2 / 3, 0.8])
  assert evaluate.macro_f1(cm) == pytest.approx((0.5 + 2 / 3 + 0.8) / 3)


def test_macro_f1_ignores_classes_absent_from_labels_and_predictions():
  # Class 2 never occurs: it must not drag the mean down; class 1 predicted but never true counts as 0.
  cm = evaluate.confusion_matrix(np.array([0, 0, 0]), np.array([0, 0, 1]), 3)
  # class 0: P 1, R 2/3, F1 0.8; class 1: P 0, R 0 (no support) F1 0; class 2 absent.
  assert evaluate.macro_f1(cm) == pytest.approx(0.4)
  precision, recall = evaluate.precision_recall(cm)
  np.testing.assert_allclose(precision, [1.0, 0.0, 0.0])
  np.testing.assert_allclose(recall, [2 / 3, 0.0, 0.0])
  assert evaluate.macro_f1(np.zeros((3, 3), np.int64)) == 0.0


def test_majority_baseline_uses_the_training_span_majority_not_the_evaluated_split():
  train = np.array([1, 1, 1, 0, 2, -1, -1, -1, -1])    # -1 rows do not vote: majority is class 1
  evaluated = np.array([0, 0, 0, 1, 2, -1])            # its own majority would be 0 (accuracy 3/5)
  assert evaluate.majority_class(train, 3) == 1
  assert evaluate.majority_baseline(train, evaluated, 3) == pytest.approx(1 / 5)
  # Ties go to the lowest class id, so the baseline is reproducible.
  assert evaluate.majority_class(np.array([2, 2, 0, 0]), 3) == 0
  with pytest.raises(ValueError, match='no labelled rows'):
    evaluate.majority_class(np.array([-1, -1]), 2)


def test_task_metrics_is_json_ready_and_consistent():
  rng = np.random.default_rng(0)
  labels = rng.integers(-1, 3, size=500)
  preds = np.where(rng.random(500) < 0.7, np.maximum(labels, 0), rng.integers(0, 3, size=500))
  train = rng.integers(0, 3, size=300)
  m = evaluate.task_metrics(labels, preds, 3, train)
  keep = labels >= 0
  assert m['n'] == keep.sum()
  assert m['accuracy'] == pytest.approx(np.mean(labels[keep] == preds[keep]))
  assert sum(m['support']) == m['n']
  assert np.array(m['confusion_matrix']).sum() == m['n']
  for key in ('precision', 'recall', 'f1', 'support'):
    assert len(m[key]) == 3 and all(isinstance(v, (int, float)) for v in m[key])
  assert isinstance(m['confusion_matrix'][0][0], int)


def test_confusion_matrix_rejects_out_of_range_predictions():
  with pytest.raises(ValueError, match='class ids'):
    evaluate.confusion_matrix(np.array([0, 1]), np.array([0, 2]), 2)
  with pytest.raises(ValueError, match='differ in length'):
    evaluate.confusion_matrix(np.array([0, 1]), np.array([0]), 2)


def test_evaluate_predictions_means_and_metric_lookup():
  labels = {'buy': np.array([0, 1, 1, 0]), 'sell': np.array([0, 0, 1, -1])}
  preds = {'buy': np.array([0, 1, 0, 0]), 'sell': np.array([0, 0, 1, 1])}
  out = evaluate.evaluate_predictions(preds, labels, labels, {'buy': 2, 'sell': 2})
  assert out['buy']['accuracy'] == pytest.approx(0.75)
  assert out['sell']['accuracy'] == pytest.approx(1.0)
  assert out['mean_accuracy'] == pytest.approx(0.875)
  # buy: class 0 P 2/3 R 1 F1 0.8; class 1 P 1 R 1/2 F1 2/3.
  assert out['buy']['macro_f1'] == pytest.approx((0.8 + 2 / 3) / 2)
  assert evaluate.metric_value(out, 'mean_macro_f1') == pytest.approx((out['buy']['macro_f1'] + 1.0) / 2)
  assert evaluate.metric_value(out, 'buy_accuracy') == pytest.approx(0.75)
  with pytest.raises(KeyError):
    evaluate.metric_value(out, 'regime_accuracy')


def test_report_markdown_puts_baselines_beside_accuracy():
  labels = {t: np.array([0, 1, 1, 0]) for t in evaluate.TASKS}
  metrics = evaluate.evaluate_predictions(labels, labels, labels, {t: 2 for t in evaluate.TASKS})
  names = {t: ('A', 'B') for t in evaluate.TASKS}
  text = evaluate.report_markdown({'val': metrics, 'test': metrics}, names)
  assert '| task | accuracy | majority baseline | margin | macro-F1 | labelled rows |' in text
  assert '| buy | 1.0000 | 0.5000 | +0.5000 | 1.0000 | 4 |' in text
  assert text.count('## ') >= 2 and '### test / regime' in text


def test_predict_split_drops_padding_rows_and_weights_the_loss_by_real_rows():
  def fake_predict(params, batch):
    assert 'end' not in batch                    # host bookkeeping never reaches the jitted function
    x = batch['x'][:, 0, 0].astype(np.int32)
    preds = {t: x % 2 for t in evaluate.TASKS}
    probs = {t: np.stack([1.0 - x % 2, x % 2], axis=-1).astype(np.float32) for t in evaluate.TASKS}
    return preds, probs, np.float32(params * batch['mask'].sum())

  def batch(values, real):
    mask = (np.arange(len(values)) < real).astype(np.float32)
    labels = np.where(mask > 0, np.asarray(values) % 2, -1).astype(np.int32)
    return {'x': np.asarray(values, np.float32)[:, None, None], 'mask': mask,
            'end': np.arange(len(values), dtype=np.int64) + 100 * real,
            **{t: labels for t in evaluate.TASKS}}

  out = evaluate.predict_split(fake_predict, 1.0, [batch([1, 2, 3, 4], 4), batch([5, 6, 5, 5], 2)])
  np.testing.assert_array_equal(out['preds']['buy'], [1, 0, 1, 0, 1, 0])
  np.testing.assert_array_equal(out['labels']['regime'], [1, 0, 1, 0, 1, 0])
  np.testing.assert_array_equal(out['end'], [400, 401, 402, 403, 200, 201])
  assert out['probs']['sell'].shape == (6, 2)
  # Batch losses 4 and 2 weighted by 4 and 2 real rows: (16 + 4) / 6.
  assert out['loss'] == pytest.approx(20 / 6)
