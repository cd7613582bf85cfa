"""Per-variant result tables and an entry's reported numbers."""

from visionbench.registry import get_experiment
from visionbench.results.tables import reported_table, result_tables


def test_reported_table_tells_the_unip_inits_apart():
    text = reported_table(get_experiment("unip-infrared"))
    lines = text.splitlines()
    assert lines[0] == ("| backbone | init/method | norm | placement | protocol | metric | "
                        "value | dataset | source |")
    body = [line.split(" | ") for line in lines[2:]]
    keyed = {(cells[0].lstrip("| "), cells[1], cells[4]): cells[6] for cells in body}
    assert keyed[("vit_small_patch16_224", "mae", "finetune")] == "55.4"
    assert keyed[("vit_small_patch16_224", "unip(ibot-l)", "finetune")] == "64.7"
    assert keyed[("vit_small_patch16_224", "dino", "linear_probe")] == "45"
    assert len(keyed) == len(body)  # no two rows read as the same row
    assert "official README figure (values read off the figure)" in text
    assert "paper:" not in text


def test_reported_table_of_an_entry_without_numbers_and_of_rows():
    assert "no reported numbers" in reported_table(get_experiment("norm-ablation"))
    rows = [{"backbone": "vit_b", "method": "mae", "init": None, "protocol": "finetune",
             "metric": "top1", "value": 83.6, "dataset": "imagenet-1k", "run_id": "paper:T3",
             "variant": "size=224"}]
    assert "| vit_b | mae |  |  | finetune [size=224] | top1 | 83.6 | imagenet-1k | T3 |" in (
        reported_table(rows))


def test_result_tables_one_per_protocol_and_variant():
    rows = [
        {"init": "mae", "protocol": "linear_probe", "metric": "top1", "value": 70.0},
        {"init": "mae", "protocol": "linear_probe", "metric": "top1", "value": 72.5,
         "variant": "size=448", "ci_low": 70.25, "ci_high": 74.75},
        {"init": "dino", "protocol": "linear_probe", "metric": "top1", "value": 71.0,
         "variant": {"size": 448}},
        {"init": "mae", "protocol": "knn", "metric": "top1", "value": 60.0},
    ]
    text = "\n".join(result_tables(rows))
    assert text.count("### ") == 3
    assert "### linear_probe\n" in text and "### knn\n" in text
    assert "### linear_probe (variant `size=448`)" in text
    assert "| mae | top1 | 72.50 | [70.25, 74.75] |" in text
    assert "| dino | top1 | 71.00 | – |" in text
    assert "| mae | top1 | 70.00 |\n" in text  # the default variant has no interval column


def test_seed_table_pairs_mean_and_std():
    from visionbench.results.tables import seed_table

    base = {"init": "mae", "protocol": "linear_probe", "variant": "", "metric": "top1",
            "run_id": "seeds:0,1,2:1a2b3c4d"}
    text = seed_table([{**base, "stat": "mean", "value": "83.0"},
                       {**base, "stat": "std", "value": "3.605551275463989"}])
    assert "| mae | linear_probe |  | top1 | 83.00 | 3.61 | 0,1,2 |" in text
    assert "no seed aggregates" in seed_table([])
