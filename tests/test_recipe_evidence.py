"""Paired interval, verdict words and seeds-needed formula of the trial protocol."""

from __future__ import annotations

import math

import pytest

from workbench.recipe import interval_from_differences, paired_interval, power_sentence, seeds_needed, verdict_word
from workbench.recipe.evidence import PairedInterval

# Student's sleep data (Cushny & Peebles; "Student" 1908): extra hours of sleep of 10 patients under
# two drugs. The textbook paired t-test of drug 2 - drug 1:
#   d = 1.2 2.4 1.3 1.3 0.0 1.0 1.8 0.8 4.6 1.4, sum 15.8 -> mean 1.58
#   squared deviations 0.1444 0.6724 0.0784 0.0784 2.4964 0.3364 0.0484 0.6084 9.1204 0.0324 sum 13.616
#   sd = sqrt(13.616 / 9) = 1.229995; se = sd / sqrt(10) = 0.388958
#   t_{0.975, 9} = 2.262157; half-width = 0.879886 -> 95% CI (0.700114, 2.459886), t = 1.58 / se = 4.0621
DRUG_1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
DRUG_2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]


def test_interval_matches_the_textbook_paired_t_example():
    iv = paired_interval(DRUG_1, DRUG_2)
    assert iv.n == 10
    assert iv.mean == pytest.approx(1.58, abs=1e-12)
    assert iv.sd == pytest.approx(1.229995, abs=1e-6)
    assert iv.t == pytest.approx(2.262157, abs=1e-6)
    assert iv.low == pytest.approx(0.700114, abs=1e-6)
    assert iv.high == pytest.approx(2.459886, abs=1e-6)
    assert iv.mean / (iv.sd / math.sqrt(iv.n)) == pytest.approx(4.0621, abs=1e-4)
    # the direction of the difference is treatment - reference
    swapped = paired_interval(DRUG_2, DRUG_1)
    assert swapped.mean == pytest.approx(-1.58) and swapped.high == pytest.approx(-0.700114, abs=1e-6)


def test_interval_of_two_seeds_uses_one_degree_of_freedom():
    # d = (1, 3): mean 2, sd sqrt(2), t_{0.975,1} = 12.7062 -> half-width 12.7062 * sqrt(2) / sqrt(2) = 12.7062
    iv = interval_from_differences([1.0, 3.0])
    assert iv.half_width == pytest.approx(12.7062, abs=1e-4)


def _interval(low: float, high: float) -> PairedInterval:
    return PairedInterval(n=5, mean=(low + high) / 2, sd=1.0, low=low, high=high, confidence=0.95, t=2.78)


@pytest.mark.parametrize("low, high, greater, less", [
    (0.1, 0.5, "supports", "contradicts"),     # excludes 0, above
    (-0.5, -0.1, "contradicts", "supports"),   # excludes 0, below
    (-0.1, 0.5, "inconclusive", "inconclusive"),
    (0.0, 0.5, "inconclusive", "inconclusive"),  # an end at 0 counts as containing it
])
def test_verdict_follows_the_interval_in_both_claim_directions(low, high, greater, less):
    assert verdict_word(_interval(low, high), "greater") == greater
    assert verdict_word(_interval(low, high), "less") == less


def test_verdict_of_the_textbook_example_and_bad_direction():
    iv = paired_interval(DRUG_1, DRUG_2)
    assert verdict_word(iv, "greater") == "supports"
    assert verdict_word(iv, "less") == "contradicts"
    with pytest.raises(ValueError, match=r"direction='up' is not valid; allowed: \('greater', 'less'\)"):
        verdict_word(iv, "up")


def test_seeds_needed_against_hand_computation():
    # mean 1.58, sd 1.23: n = 4: t_{0.975,3} 3.1824 * 1.23 / 2 = 1.957 >= 1.58;
    # n = 5: t_{0.975,4} 2.7764 * 1.23 / sqrt(5) = 1.527 < 1.58 -> 5 seeds
    assert seeds_needed(1.58, 1.23) == 5
    assert seeds_needed(-1.58, 1.23) == 5
    # sd 0 and a nonzero effect: 2 seeds decide; a zero effect is never decided
    assert seeds_needed(0.3, 0.0) == 2
    assert seeds_needed(0.0, 1.0) is None
    # effect 0.01 against sd 1: n ~ (1.96 / 0.01)^2 ~ 38,000 > 1000 seeds
    assert seeds_needed(0.01, 1.0) is None
    assert seeds_needed(0.01, 1.0, max_seeds=100_000) > 30_000
    assert "not reachable" in power_sentence(interval_from_differences([-0.01, 0.01, 0.0]))
    assert "about 5 seeds" in power_sentence(PairedInterval(3, 1.58, 1.23, 0.0, 3.0, 0.95, 4.3))


@pytest.mark.parametrize("values, message", [
    ([0.5], r"1 paired difference\(s\) given; allowed: at least 2 seeds"),
    ([], r"0 paired difference\(s\) given; allowed: at least 2 seeds"),
    ([0.1, float("nan")], r"NaN or infinity"),
])
def test_interval_refuses_too_few_or_bad_differences(values, message):
    with pytest.raises(ValueError, match=message):
        interval_from_differences(values)


def test_interval_refuses_unpaired_lengths_and_bad_confidence():
    with pytest.raises(ValueError, match="reference has 2 values and treatment 3"):
        paired_interval([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match=r"confidence=1.5 is not valid; allowed: a number in \(0, 1\)"):
        interval_from_differences([1, 2], confidence=1.5)
