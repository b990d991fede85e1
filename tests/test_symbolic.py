"""Box evaluation (analysis/symbolic.py) is sound: over random expressions and random boxes,
every value at every point lies in the computed interval; a boolean is `certain` only if it
holds at every point and `possible` whenever it holds at one. Many boxes are evaluated in one
batch, as tile analysis does, and the overflow-clamped path is checked with huge constants."""
from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnc.analysis.symbolic import evaluate_boxes, fits
from attnc.ir import nodes as N
from tests.test_intervals import _NoValue, _points, _value, guards, int_exprs, ranges_strategy

BOXES = st.lists(ranges_strategy(), min_size=1, max_size=6)


def _batch(boxes):
    keys = list(boxes[0])
    return {k: (np.array([b[k][0] for b in boxes]), np.array([b[k][1] for b in boxes])) for k in keys}


def _values(e, box):
    out = []
    for point in _points(box, limit=200):
        try:
            out.append(_value(e, point))
        except _NoValue:
            pass  # a division by zero is never a value
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(e=int_exprs(), boxes=BOXES, safe=st.booleans())
def test_integer_intervals_hold_at_every_point(e, boxes, safe):
    if safe and not all(fits(e, {}, b) for b in boxes):
        safe = False
    lo, hi = (np.broadcast_to(x, len(boxes)) for x in evaluate_boxes(e, {}, _batch(boxes), len(boxes), safe=safe))
    for n, box in enumerate(boxes):
        for v in _values(e, box):
            assert lo[n] <= v <= hi[n], (e, box, v, lo[n], hi[n])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(e=guards(), boxes=BOXES)
def test_three_valued_booleans_are_sound(e, boxes):
    certain, possible = (np.broadcast_to(x, len(boxes)) for x in evaluate_boxes(e, {}, _batch(boxes), len(boxes)))
    for n, box in enumerate(boxes):
        vals = _values(e, box)
        if certain[n]:
            assert all(vals), (e, box)
        if not possible[n]:
            assert not any(vals), (e, box)


def test_differences_of_independent_boxes_are_exact():
    # q.i - k.i over two boxes: exactly the extremes, so windows and causal classify exactly.
    e = N.Binary("<=", N.Unary("abs", N.Binary("-", N.Coord("q", "i"), N.Coord("k", "i"))), N.Const(3))
    coords = {("q", "i"): (np.array([0, 0, 0]), np.array([3, 3, 3])),
              ("k", "i"): (np.array([0, 4, 7]), np.array([3, 6, 9]))}
    certain, possible = evaluate_boxes(e, {}, coords, 3)
    assert certain.tolist() == [True, False, False] and possible.tolist() == [True, True, False]


def test_products_that_would_wrap_are_clamped_not_wrapped():
    big = N.Const(2**40)
    e = N.Binary("*", N.Binary("*", N.Coord("q", "i"), big), big)  # up to 2**83: beyond int64
    coords = {("q", "i"): (np.array([1]), np.array([5]))}
    assert not fits(e, {}, {("q", "i"): (1, 5)})
    lo, hi = evaluate_boxes(e, {}, coords, 1)
    assert (lo[0], hi[0]) == (-(2**62), 2**62)  # clamped (only guards reach this), never wrapped


@settings(max_examples=200, deadline=None)
@given(base=st.integers(-20, 20), stride=st.integers(0, 6), count=st.integers(1, 8), c=st.integers(1, 7),
       e=int_exprs(2))
def test_congruences_make_remainders_exact_and_stay_sound(base, stride, count, c, e):
    """A coordinate known to be base + stride * t (a dilation group's tokens) has an exact
    remainder by any divisor of its stride; every other expression stays sound."""
    values = [base + stride * t for t in range(count)]
    box = {("q", "i"): (np.array([min(values)]), np.array([max(values)])),
           ("k", "i"): (np.array([0]), np.array([3])), ("q", "y"): (np.array([0]), np.array([0]))}
    mods = {("q", "i"): (np.array([stride]), np.array([min(values)]))}
    rem = N.Binary("%", N.Coord("q", "i"), N.Const(c))
    lo, hi = evaluate_boxes(rem, {}, box, 1, mods=mods)
    assert lo[0] <= min(v % c for v in values) and max(v % c for v in values) <= hi[0]
    if stride % c == 0:
        assert lo[0] == hi[0] == values[0] % c
    lo, hi = (np.broadcast_to(x, 1) for x in evaluate_boxes(e, {}, box, 1, mods=mods))
    for v in values:
        for kv in range(4):
            try:
                val = _value(e, {("q", "i"): v, ("k", "i"): kv, ("q", "y"): 0})
            except _NoValue:
                continue
            assert lo[0] <= val <= hi[0]
