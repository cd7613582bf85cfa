import os

import pytest

# Under pytest-xdist (`make test` runs `-n auto`) the workers split the cores between them,
# torch in each worker and in the CLI subprocesses its tests start: with every process on
# all the cores, two workers on 2 cores spent most of their gain in contention.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = str(max(1, (os.cpu_count() or 1) // _WORKERS))
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_name, _THREADS)

    import torch

    torch.set_num_threads(int(_THREADS))


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Embedded data sets go to a cache private to this test session, shared by its
    pytest-xdist workers (each generator writes a data set once, atomically)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's folder above the workers' own
    cache = base / "vbcache"
    cache.mkdir(exist_ok=True)
    old = os.environ.get("VISIONBENCH_CACHE")
    os.environ["VISIONBENCH_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("VISIONBENCH_CACHE", None)
    else:
        os.environ["VISIONBENCH_CACHE"] = old
