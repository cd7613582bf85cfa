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
                     "### linear_probe\n\n| init | metric | value |", "| mae | top1 | 83.45 |",
                     "### finetune", "| random | top1 | 61.00 |", "**83.45**", "**41.20**",
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
    assert "### linear_probe\n\n| init | metric | value |" in text
    assert "| mae | top1 | 83.45 |" in text
    assert "### knn_k20_t0.07" in text and "| random | top5 | 90.00 |" in text
    assert "### finetune" in text and "| random | top1 | 61.00 |" in text


def test_report_skips_missing_parts(tmp_path):
    run_dir = tmp_path / RUN_ID
    atomic_write_json(run_dir / "evals" / "mae" / "knn.json", {"k20_t0.07": {"top1": 12.5}})
    text = write_report(run_dir).read_text()
    assert "| classifier | top-1 |" in text and "| k20_t0.07 | 12.50 |" in text
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


def test_report_has_a_table_per_protocol_and_variant_with_intervals(tmp_path):
    run_dir = tmp_path / RUN_ID
    results = [
        {"init": "mae", "protocol": "linear_probe", "metric": "top1", "value": 70.0},
        {"init": "mae", "protocol": "linear_probe", "metric": "top1", "value": 72.5,
         "variant": "norm=imagenet,size=448", "ci_low": 70.25, "ci_high": 74.75},
        {"init": "mae", "protocol": "segmentation", "metric": "miou", "value": 40.0,
         "ci_low": 38.0, "ci_high": 42.0},
    ]
    atomic_write_json(run_dir / "metrics.json", {"run_id": RUN_ID, "experiment": "mae",
                                                 "status": "finished", "results": results})
    # a protocol the report has never heard of, in a deeper folder: read by its shape
    atomic_write_json(run_dir / "evals" / "mae" / "thermal" / "segmentation.json", {
        "miou": 40.0, "pixel_acc": 80.0, "per_class_iou": [60.0, None, 20.0],
        "classes": ["sky", "door", "road"], "ci": {"miou": [38.0, 42.0]},
        "samples": {"kind": "confusion", "num_classes": 3, "confusion": ["0:5 8:2"]},
    })  # fmt: skip
    atomic_write_json(run_dir / "evals" / "mae" / "thermal" / "layout.json", {"alpha=0": 7.0})
    text = write_report(run_dir).read_text()
    assert "### linear_probe\n\n| init | metric | value |\n|---|---|---:|\n| mae | top1 | 70.00 |" \
        in text
    assert "### linear_probe (variant `norm=imagenet,size=448`)" in text
    assert "| mae | top1 | 72.50 | [70.25, 74.75] |" in text
    assert "| mae | miou | 40.00 | [38.00, 42.00] |" in text
    assert "## Segmentation: init `mae/thermal`" in text
    assert "- Test mIoU: **40.00** (95% CI 38.00–42.00), pixel accuracy: 80.00" in text
    assert "| sky | 60.00 |" in text and "door" not in text
    assert "- `evals/mae/thermal/layout.json` (not shown above)" in text
    assert "0:5 8:2" not in text  # per-sample records are not printed


def test_results_markdown_for_the_cli(run_dir):
    from visionbench.results.report import results_markdown

    write_metrics(run_dir)
    text = results_markdown(run_dir)
    assert text.startswith("## linear_probe\n") and "| random | top1 | 61.00 |" in text
