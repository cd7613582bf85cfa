import re

import pytest

from visionbench.errors import UserError
from visionbench.results.records import atomic_write_json
from visionbench.results.report import write_report

RUN_ID = "20261127T120000Z-mae-ab12cd34"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_evals(run_dir, init, best_top1):
    grid = [
        {"lr": lr, "weight_decay": wd, "val_top1": 60.0 + 10 * i + j, "val_top5": 95.0}
        for i, lr in enumerate([0.01, 0.1]) for j, wd in enumerate([0.0, 1e-4])
    ]  # fmt: skip
    atomic_write_json(run_dir / "evals" / init / "linear_probe.json", {
        "grid": grid, "best": {"lr": 0.1, "weight_decay": 1e-4},
        "test_top1": best_top1, "test_top5": 97.5,
        "classes": ["circle", "square", "triangle"], "per_class_acc": [90.0, 80.0, 70.5],
    })  # fmt: skip
    atomic_write_json(run_dir / "evals" / init / "knn.json", {
        "k20_t0.07": {"top1": 55.5, "top5": 90.0}, "k5_majority": {"top1": 50.25},
    })  # fmt: skip


def write_metrics(run_dir):
    atomic_write_json(run_dir / "metrics.json", {
        "run_id": RUN_ID, "experiment": "mae", "paper": "MAE", "method": "mae",
        "backbone": "vit_tiny_p4_32", "norm": "layernorm", "placement": "pre",
        "dataset": "shapes", "seed": 0, "epochs": 30, "precision": "32-true", "device": "cpu",
        "wall_s": 201.5, "timestamp": "2026-11-27T12:00:00Z", "config_hash": "ab12cd34",
        "status": "finished",
        "results": [{"init": "mae", "protocol": "linear_probe", "metric": "top1", "value": 83.45},
                    {"init": "random", "protocol": "finetune", "metric": "top1", "value": 61.0}],
    })  # fmt: skip


@pytest.fixture
def run_dir(tmp_path):
    run_dir = tmp_path / RUN_ID
    write_evals(run_dir, "mae", 83.45)
    write_evals(run_dir, "random", 41.2)
    atomic_write_json(run_dir / "evals" / "random" / "finetune.json", {
        "test_top1": 61.0, "test_top5": 92.0, "epochs": 2,
        "history": [{"epoch": 0, "train_loss": 2.5, "val_top1": 40.0},
                    {"epoch": 1, "train_loss": 1.25, "val_top1": 58.0}],
    })  # fmt: skip
    (run_dir / "figures").mkdir()
    (run_dir / "figures" / "mae_reconstruction.png").write_bytes(PNG_MAGIC + b"fake")
    return run_dir


def test_report_from_full_run(run_dir):
    write_metrics(run_dir)
    path = write_report(run_dir)
    assert path == run_dir / "report.md"
    text = path.read_text()
    assert text.startswith(f"# mae: {RUN_ID}")
    for expected in ("vit_tiny_p4_32", "layernorm", "32-true", "ab12cd34", "3m 21.5s",
                     "| mae | linear_probe | top1 | 83.45 |", "**83.45**", "**41.20**",
                     "## kNN: init `mae`", "| k5_majority | 50.25 | – |",
                     "## Fine-tune: init `random`", "| 1 | 1.2500 | 58.00 |",
                     "| 0.1 | 0.0001 | 71.00 (best) | 95.00 |"):  # fmt: skip
        assert expected in text, expected
    assert "Fine-tune: init `mae`" not in text

    figures = run_dir / "figures"
    for init in ("mae", "random"):
        for name in (f"probe_grid_{init}.png", f"per_class_{init}.png"):
            data = (figures / name).read_bytes()
            assert data.startswith(PNG_MAGIC) and len(data) > 1000
            assert f"](figures/{name})" in text
    assert "![mae_reconstruction](figures/mae_reconstruction.png)" in text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(links) == 5 and all(not link.startswith("/") for link in links)
    assert sorted(p.name for p in run_dir.iterdir()) == ["evals", "figures", "metrics.json",
                                                         "report.md"]  # fmt: skip

    # rerunning regenerates the same figures without listing them twice
    assert write_report(run_dir).read_text() == text


def test_report_before_metrics_uses_evals(run_dir):
    text = write_report(run_dir).read_text()
    assert "metrics.json is not written yet" in text
    assert "| Experiment | mae |" in text and "| Config hash | ab12cd34 |" in text
    assert "| mae | linear_probe | top1 | 83.45 |" in text
    assert "| random | knn_k20_t0.07 | top5 | 90.00 |" in text
    assert "| random | finetune | top1 | 61.00 |" in text


def test_report_skips_missing_parts(tmp_path):
    run_dir = tmp_path / RUN_ID
    atomic_write_json(run_dir / "evals" / "mae" / "knn.json", {"k20_t0.07": {"top1": 12.5}})
    text = write_report(run_dir).read_text()
    assert "| k20_t0.07 | 12.50 | – |" in text
    assert "Linear probe" not in text and "Fine-tune" not in text
    assert not (run_dir / "figures").exists()


def test_report_errors(tmp_path):
    with pytest.raises(UserError, match="not a directory"):
        write_report(tmp_path / "nope")
    with pytest.raises(UserError, match="not a run folder"):
        write_report(tmp_path)
    (tmp_path / "metrics.json").write_text("{")
    with pytest.raises(UserError, match="metrics.json: invalid JSON"):
        write_report(tmp_path)
    assert not (tmp_path / "report.md").exists()
