"""The aggregation rules on small updates whose answers are worked out by hand."""

import numpy as np
import pytest

from fedseg3d.server.robust_aggregation import aggregate, coordinate_median, norm_bound, trimmed_mean, weighted_mean


def ups(*values):
    return [{"w": np.array(v, dtype=np.float32)} for v in values]


def test_weighted_mean_weights_by_sample_count():
    out = weighted_mean(ups([0.0, 4.0], [3.0, 0.0]), [1.0, 3.0])
    np.testing.assert_allclose(out["w"], [2.25, 1.0])
    assert out["w"].dtype == np.float32


def test_a_key_is_averaged_over_the_sites_that_sent_it():
    updates = [{"a": np.array([1.0]), "bn": np.array([10.0])}, {"a": np.array([3.0])}]
    out = weighted_mean(updates, [1.0, 1.0])
    assert out["a"][0] == 2.0 and out["bn"][0] == 10.0


def test_median_ignores_one_wild_site():
    out = coordinate_median(ups([1.0, -1.0], [2.0, -2.0], [3.0, -3.0], [1000.0, 1000.0]))
    np.testing.assert_allclose(out["w"], [2.5, -1.5])


def test_trimmed_mean_drops_the_extremes_of_each_coordinate():
    out = trimmed_mean(ups([1.0], [2.0], [3.0], [100.0]), trim_fraction=0.25)
    np.testing.assert_allclose(out["w"], [2.5])
    with pytest.raises(ValueError, match="trim_fraction"):
        trimmed_mean(ups([1.0]), trim_fraction=0.5)


def test_norm_bound_clips_to_the_median_norm_then_averages():
    # norms 1, 1, 100: the median is 1, so the third update is scaled to [1, 0] before the mean.
    out = norm_bound(ups([0.0, 1.0], [0.0, 1.0], [100.0, 0.0]), [1.0, 1.0, 1.0])
    np.testing.assert_allclose(out["w"], [1 / 3, 2 / 3], rtol=1e-6)


def test_integer_state_keeps_its_dtype():
    updates = [{"n": np.array(2, dtype=np.int64)}, {"n": np.array(3, dtype=np.int64)}, {"n": np.array(9)}]
    assert coordinate_median(updates)["n"].dtype == np.int64


def test_unknown_rule_and_bad_weights_are_refused():
    with pytest.raises(ValueError, match="aggregation_rule must be one of"):
        aggregate("krum", ups([1.0]), [1.0])
    with pytest.raises(ValueError, match="weights must be positive"):
        weighted_mean(ups([1.0], [2.0]), [1.0, 0.0])
