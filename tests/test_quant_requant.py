"""Requantization against an independent exact rational computation (including exact ties)."""

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeprune.errors import EdgepruneError
from edgeprune.quantize.requant import (quantize_multiplier, requantize, rounding_shift,
                                        shared_shift_multipliers)

INT32 = st.integers(-(2 ** 31), 2 ** 31 - 1)


def exact(acc: int, m: int, shift: int, zp: int, lo: int, hi: int) -> int:
    """round-half-up(acc * M / 2**(31 - shift)) + zp, clamped: exact rationals, no shifts."""
    v = Fraction(acc * m, 2 ** (31 - shift))
    r = math.floor(v + Fraction(1, 2))
    return min(max(r + zp, lo), hi)


@settings(max_examples=400, deadline=None)
@given(acc=INT32, m=st.integers(2 ** 30, 2 ** 31 - 1), shift=st.integers(-31, 30),
       zp=st.integers(-128, 127))
def test_requantize_matches_rational(acc, m, shift, zp):
    got = requantize(np.array([acc]), m, shift, zp, -(2 ** 40), 2 ** 40)[0]
    assert int(got) == exact(acc, m, shift, zp, -(2 ** 40), 2 ** 40)


@settings(max_examples=300, deadline=None)
@given(k=st.integers(-(2 ** 20), 2 ** 20), r=st.integers(1, 10), zp=st.integers(-128, 127))
def test_exact_ties_round_up(k, r, zp):
    # M = 3 * 2**29 and acc = (2k+1) * 2**(r-1) give acc * M = (2k+1) * 3 * 2**(s-1) with
    # s = 29 + r: exactly halfway between two integers, for positive and negative acc.
    m = 3 * 2 ** 29
    acc = (2 * k + 1) * 2 ** (r - 1)
    s = 29 + r
    shift = 31 - s
    prod = acc * m
    assert prod % (2 ** s) == 2 ** (s - 1)                  # really a tie
    got = int(requantize(np.array([acc]), m, shift, zp, -(2 ** 40), 2 ** 40)[0])
    assert got - zp == math.ceil(Fraction(prod, 2 ** s))   # ties go towards +infinity
    assert got == exact(acc, m, shift, zp, -(2 ** 40), 2 ** 40)


@settings(max_examples=200, deadline=None)
@given(acc=st.lists(INT32, min_size=1, max_size=20), lo=st.integers(-128, 0),
       width=st.integers(0, 255), zp=st.integers(-128, 127),
       real=st.floats(2.0 ** -40, 2.0 ** 10, allow_nan=False, allow_infinity=False))
def test_requantize_clamps_and_vectorises(acc, lo, width, zp, real):
    m, shift = quantize_multiplier(real)
    hi = lo + width
    got = requantize(np.array(acc, np.int64), m, shift, zp, lo, hi)
    want = [exact(a, m, shift, zp, lo, hi) for a in acc]
    assert got.tolist() == want


@settings(max_examples=300, deadline=None)
@given(real=st.floats(2.0 ** -31, 2.0 ** 29, allow_nan=False, allow_infinity=False))
def test_quantize_multiplier_precision(real):
    m, shift = quantize_multiplier(real)
    assert 2 ** 30 <= m < 2 ** 31
    assert 1 <= 31 - shift <= 62
    approx = Fraction(m) * Fraction(2) ** (shift - 31)
    assert abs(approx - Fraction(real)) <= Fraction(real) * Fraction(1, 2 ** 31)


def test_quantize_multiplier_edges():
    assert quantize_multiplier(0.0) == (0, 30)
    assert quantize_multiplier(0.5) == (2 ** 30, 0)
    assert quantize_multiplier(1.0) == (2 ** 30, 1)
    m, shift = quantize_multiplier(2.0 ** -70)       # flushed: result is always 0
    assert requantize(np.array([2 ** 31 - 1, -(2 ** 31)]), m, shift, 0, -10, 10).tolist() == [0, 0]
    with pytest.raises(EdgepruneError):
        quantize_multiplier(-1.0)
    with pytest.raises(EdgepruneError):
        quantize_multiplier(2.0 ** 31)


def test_rounding_shift_negative_ties():
    x = np.array([-5, -3, -1, 1, 3, 5])
    assert rounding_shift(x, 1).tolist() == [-2, -1, 0, 1, 2, 3]   # -2.5 -> -2, 2.5 -> 3


@settings(max_examples=200, deadline=None)
@given(a=st.floats(1e-4, 100.0), b=st.floats(1e-4, 100.0))
def test_shared_shift_multipliers(a, b):
    (ma, mb), s = shared_shift_multipliers([a, b])
    assert 1 <= s <= 62 and max(ma, mb) < 2 ** 31
    assert max(ma, mb) >= 2 ** 29
    for r, m in ((a, ma), (b, mb)):
        assert abs(m / 2 ** s - r) <= 2.0 ** -(s + 1) * 1.0000001
