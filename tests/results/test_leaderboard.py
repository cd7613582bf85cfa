import csv
import multiprocessing
import shutil
import statistics
from pathlib import Path

import pandas as pd
import pytest

from visionbench.errors import UserError
from visionbench.results.leaderboard import (
    COLUMNS,
    aggregate_seeds,
    append_run,
    read_leaderboard,
    read_reference,
    rows_from_metrics,
    update_leaderboard,
)
from visionbench.results.records import atomic_write_json, read_json

REFERENCE = Path(__file__).resolve().parents[2] / "results" / "reference.csv"


def write_run(runs_dir, run_id, value=81.2, status="finished", backbone="vit_tiny_p4_32"):
    run_dir = Path(runs_dir) / run_id
    metrics = {
        "run_id": run_id, "experiment": "mae",
        "paper": "Masked Autoencoders Are Scalable Vision Learners", "method": "mae",
        "backbone": backbone, "norm": "layernorm", "placement": "pre", "dataset": "shapes",
        "seed": 0, "epochs": 30, "precision": "32-true", "device": "cpu", "wall_s": 201.5,
        "timestamp": "2026-11-27T12:00:00Z", "config_hash": run_id[-8:], "status": status,
        "results": [
            {"init": "mae", "protocol": "linear_probe", "metric": "top1", "value": value},
            {"init": "random", "protocol": "knn_k20_t0.07", "metric": "top1", "value": 40.1},
        ],
    }  # fmt: skip
    atomic_write_json(run_dir / "metrics.json", metrics)
    return run_dir


def csv_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_rows_from_metrics_one_row_per_result(tmp_path):
    from visionbench.results.records import read_metrics

    rows = rows_from_metrics(read_metrics(write_run(tmp_path, "20261127T120000Z-mae-ab12cd34")))
    assert len(rows) == 2
    assert all(list(row) == COLUMNS and row["source"] == "run" for row in rows)
    assert rows[0]["value"] == 81.2 and rows[0]["protocol"] == "linear_probe"
    assert rows[1]["init"] == "random" and rows[1]["run_id"] == "20261127T120000Z-mae-ab12cd34"


def test_reference_csv_is_valid_and_holds_mae_numbers():
    rows = read_reference(REFERENCE)
    values = {(r["backbone"], r["protocol"]): r["value"] for r in rows if r["experiment"] == "mae"}
    assert values[("vit_base_patch16_224", "finetune")] == 83.6
    assert values[("vit_large_patch16_224", "linear_probe")] == 75.8
    assert values[("vit_huge_patch14_224", "finetune")] == 86.9
    assert all(r["source"] == "paper" and r["run_id"].startswith("paper:") for r in rows)


def test_update_leaderboard_runs_and_reference(tmp_path):
    runs = tmp_path / "runs"
    run_a = write_run(runs, "20261127T120000Z-mae-aaaaaaaa", value=81.2)
    write_run(runs, "20261127T130000Z-mae-bbbbbbbb", value=75.0, backbone="resnet18")
    write_run(runs, "20261127T140000Z-mae-cccccccc", status="failed")
    (runs / "not-a-run").mkdir()
    board = tmp_path / "leaderboard.csv"

    frame = update_leaderboard(runs, board, REFERENCE)
    n_ref = len(read_reference(REFERENCE))
    assert list(frame.columns) == COLUMNS
    assert len(frame) == 4 + n_ref
    assert (frame["source"] == "paper").sum() == n_ref
    assert "20261127T140000Z-mae-cccccccc" not in set(frame["run_id"])
    with open(board) as handle:
        assert handle.readline().strip() == ",".join(COLUMNS)
    on_disk = csv_rows(board)
    assert [r["run_id"] for r in on_disk] == list(frame["run_id"])
    # deterministic order: by experiment, paper rows first within one, then by backbone
    assert [r["experiment"] for r in on_disk] == sorted(r["experiment"] for r in on_disk)
    mae = [r for r in on_disk if r["experiment"] == "mae"]
    n_mae_ref = sum(r["experiment"] == "mae" for r in read_reference(REFERENCE))
    assert [r["source"] for r in mae] == ["paper"] * n_mae_ref + ["run"] * 4
    assert mae[n_mae_ref]["backbone"] == "resnet18"

    # a run's new value replaces its row instead of adding one
    write_run(runs, run_a.name, value=90.5)
    frame = update_leaderboard(runs, board, REFERENCE)
    assert len(frame) == 4 + n_ref
    probe = frame[(frame["run_id"] == run_a.name) & (frame["protocol"] == "linear_probe")]
    assert probe["value"].tolist() == [90.5]

    # a deleted run folder keeps its rows
    shutil.rmtree(run_a)
    frame = update_leaderboard(runs, board)
    assert len(frame) == 4 + n_ref
    assert (frame["run_id"] == run_a.name).sum() == 2
    assert frame.loc[frame["source"] == "run", "seed"].tolist()[-1] == 0
    assert frame["wall_s"].dtype.kind == "f"
    assert read_leaderboard(board).equals(frame)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_update_leaderboard_without_runs_dir_writes_reference(tmp_path):
    frame = update_leaderboard(tmp_path / "missing", tmp_path / "lb.csv", REFERENCE)
    assert len(frame) == len(read_reference(REFERENCE))


def test_malformed_reference_names_the_file(tmp_path):
    bad_header = tmp_path / "bad_header.csv"
    bad_header.write_text("experiment,value\nmae,1\n")
    with pytest.raises(UserError, match="bad_header.csv: header must be exactly"):
        read_reference(bad_header)

    lines = REFERENCE.read_text().splitlines()
    short_row = tmp_path / "short.csv"
    short_row.write_text(lines[0] + "\nmae,1,2\n")
    expected = len(lines[0].split(","))
    with pytest.raises(UserError, match=rf"short.csv:2: 3 fields, expected {expected}"):
        read_reference(short_row)

    bad_value = tmp_path / "value.csv"
    bad_value.write_text(lines[0] + "\n" + lines[1].replace(",83.6,", ",high,") + "\n")
    with pytest.raises(UserError, match=r"value.csv:2: value must be a number, got 'high'"):
        read_reference(bad_value)

    duplicate = tmp_path / "dup.csv"
    duplicate.write_text("\n".join([lines[0], lines[1], lines[1]]) + "\n")
    with pytest.raises(UserError, match=r"dup.csv:3: same row key as line 2"):
        update_leaderboard(tmp_path / "runs", tmp_path / "lb.csv", duplicate)
    assert not (tmp_path / "lb.csv").exists()


def test_append_run(tmp_path):
    board = tmp_path / "lb.csv"
    run_dir = write_run(tmp_path / "runs", "20261127T120000Z-mae-aaaaaaaa")
    assert append_run(run_dir, board) == 2
    assert append_run(run_dir, board) == 2
    assert len(csv_rows(board)) == 2
    failed = write_run(tmp_path / "runs", "20261127T130000Z-mae-bbbbbbbb", status="failed")
    assert append_run(failed, board) == 0
    assert len(csv_rows(board)) == 2
    with pytest.raises(UserError, match="metrics.json: missing"):
        append_run(tmp_path / "runs" / "nothing", board)


def _append_many(runs_dir, board, writer, start_event):
    start_event.wait()
    for i in range(10):
        run_dir = write_run(runs_dir, f"20261127T1200{i:02d}Z-mae-{writer}{i:07x}")
        append_run(run_dir, board)


def test_two_concurrent_writers_lose_no_row(tmp_path):
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    runs_dir, board = tmp_path / "runs", tmp_path / "lb.csv"
    start = context.Event()
    workers = [
        context.Process(target=_append_many, args=(runs_dir, board, writer, start))
        for writer in ("a", "b")
    ]
    for worker in workers:
        worker.start()
    start.set()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    run_ids = {row["run_id"] for row in csv_rows(board)}
    assert len(run_ids) == 20
    assert len(csv_rows(board)) == 40


def test_variant_is_part_of_the_row_key_and_intervals_are_kept(tmp_path):
    run_dir = write_run(tmp_path / "runs", "20261127T120000Z-mae-aaaaaaaa")
    metrics = read_json(run_dir / "metrics.json")
    metrics["results"] = [
        {"init": "mae", "protocol": "linear_probe", "metric": "top1", "value": 80.0,
         "variant": {"size": 224, "norm": "imagenet"}, "ci_low": 78.5, "ci_high": 81.5},
        {"init": "mae", "protocol": "linear_probe", "metric": "top1", "value": 82.0,
         "variant": "size=448", "ci": [80.0, 84.0]},
    ]
    atomic_write_json(run_dir / "metrics.json", metrics)
    board = tmp_path / "lb.csv"
    assert append_run(run_dir, board) == 2
    assert append_run(run_dir, board) == 2  # an upsert: the same two keys again
    rows = csv_rows(board)
    assert [(r["variant"], r["value"], r["ci_low"], r["ci_high"], r["stat"]) for r in rows] == [
        ("norm=imagenet,size=224", "80.0", "78.5", "81.5", "single"),
        ("size=448", "82.0", "80.0", "84.0", "single")]
    frame = read_leaderboard(board)
    assert frame["ci_low"].tolist() == [78.5, 80.0] and frame["variant"].tolist()[1] == "size=448"


def test_a_csv_without_the_new_columns_still_reads_and_is_upgraded(tmp_path):
    legacy = tmp_path / "lb.csv"
    header = ("experiment,paper,method,backbone,norm,placement,init,dataset,protocol,metric,"
              "value,seed,epochs,precision,device,wall_s,run_id,source,timestamp")
    legacy.write_text(header + "\nmae,MAE,mae,vit_tiny_p4_32,layernorm,pre,mae,shapes,"
                      "linear_probe,top1,81.2,0,30,32-true,cpu,201.5,"
                      "20261127T120000Z-mae-aaaaaaaa,run,2026-11-27T12:00:00Z\n")
    frame = read_leaderboard(legacy)
    assert list(frame.columns) == COLUMNS and len(frame) == 1
    assert frame["variant"].tolist() == [""] and frame["stat"].tolist() == ["single"]
    assert frame["ci_low"].isna().all() and frame["value"].tolist() == [81.2]
    # the same run appended again replaces its legacy row instead of adding one
    append_run(write_run(tmp_path / "runs", "20261127T120000Z-mae-aaaaaaaa", value=90.0), legacy)
    with open(legacy) as handle:
        assert handle.readline().strip() == ",".join(COLUMNS)
    rows = csv_rows(legacy)
    assert len(rows) == 2 and rows[0]["value"] == "90.0" and rows[0]["variant"] == ""


def seed_run(runs_dir, seed, value, knn=40.0):
    run_dir = write_run(runs_dir, f"20261127T12000{seed}Z-mae-{seed:08x}", value=value)
    metrics = read_json(run_dir / "metrics.json")
    metrics["seed"] = seed
    metrics["results"][1]["value"] = knn
    if seed == 2:  # a result only one seed has is never averaged over the others
        metrics["results"].append({"init": "mae", "protocol": "finetune", "metric": "top1",
                                   "value": 99.0})
    atomic_write_json(run_dir / "metrics.json", metrics)
    (run_dir / "config.yaml").write_text(f"experiment: mae\nseed: {seed}\nmodel:\n  x: 1\n")
    return run_dir


def test_seed_runs_get_mean_and_std_rows(tmp_path):
    runs = [seed_run(tmp_path / "runs", s, v, k)
            for s, v, k in ((0, 80.0, 40.0), (1, 82.0, 41.0), (2, 87.0, 45.5))]
    board = tmp_path / "lb.csv"
    aggregates = aggregate_seeds(board, runs)
    assert len(aggregates) == 4  # mean and std of the two results every seed has
    frame = read_leaderboard(board)
    probe = frame[(frame["protocol"] == "linear_probe")]
    assert sorted(probe["stat"]) == ["mean", "single", "single", "single", "std"]
    mean = probe[probe["stat"] == "mean"].iloc[0]
    std = probe[probe["stat"] == "std"].iloc[0]
    assert mean["value"] == pytest.approx(83.0)
    assert std["value"] == pytest.approx(statistics.stdev([80.0, 82.0, 87.0]))
    assert mean["run_id"] == std["run_id"] and mean["run_id"].startswith("seeds:0,1,2:")
    assert pd.isna(mean["seed"]) and pd.isna(mean["ci_low"])
    assert mean["wall_s"] == pytest.approx(3 * 201.5)
    knn = frame[(frame["protocol"] == "knn_k20_t0.07") & (frame["stat"] == "mean")]
    assert knn["value"].tolist() == [pytest.approx((40.0 + 41.0 + 45.5) / 3)]
    finetune = frame[frame["protocol"] == "finetune"]
    assert finetune["stat"].tolist() == ["single"]
    # best-of-N is never written: the max over seeds is no row of its own
    assert set(frame["stat"]) == {"single", "mean", "std"}
    assert (probe["value"] == 87.0).sum() == 1 and probe[probe["value"] == 87.0].iloc[0][
        "stat"] == "single"
    # aggregating again updates the same rows
    aggregate_seeds(board, runs)
    assert len(read_leaderboard(board)) == len(frame)


def test_seed_aggregation_refuses_other_differences_and_unknown_stats(tmp_path):
    runs = [seed_run(tmp_path / "runs", s, v) for s, v in ((0, 80.0), (1, 82.0))]
    (runs[1] / "config.yaml").write_text("experiment: mae\nseed: 1\nmodel:\n  x: 2\n")
    with pytest.raises(UserError, match="differs .* in model, not only in the seed"):
        aggregate_seeds(tmp_path / "lb.csv", runs)
    assert aggregate_seeds(tmp_path / "lb.csv", runs[:1]) == []  # a std needs two seeds
    bad = tmp_path / "bad.csv"
    rows = csv_rows(tmp_path / "lb.csv")
    rows[0]["stat"] = "best"
    with open(bad, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(UserError, match="stat must be one of single, mean, std"):
        read_leaderboard(bad)
