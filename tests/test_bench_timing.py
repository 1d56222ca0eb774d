"""benchmarks/timing.py: the interleaved medians every timing benchmark reports."""

from benchmarks.timing import interleaved_medians


def test_each_variant_is_measured_in_turn_after_one_warm_up_and_its_median_reported():
    order, values = [], {"a": iter([100.0, 1.0, 3.0, 2.0]), "b": iter([50.0, 5.0, 4.0, 6.0])}

    def measure(name):
        order.append(name)
        return next(values[name])

    medians = interleaved_medians({"a": "a", "b": "b"}, repeats=3, measure=measure)
    assert order == ["a", "b"] * 4  # warm-up, then A, B, A, B, ...: drifting load hits both alike
    assert medians == {"a": 2.0, "b": 5.0}  # the warm-up values (100, 50) are not counted


def test_by_default_a_variant_is_a_callable_and_its_seconds_are_measured():
    calls = []
    medians = interleaved_medians({"x": lambda: calls.append(1)}, repeats=2)
    assert len(calls) == 3 and 0.0 <= medians["x"] < 1.0
