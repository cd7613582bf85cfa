import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Embedded data sets go to a cache private to this test session."""
    cache = tmp_path_factory.mktemp("vbcache")
    old = os.environ.get("VISIONBENCH_CACHE")
    os.environ["VISIONBENCH_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("VISIONBENCH_CACHE", None)
    else:
        os.environ["VISIONBENCH_CACHE"] = old
