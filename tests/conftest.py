import pytest
import torch

from pipeline.train.loop import use_cpu_deepspeed

# DeepSpeed picks its accelerator at import time; on a CPU-only host it must be told before any test imports it.
if not torch.cuda.is_available():
    use_cpu_deepspeed()


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole test session, with spare logical CPUs so Ray Data never starves."""
    import ray

    # the dashboard serves Ray's state API, which the fault tests use to find worker processes
    ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory):
    """scikit-learn's digits as 32 px shards, written once per test session at an absolute path (jobs submitted to
    a Ray head run in another working dir)."""
    from pipeline.data.shard_writer import DIGITS_SHARD_SIZE, write_source
    from pipeline.data.sources import digits_source

    folder = tmp_path_factory.mktemp("digits")
    write_source(digits_source(img_size=32), str(folder), max_count=DIGITS_SHARD_SIZE, max_size=1 << 30,
                 progress=False)
    return folder
