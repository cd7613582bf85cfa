"""The benchmark scripts are not timed in tests; this only checks they still import and parse."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.mark.parametrize("script", ["mae_step.py", "probe_sweep.py", "norm_inference.py",
                                    "videomae_step.py", "video_decode.py",
                                    "bootstrap_map.py"])
def test_benchmark_script_starts(script):
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout
