"""One protocol result -> leaderboard result rows; the canonical variant text."""

import pytest

from visionbench.results.bootstrap import accuracy_ci, hits_samples
from visionbench.results.rows import format_variant, parse_variant, rows_from_result


def test_variant_text_is_canonical():
    assert format_variant({"size": 224, "norm": "imagenet"}) == "norm=imagenet,size=224"
    assert format_variant("size=224, norm=imagenet") == "norm=imagenet,size=224"
    assert format_variant({"clips_x_crops": (4, 3), "fraction": 0.1, "frozen": True,
                           "unset": None}) == "clips_x_crops=4x3,fraction=0.1,frozen=true"
    assert format_variant("") == format_variant(None) == format_variant({}) == ""
    assert parse_variant("norm=imagenet,size=224") == {"norm": "imagenet", "size": "224"}
    with pytest.raises(ValueError):
        format_variant({"subset": "a,b"})
    with pytest.raises(ValueError):
        format_variant("size")


def test_rows_of_a_probe_result_with_stored_intervals():
    result = {"test_top1": 81.5, "test_top5": 95.0, "epochs": 3, "grid": [],
              "ci": {"top1": [79.0, 84.0], "top5": [93.5, 96.5]}}
    rows = rows_from_result(result, init="mae", protocol="linear_probe",
                            variant={"size": 224})
    assert rows == [
        {"init": "mae", "protocol": "linear_probe", "metric": "top1", "value": 81.5,
         "variant": "size=224", "ci_low": 79.0, "ci_high": 84.0},
        {"init": "mae", "protocol": "linear_probe", "metric": "top5", "value": 95.0,
         "variant": "size=224", "ci_low": 93.5, "ci_high": 96.5},
    ]
    assert [r["metric"] for r in rows_from_result(result, init="mae", protocol="p",
                                                  metrics=("top5",))] == ["top5"]


def test_rows_without_intervals_and_from_samples():
    rows = rows_from_result({"miou": 40.0, "pixel_acc": 80.0, "steps": 9}, init="unip",
                            protocol="finetune")
    assert [(r["metric"], r["ci_low"], r["ci_high"]) for r in rows] == [
        ("miou", None, None), ("pixel_acc", None, None)]
    hits = [True, False, True, True] * 10
    rows = rows_from_result({"top1": 75.0, "samples": hits_samples(top1=hits)}, init="x",
                            protocol="knn", seed=5)
    assert (rows[0]["ci_low"], rows[0]["ci_high"]) == accuracy_ci(hits, seed=5)


def test_sub_results_become_protocol_names():
    knn = {"k20_t0.07": {"top1": 55.5, "top5": 90.0, "ci": {"top1": [50.0, 60.0]}},
           "k5_majority": {"top1": 50.25}}
    rows = rows_from_result(knn, init="mae", protocol="knn", variant="votes=20")
    assert [(r["protocol"], r["metric"], r["ci_low"]) for r in rows] == [
        ("knn_k20_t0.07", "top1", 50.0), ("knn_k20_t0.07", "top5", None),
        ("knn_k5_majority", "top1", None)]
    assert {r["variant"] for r in rows} == {"votes=20"}
