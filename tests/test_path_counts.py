"""Path counting in the unrolled view: exact counts, the paper's E5/E7/E9 numbers, intervals."""

from fractions import Fraction
from math import comb

import numpy as np
import pytest

from resnet_ensemble import path_counts


@pytest.mark.parametrize("n", [1, 2, 3, 10, 54, 110, 200])
def test_counts_sum_to_two_to_the_n_exactly(n):
  counts = path_counts.path_counts(n)
  assert len(counts) == n + 1
  assert all(isinstance(c, int) for c in counts)
  assert sum(counts) == 2**n
  assert counts == counts[::-1]


@pytest.mark.parametrize("n", [1, 7, 54, 110])
def test_distribution_is_binomial_half_with_mean_n_over_2(n):
  dist = path_counts.path_length_distribution(n)
  assert dist.dtype == np.float64 and dist.shape == (n + 1,)
  assert dist.sum() == pytest.approx(1.0, rel=1e-14)
  assert float(np.dot(np.arange(n + 1), dist)) == pytest.approx(n / 2, rel=1e-13)


def test_paper_share_of_lengths_19_to_35_is_98_percent():
  """E5: 'exactly 98.0 %' of the 54-block network's paths have length 19..35."""
  share = path_counts.share_of_paths(54, 19, 35)
  assert isinstance(share, Fraction)
  assert share == Fraction(sum(comb(54, k) for k in range(19, 36)), 2**54)
  assert round(float(share) * 100, 1) == 98.0
  assert float(share) == pytest.approx(0.98016567327, abs=1e-11)


def test_paper_share_of_lengths_5_to_17_is_0_4537_percent():
  """E7: the gradient-carrying lengths 5..17 are 'exactly 0.4537 %' of all paths."""
  share = path_counts.share_of_paths(54, 5, 17)
  assert round(float(share) * 100, 4) == 0.4537
  assert float(share) == pytest.approx(0.00453667015, abs=1e-12)


def test_share_of_all_lengths_is_one():
  assert path_counts.share_of_paths(9, 0, 9) == 1
  assert path_counts.share_of_paths(9, 3, 3) == Fraction(comb(9, 3), 512)


@pytest.mark.parametrize("x, expected", [(5, 0.343), (11, 0.080), (17, 0.015)])
def test_paper_surviving_fraction_after_deleting_10_of_54(x, expected):
  """E9 / Fig. 7: deleting 10 of 54 blocks leaves 0.343, 0.080, 0.015 of length-5/11/17 paths."""
  assert round(path_counts.surviving_fraction(54, 10, x), 3) == pytest.approx(expected, abs=1e-12)


def test_surviving_fraction_edges():
  assert all(path_counts.surviving_fraction(54, 0, x) == 1.0 for x in range(55))
  assert path_counts.surviving_fraction(54, 10, 45) == 0.0
  assert path_counts.surviving_fraction(54, 54, 1) == 0.0
  assert path_counts.surviving_fraction(54, 54, 0) == 1.0  # the empty (pure-skip) path survives
  assert path_counts.surviving_fraction(54, 10, 44) == pytest.approx(1 / comb(54, 44))
  # Deleting one block removes exactly the paths through it: x/n of the length-x paths.
  assert path_counts.surviving_fraction(54, 1, 20) == pytest.approx(1 - 20 / 54)


def test_total_gradient_of_geometric_norms():
  n, r = 54, 0.6
  norms = [r**k for k in range(n + 1)]
  total = path_counts.total_gradient(n, norms)
  assert total.dtype == np.float64 and total.shape == (n + 1,)
  expected = np.array([float(comb(n, k)) * r**k for k in range(n + 1)])
  np.testing.assert_allclose(total, expected, rtol=1e-15)
  assert float(total.sum()) == pytest.approx((1 + r)**n, rel=1e-12)  # binomial theorem
  assert total[27] == pytest.approx(comb(54, 27) * r**27, rel=1e-15)
  # The product is Binomial(n, r/(1+r)), peaked near n*r/(1+r) = 20.25, far below n/2.
  assert int(np.argmax(total)) == 20


def test_log10_mean_and_std_are_those_of_the_values_at_any_magnitude():
  rng = np.random.default_rng(0)
  values = rng.lognormal(size=(5, 7))  # 5 lengths, 7 samples each
  values[2, 3] = 0.0  # an exact zero counts as one
  with np.errstate(divide="ignore"):
    log10 = np.log10(values)
  mean, std = path_counts.log10_mean_std(log10)
  np.testing.assert_allclose(mean, np.log10(values.mean(1)), atol=1e-12)
  np.testing.assert_allclose(std, np.log10(values.std(1)), atol=1e-12)
  # The same values 400 decades down (below float64) give the same numbers, 400 lower.
  shifted_mean, shifted_std = path_counts.log10_mean_std(log10 - 400)
  np.testing.assert_allclose(shifted_mean, mean - 400, atol=1e-12)
  np.testing.assert_allclose(shifted_std, std - 400, atol=1e-12)
  zeros, spread = path_counts.log10_mean_std(np.full((1, 3), -np.inf))  # all zero: log10 0 = -inf
  assert zeros[0] == -np.inf and spread[0] == -np.inf
  with pytest.raises(ValueError, match="finite or -inf"):
    path_counts.log10_mean_std([[0.0, np.nan]])


def test_log10_total_gradient_is_the_log_of_the_total_gradient():
  n, r = 54, 0.2
  norms = np.array([r**k for k in range(n + 1)])
  np.testing.assert_allclose(path_counts.log10_total_gradient(n, np.log10(norms)),
                             np.log10(path_counts.total_gradient(n, norms)), atol=1e-12)
  # Far below float64's range (a 1,000-block network): still finite, the same interval.
  deep = path_counts.log10_total_gradient(n, np.log10(norms) - 500)
  assert np.all(np.isfinite(deep))
  assert (path_counts.effective_interval(path_counts.relative_weights(deep), 0.9)
          == path_counts.effective_interval(path_counts.total_gradient(n, norms), 0.9))
  weights = path_counts.relative_weights([-1000.0, -999.0, -np.inf])
  np.testing.assert_allclose(weights, [0.1, 1.0, 0.0])
  with pytest.raises(ValueError, match="n\\+1=55 entries"):
    path_counts.log10_total_gradient(n, [0.0])
  with pytest.raises(ValueError, match="finite or -inf"):
    path_counts.log10_total_gradient(1, [0.0, np.inf])


def _brute_force_interval(w, mass):
  """All intervals, scored (length, -mass, lo) as the spec says."""
  w = np.asarray(w, dtype=np.float64)
  target = mass * w.sum() * (1 - 1e-12)
  best = None
  for lo in range(len(w)):
    for hi in range(lo, len(w)):
      got = w[lo:hi + 1].sum()
      if got >= target:
        key = (hi - lo, -got, lo, hi)
        best = key if best is None or key[:3] < best[:3] else best
  return best[2], best[3]


def test_effective_interval_matches_brute_force_on_random_weights():
  rng = np.random.default_rng(0)
  for case in range(50):
    size = int(rng.integers(1, 40))
    w = rng.exponential(size=size) * (rng.random(size) < 0.8)  # some exact zeros
    if w.sum() == 0:
      w[0] = 1.0
    mass = float(rng.choice([0.1, 0.5, 0.9, 0.99, 1.0, rng.uniform(0.01, 1.0)]))
    assert path_counts.effective_interval(w, mass) == _brute_force_interval(w, mass), (case, w, mass)


def test_effective_interval_hand_made():
  w = [0, 1, 5, 3, 1, 0, 0, 10]  # total 20
  assert path_counts.effective_interval(w, 0.5) == (7, 7)    # 10 alone is half
  assert path_counts.effective_interval(w, 0.45) == (7, 7)
  assert path_counts.effective_interval(w, 0.55) == (4, 7)   # 11: only 1+0+0+10 in four slots
  assert path_counts.effective_interval(w, 0.7) == (3, 7)    # 14 = 3+1+0+0+10 exactly
  assert path_counts.effective_interval(w, 0.75) == (2, 7)   # 15 needs the 5 as well
  assert path_counts.effective_interval([0, 1, 5, 3, 1, 0, 0, 2], 0.5) == (2, 3)  # 8 of 12 > 6
  assert path_counts.effective_interval(w, 1.0) == (1, 7)    # leading zero is trimmed
  # Equal length, equal-or-more mass: larger mass wins, then lower lo.
  assert path_counts.effective_interval([3, 1, 3], 0.5) == (0, 1)  # [0,1] and [1,2] both hold 4/7
  assert path_counts.effective_interval([1, 2, 1, 3], 0.3) == (3, 3)
  assert path_counts.effective_interval([2, 1, 2, 1, 2], 0.3) == (0, 1)
  assert path_counts.effective_interval([1, 2, 2, 1], 0.4) == (1, 2)


def test_effective_interval_on_paper_like_gradient():
  """A geometric-decay gradient profile concentrates the 90 % interval on short paths."""
  total = path_counts.total_gradient(54, [0.6**k for k in range(55)])
  lo, hi = path_counts.effective_interval(total, 0.9)
  assert lo <= 20 <= hi and hi < 27
  assert total[lo:hi + 1].sum() >= 0.9 * total.sum()


@pytest.mark.parametrize("call, fragment", [
    (lambda: path_counts.path_counts(0), "n must be >= 1"),
    (lambda: path_counts.path_counts(-3), "got -3"),
    (lambda: path_counts.path_counts(2.0), "integer"),
    (lambda: path_counts.path_length_distribution(0), "n must be >= 1"),
    (lambda: path_counts.share_of_paths(0, 0, 0), "n must be >= 1"),
    (lambda: path_counts.share_of_paths(54, 20, 19), "lo=20 must be <= hi=19"),
    (lambda: path_counts.share_of_paths(54, -1, 5), "lo=-1 is outside the valid path lengths 0..54"),
    (lambda: path_counts.share_of_paths(54, 0, 55), "hi=55 is outside the valid path lengths 0..54"),
    (lambda: path_counts.surviving_fraction(54, 55, 1), "d=55 deleted blocks is outside the valid range 0..54"),
    (lambda: path_counts.surviving_fraction(54, -1, 1), "d=-1"),
    (lambda: path_counts.surviving_fraction(54, 1, 55), "x=55 is outside the valid path lengths 0..54"),
    (lambda: path_counts.surviving_fraction(54, 1, -2), "x=-2"),
    (lambda: path_counts.surviving_fraction(0, 0, 0), "n must be >= 1"),
    (lambda: path_counts.total_gradient(3, [1.0, 1.0, 1.0]), "n+1=4 entries"),
    (lambda: path_counts.total_gradient(0, [1.0]), "n must be >= 1"),
    (lambda: path_counts.total_gradient(1, [1.0, np.nan]), "finite"),
    (lambda: path_counts.effective_interval([1, 2], 0.0), "mass must be in (0, 1], got 0.0"),
    (lambda: path_counts.effective_interval([1, 2], 1.5), "got 1.5"),
    (lambda: path_counts.effective_interval([1, 2], -0.1), "mass must be in (0, 1]"),
    (lambda: path_counts.effective_interval([], 0.9), "non-empty"),
    (lambda: path_counts.effective_interval([0, 0, 0], 0.9), "not all be zero"),
    (lambda: path_counts.effective_interval([1, -2, 3], 0.9), "got minimum -2.0 at index 1"),
    (lambda: path_counts.effective_interval([[1, 2]], 0.9), "1-D"),
    (lambda: path_counts.effective_interval([1, np.inf], 0.9), "finite"),
])
def test_bad_input_raises_value_error_naming_the_problem(call, fragment):
  with pytest.raises(ValueError) as info:
    call()
  assert fragment in str(info.value)
