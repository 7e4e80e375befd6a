import pytest

from pipeline.benchmarks.train_overhead import summarise_overhead


def test_summary_ratios_are_to_the_first_contender_overall_per_round_and_fastest():
    times_s = {"plain torch": [[1.0, 1.0], [2.0, 2.0]], "Ray Train + DeepSpeed ZeRO-0": [[1.5, 1.5], [2.0, 2.0]]}
    summary = summarise_overhead(times_s)
    ds = "Ray Train + DeepSpeed ZeRO-0"
    assert summary["median_step_s"] == {"plain torch": 1.5, ds: 1.75}
    assert summary["fastest_step_s"] == {"plain torch": 1.0, ds: 1.5}
    assert set(summary["ratio"]) == set(summary["round_ratio"]) == set(summary["fastest_ratio"]) == {ds}
    assert summary["ratio"][ds] == pytest.approx(1.75 / 1.5)
    assert summary["round_ratios"][ds] == pytest.approx([1.5, 1.0])
    assert summary["round_ratio"][ds] == pytest.approx(1.25)
    assert summary["fastest_ratio"][ds] == pytest.approx(1.5)
