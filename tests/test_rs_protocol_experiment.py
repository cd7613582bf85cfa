"""The rs-protocol experiment through the CLI at toy size: one row per grid cell with its
variant, the figure, a corrupt GeoTIFF under --data-root, a missing data-set folder."""

import shutil

import pytest

from tests.test_runner import only_run, visionbench
from visionbench.results.leaderboard import read_leaderboard

TOY = ["--set", "data.synth={train_per_class: 2, val_per_class: 1, test_per_class: 1}",
       "--set", "data.batch_size=8", "--set", "pretrain.epochs=1",
       "--set", "rs_protocol.normalizations=[standardize, divide]",
       "--set", "rs_protocol.softcon.epochs=1", "--set", "rs_protocol.softcon.proj_dim=16",
       "--set", "rs_protocol.softcon.proj_hidden_dim=32", "--set", "softcon.pretrain_samples=8"]


@pytest.mark.slow
def test_rs_protocol_scores_every_cell_of_the_grid(tmp_path):
    out, board = tmp_path / "runs", tmp_path / "lb.csv"
    result = visionbench("run", "rs-protocol", *TOY, "--out", str(out), "--leaderboard",
                         str(board), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = only_run(out)
    assert (run / "figures" / "rs_protocol_grid.png").is_file()
    rows = read_leaderboard(board)
    rows = rows[rows.run_id == run.name]
    assert set(rows.init) == {"mae", "softcon", "random"}
    assert set(rows.protocol) == {"knn5", "logistic"}
    euro = rows[rows.dataset == "eurosat-ms"]
    assert set(euro.metric) == {"top1"}
    assert set(euro.variant) == {f"bands=msi,interp={i},norm={n},size={s}"
                                 for s, i in (("64", "none"), ("96", "bilinear"))
                                 for n in ("standardize", "divide")}
    assert euro.ci_low.notna().all()  # kNN and probe accuracies carry bootstrap intervals
    ben = rows[rows.dataset == "bigearthnet"]
    assert set(ben.metric) == {"map_micro", "map_macro"}
    assert ben.ci_low.notna().all() and (ben.ci_low <= ben.value).all()  # mAP intervals too
    assert (ben.value <= ben.ci_high).all()
    assert {v.split("size=")[1] for v in ben.variant} == {"96", "120"}
    assert len(rows) == 3 * 2 * 2 * 2 * 1 + 3 * 2 * 2 * 2 * 2  # inits x protocols x cells
    assert (run / "softcon" / "encoder.safetensors").is_file()


def test_a_corrupt_geotiff_under_the_data_root_is_one_line_and_exit_2(tmp_path):
    from visionbench.data.multispectral.synthetic import EUROSAT_DIR, prepare_eurosat_ms

    cached = prepare_eurosat_ms(1, 1, 1, cache_dir=tmp_path / "cache")
    root = tmp_path / "data"
    shutil.copytree(cached, root / "eurosat-ms")
    victim = sorted((root / "eurosat-ms" / EUROSAT_DIR).rglob("*.tif"))[0]
    victim.write_bytes(victim.read_bytes()[:300])
    args = ["--set", "rs_protocol.datasets=[eurosat-ms]", "--set", "eval.inits=[random]",
            "--set", "rs_protocol.softcon=null", "--data-root", str(root),
            "--out", str(tmp_path / "runs")]
    result = visionbench("run", "rs-protocol", *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert victim.name in lines[-1] and "not a readable GeoTIFF" in lines[-1]
    assert "Traceback" not in result.stderr
    result = visionbench("run", "rs-protocol", "--set", "rs_protocol.datasets=[bigearthnet]",
                         "--data-root", str(root), "--out", str(tmp_path / "runs2"),
                         cwd=tmp_path)
    assert result.returncode == 2 and "no folder for data set bigearthnet" in result.stderr
    assert not (tmp_path / "runs2").exists()  # refused before a run folder exists
    # the SoftCon encoder's scenes come from --data-root too
    result = visionbench("run", "rs-protocol", "--set", "rs_protocol.datasets=[eurosat-ms]",
                         "--data-root", str(root), "--out", str(tmp_path / "runs3"),
                         cwd=tmp_path)
    assert result.returncode == 2 and "no folder for ssl4eo-s12-ml" in result.stderr
    assert not (tmp_path / "runs3").exists()
