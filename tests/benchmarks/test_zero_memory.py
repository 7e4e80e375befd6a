import pytest

from pipeline.benchmarks.zero_memory import _category, summarise_memory


def test_paths_name_their_category_buckets_first():
    assert _category("optimizer.ipg_buffer[0]", "optimizer") == "buckets"
    assert _category("optimizer.grad_bucket", "optimizer") == "buckets"
    assert _category("optimizer.averaged_gradients[0]", "optimizer") == "grads"
    assert _category("optimizer.optimizer.state[0][exp_avg]", "optimizer") == "optimizer"


def test_summary_takes_the_larger_rank_and_ratios_to_zero_0_of_the_same_precision():
    def counted(params, grads, optimizer, buckets):
        return {"bytes": {"params": params, "grads": grads, "optimizer": optimizer, "buckets": buckets},
                "largest": {}, "num_params": 10}

    per_rank = [{"fp32 ZeRO-0": counted(40, 40, 80, 100), "fp32 ZeRO-3": counted(20, 10, 40, 30),
                 "bf16 ZeRO-0": counted(20, 20, 120, 0)},
                {"fp32 ZeRO-0": counted(40, 40, 80, 100), "fp32 ZeRO-3": counted(20, 20, 40, 0),
                 "bf16 ZeRO-0": counted(20, 20, 120, 0)}]
    rows = summarise_memory(per_rank)
    assert rows["fp32 ZeRO-3"]["state"] == 80 and rows["fp32 ZeRO-3"]["with_buckets"] == 80  # rank 1: more state
    assert rows["fp32 ZeRO-3"]["ratio"] == pytest.approx(80 / 160)
    assert rows["fp32 ZeRO-3"]["ratio_with_buckets"] == pytest.approx(80 / 260)
    assert rows["bf16 ZeRO-0"]["ratio"] == rows["fp32 ZeRO-0"]["ratio"] == 1
    assert rows["fp32 ZeRO-0"]["num_params"] == 10
