import json
import os
import re
from datetime import datetime, timedelta, timezone

import pytest

from visionbench.errors import UserError
from visionbench.results.records import (
    atomic_write_json,
    atomic_write_text,
    config_hash,
    environment_info,
    is_finished,
    make_run_id,
    read_metrics,
)


def test_atomic_write_json_roundtrip(tmp_path):
    path = tmp_path / "sub" / "metrics.json"
    atomic_write_json(path, {"a": 1, "path": tmp_path})
    assert json.loads(path.read_text()) == {"a": 1, "path": str(tmp_path)}
    assert os.listdir(path.parent) == ["metrics.json"]


def test_atomic_write_json_keeps_old_file_when_serialisation_fails(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write_json(path, {"status": "finished"})
    before = path.read_bytes()
    with pytest.raises(TypeError):
        atomic_write_json(path, {"status": "running", "bad": object()})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_atomic_write_text_keeps_old_file_when_write_fails(tmp_path):
    path = tmp_path / "report.md"
    atomic_write_text(path, "old\n")
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(path, "half \udcff")  # a lone surrogate cannot be encoded
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["report.md"]
    atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n"
    assert os.listdir(tmp_path) == ["report.md"]


def test_config_hash_is_stable_under_key_order_and_changes_with_values():
    a = {"model": {"backbone": "vit_tiny", "norm": "layernorm"}, "seed": 0, "lr": 1e-3}
    b = {"lr": 1e-3, "seed": 0, "model": {"norm": "layernorm", "backbone": "vit_tiny"}}
    assert config_hash(a) == config_hash(b)
    assert re.fullmatch(r"[0-9a-f]{8}", config_hash(a))
    assert config_hash({**a, "seed": 1}) != config_hash(a)
    assert config_hash({**a, "model": {**a["model"], "norm": "dyt"}}) != config_hash(a)


def test_make_run_id_uses_utc():
    now = datetime(2026, 11, 27, 13, 4, 5, tzinfo=timezone(timedelta(hours=1)))
    assert make_run_id("mae", "ab12cd34", now) == "20261127T120405Z-mae-ab12cd34"
    naive = datetime(2026, 1, 2, 3, 4, 5)
    expected = "20260102T030405Z-unip-infrared-00ff00ff"
    assert make_run_id("unip-infrared", "00ff00ff", naive) == expected
    assert re.fullmatch(r"\d{8}T\d{6}Z-mae-ab12cd34", make_run_id("mae", "ab12cd34"))


@pytest.mark.parametrize(("experiment", "cfg_hash"), [("a/b", "ab12cd34"), ("mae", "XYZ")])
def test_make_run_id_rejects_bad_parts(experiment, cfg_hash):
    with pytest.raises(UserError):
        make_run_id(experiment, cfg_hash)


def test_environment_info_records_context(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not a git repository
    info = environment_info("bf16-mixed", "cpu")
    assert info["precision"] == "bf16-mixed" and info["device"] == "cpu"
    assert info["git_commit"] is None and info["git_dirty"] is None
    assert set(info["packages"]) >= {"torch", "torchvision", "timm", "lightning", "numpy"}
    assert info["python"].count(".") == 2
    assert isinstance(info["cuda_available"], bool)
    assert info["cpu_count"] >= 1
    json.dumps(info)


def test_read_metrics_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="metrics.json: missing"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.json").write_text("{not json")
    with pytest.raises(UserError, match=r"metrics.json: invalid JSON at line 1"):
        read_metrics(tmp_path)
    assert not is_finished(tmp_path)
    (tmp_path / "metrics.json").write_text(json.dumps({"status": "finished", "results": [{}]}))
    with pytest.raises(UserError, match=r"results\[0\] lacks init"):
        read_metrics(tmp_path)


def test_is_finished(tmp_path):
    atomic_write_json(tmp_path / "metrics.json", {"status": "failed", "results": []})
    assert not is_finished(tmp_path)
    atomic_write_json(tmp_path / "metrics.json", {"status": "finished", "results": []})
    assert is_finished(tmp_path)
    assert read_metrics(tmp_path)["status"] == "finished"


def test_environment_info_records_git_commit_and_dirty(tmp_path, monkeypatch):
    import shutil
    import subprocess

    if shutil.which("git") is None:
        pytest.skip("git not installed")

    def git(*args):
        subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
            cwd=tmp_path, check=True, capture_output=True,
        )  # fmt: skip

    git("init", "-q")
    (tmp_path / "a.txt").write_text("a")
    git("add", "a.txt")
    git("commit", "-q", "-m", "a")
    monkeypatch.chdir(tmp_path)
    info = environment_info("32-true", "cpu")
    assert re.fullmatch(r"[0-9a-f]{40}", info["git_commit"]) and info["git_dirty"] is False
    (tmp_path / "a.txt").write_text("b")
    assert environment_info("32-true", "cpu")["git_dirty"] is True
