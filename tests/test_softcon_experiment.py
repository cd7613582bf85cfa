"""The softcon experiment through the CLI at toy size: rows of the BigEarthNet-10 % and
EuroSAT linear protocols and EuroSAT kNN for SoftCon and random init; a pretraining folder
with labels outside every known land-cover nomenclature is refused before a run exists."""

import csv

import numpy as np
import pytest

from tests.test_runner import only_run, visionbench
from visionbench.data.multispectral.geotiff import write_geotiff
from visionbench.results.leaderboard import read_leaderboard

TOY = ["--set", "data.synth={train_per_class: 2, val_per_class: 1, test_per_class: 1}",
       "--set", "data.batch_size=4", "--set", "pretrain.epochs=1",
       "--set", "pretrain.proj_hidden_dim=32", "--set", "pretrain.proj_dim=16",
       "--set", "softcon.pretrain_samples=8", "--set", "softcon.bigearthnet_train=20",
       "--set", "softcon.linear={epochs: 2, batch_size: 4, milestones: [1]}"]


@pytest.mark.slow
def test_softcon_rows_for_both_inits(tmp_path):
    out, board = tmp_path / "runs", tmp_path / "lb.csv"
    result = visionbench("run", "softcon", *TOY, "--out", str(out), "--leaderboard",
                         str(board), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = only_run(out)
    assert "labels in dynamic-world (9 classes)" in result.stdout + result.stderr
    rows = read_leaderboard(board)
    rows = rows[rows.run_id == run.name]
    assert set(rows.init) == {"softcon", "random"}
    be = rows[rows.dataset == "bigearthnet"]
    assert set(be.metric) == {"map_micro", "map_macro"} and set(be.protocol) == {"linear"}
    assert set(be.variant) == {"fraction=0.1,modality=ms,size=96"}
    assert be.ci_low.notna().all() and (be.ci_low <= be.value).all()  # mAP intervals
    assert (be.value <= be.ci_high).all()
    eu = rows[rows.dataset == "eurosat-ms"]
    assert set(eu.protocol) == {"linear", "knn5"} and set(eu.metric) == {"top1"}
    assert eu.ci_low.notna().all()
    assert len(rows) == 2 * (2 + 1 + 1)
    assert (run / "evals" / "softcon" / "softcon" / "bigearthnet_linear.json").is_file()


def test_pretraining_labels_outside_the_nomenclatures_are_refused(tmp_path):
    root = tmp_path / "data" / "ssl4eo-s12-ml"
    root.mkdir(parents=True)
    names = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10",
             "B11", "B12")
    from rasterio.transform import from_origin

    for i in range(10):
        write_geotiff(root / f"s{i}.tif", np.full((13, 8, 8), 1000, dtype=np.uint16),
                      transform=from_origin(0, 80, 10, 10), crs="EPSG:32632", names=names)
    with (root / "train.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows([[f"s{i}.tif", "water;Glacier" if i == 0 else "water"]
                     for i in range(10)])
    for other in ("bigearthnet", "eurosat-ms"):
        (tmp_path / "data" / other).mkdir()
    result = visionbench("run", "softcon", "--data-root", str(tmp_path / "data"),
                         "--out", str(tmp_path / "runs"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert "no Dynamic World class is known for the labels ['Glacier']" in lines[-1]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()
