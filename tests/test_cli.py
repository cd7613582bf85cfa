"""Usage errors through the installed console script: click's usage message, exit code 2."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = shutil.which("visionbench", path=str(Path(sys.executable).parent)) or "visionbench"


@pytest.mark.parametrize("args,needle", [
    (["run"], "Missing argument"),
    (["run", "mae", "--max-epochs", "abc"], "Invalid value for '--max-epochs'"),
    (["run", "mae", "--no-such-option"], "No such option: --no-such-option"),
    (["frobnicate"], "No such command 'frobnicate'"),
])
def test_usage_errors_exit_2_with_the_usage_line_and_no_traceback(tmp_path, args, needle):
    result = subprocess.run([SCRIPT, *args], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "_click" not in result.stderr
    assert result.stderr.startswith("Usage: visionbench"), result.stderr
    assert needle in result.stderr
    assert not (tmp_path / "results").exists()
