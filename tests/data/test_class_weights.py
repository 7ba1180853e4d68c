import numpy as np
import pytest
from sklearn.utils.class_weight import compute_class_weight

from pneumonia.data.class_weights import balanced_class_weights, no_class_weights


def test_balanced_equals_scikit_learn():
    labels = np.array([0] * 10 + [1] * 27)
    expected = compute_class_weight("balanced", classes=np.array([0, 1]), y=labels)
    np.testing.assert_allclose(balanced_class_weights(labels), expected)
    np.testing.assert_allclose(balanced_class_weights(labels), [37 / 20, 37 / 54])


def test_none_is_ones():
    np.testing.assert_array_equal(no_class_weights(np.array([0, 1, 1])), [1.0, 1.0])


def test_single_class_training_split_is_a_clear_error():
    with pytest.raises(ValueError, match="both classes.*class_weighting=none"):
        balanced_class_weights(np.array([1, 1, 1]))
