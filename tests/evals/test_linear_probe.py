import pytest
import torch

import visionbench.evals.linear_probe as linear_probe
from visionbench.errors import ConfigError
from visionbench.evals.linear_probe import LARS, LinearHeads, grid_extension, linear_probe_sweep

C, D = 4, 16
LRS = [1.0, 3.0, 10.0, 30.0]
WDS = [0.0, 1e4]


def blobs(n: int, generator: torch.Generator, centers: torch.Tensor):
    labels = torch.arange(n) % C
    return centers[labels] + torch.randn(n, D, generator=generator), labels


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    centers = 3 * torch.randn(C, D, generator=g)
    return (*blobs(320, g, centers), *blobs(120, g, centers), *blobs(120, g, centers))


def sweep(data, **overrides):
    kwargs = {"num_classes": C, "lrs": LRS, "weight_decays": WDS, "epochs": 10,
              "batch_size": 32, "warmup_epochs": 1, "seed": 0,
              "classes": ["a", "b", "c", "d"]}
    return linear_probe_sweep(*data, **{**kwargs, **overrides})


@pytest.fixture(scope="module")
def result(data):
    return sweep(data)


def test_best_head_separates_gaussian_blobs(result):
    assert set(result) == {"grid", "best", "best_position", "extensions", "test_top1",
                           "test_top5", "classes", "per_class_acc", "samples", "ci"}
    assert result["test_top1"] >= 99.0
    assert result["test_top5"] == pytest.approx(100.0)  # top-min(5, C) = top-4 of 4 classes
    assert result["classes"] == ["a", "b", "c", "d"]
    assert len(result["per_class_acc"]) == C
    assert min(result["per_class_acc"]) >= 95.0
    best = max(result["grid"], key=lambda e: e["val_top1"])
    assert result["best"]["weight_decay"] == 0.0
    assert best["val_top1"] >= 99.0


def test_per_sample_hits_give_the_test_accuracy_and_its_interval(data, result):
    from visionbench.results.bootstrap import decode_hits

    samples = result["samples"]
    assert samples["kind"] == "hits" and samples["n"] == len(data[5])
    for metric in ("top1", "top5"):
        hits = decode_hits(samples[metric])
        assert 100.0 * hits.mean() == pytest.approx(result[f"test_{metric}"], abs=1e-4)
        low, high = result["ci"][metric]
        assert low <= result[f"test_{metric}"] + 1e-9 and result[f"test_{metric}"] <= high + 1e-9
    without = sweep(data, epochs=1, keep_samples=False)
    assert "samples" not in without and "ci" not in without


def test_hits_of_a_worse_head_match_torchmetrics():
    g = torch.Generator().manual_seed(3)
    logits, labels = torch.randn(200, 7, generator=g), torch.randint(0, 7, (200,), generator=g)
    for k in (1, 5):
        hits = linear_probe.topk_hits(logits, labels, k)
        assert 100.0 * hits.float().mean().item() == pytest.approx(
            linear_probe.accuracy(logits, labels, 7, k), abs=1e-4)


def test_grid_has_one_entry_per_lr_and_weight_decay(result):
    assert [(e["lr"], e["weight_decay"]) for e in result["grid"]] == [
        (lr, wd) for lr in LRS for wd in WDS]
    for entry in result["grid"]:
        assert set(entry) == {"lr", "weight_decay", "val_top1", "val_top5"}
        assert entry["val_top5"] >= entry["val_top1"]


def test_huge_weight_decay_does_worse_than_the_best(result):
    best_val = max(e["val_top1"] for e in result["grid"])
    decayed = [e["val_top1"] for e in result["grid"] if e["weight_decay"] == 1e4]
    assert max(decayed) < best_val - 20


def test_all_heads_train_jointly_in_one_pass_per_epoch(data, monkeypatch):
    epochs_served, batches_served, forwards = [], [], []

    def counting_minibatches(*args, **kwargs):
        epochs_served.append(1)
        for batch in original(*args, **kwargs):
            batches_served.append(batch[0].shape[0])
            yield batch

    original = linear_probe.minibatches
    monkeypatch.setattr(linear_probe, "minibatches", counting_minibatches)
    original_forward = LinearHeads.forward

    def counting_forward(self, features):
        out = original_forward(self, features)
        forwards.append(out.shape)
        return out

    monkeypatch.setattr(LinearHeads, "forward", counting_forward)
    sweep(data, epochs=3)
    heads = len(LRS) * len(WDS)
    assert heads >= 8
    assert len(epochs_served) == 3
    assert batches_served == [32] * (3 * (320 // 32))  # each batch served once, not per head
    train_forwards = [s for s in forwards if s[1] == 32]
    assert len(train_forwards) == len(batches_served)
    assert all(s == (heads, 32, C) for s in train_forwards)  # one forward scores every head


def test_one_param_group_per_head_with_its_own_lr_and_weight_decay(data, monkeypatch):
    seen = []
    original_step = LARS.step

    def recording_step(self, closure=None):
        if not seen:
            seen.extend((g["peak_lr"], g["weight_decay"], len(g["params"]))
                        for g in self.param_groups)
        return original_step(self, closure)

    monkeypatch.setattr(LARS, "step", recording_step)
    sweep(data, epochs=1)
    assert seen == [(lr, wd, 2) for lr in LRS for wd in WDS]


def test_deterministic_for_a_seed(data):
    assert sweep(data, epochs=1) == sweep(data, epochs=1)


def test_sgd_variant_and_bad_inputs(data):
    assert sweep(data, optimizer="sgd", lrs=[0.1, 1.0], weight_decays=[0.0],
                 epochs=3)["test_top1"] >= 99
    with pytest.raises(ConfigError):
        sweep(data, optimizer="adam")
    with pytest.raises(ConfigError):
        sweep(data, lrs=[])
    with pytest.raises(ConfigError):
        sweep(data, classes=["only-one"])


def test_lars_skips_trust_scaling_for_1d_params():
    weight = torch.nn.Parameter(torch.full((2, 2), 1.0))
    bias = torch.nn.Parameter(torch.zeros(2))
    opt = LARS([{"params": [weight, bias], "lr": 1.0, "weight_decay": 0.0}])
    weight.grad = torch.full((2, 2), 4.0)
    bias.grad = torch.full((2,), 4.0)
    opt.step()
    # weight: update 4 rescaled by 0.001 * |w| / |g| = 0.001 * 2 / 8 -> step 0.001
    torch.testing.assert_close(weight.detach(), torch.full((2, 2), 0.999))
    torch.testing.assert_close(bias.detach(), torch.full((2,), -4.0))


def test_grid_extension_goes_past_the_edge_the_best_lies_on():
    lrs, wds = [1.0, 3.0, 10.0, 30.0], [0.0, 5e-4]
    assert grid_extension(lrs, wds, (30.0, 0.0)) == ([90.0], [], ["largest lr"])
    assert grid_extension(lrs, wds, (1.0, 5e-4)) == ([1.0 / 3.0], [5e-4 * 10.0],
                                                     ["smallest lr", "largest weight decay"])
    assert grid_extension(lrs, wds, (10.0, 0.0)) == ([], [], [])  # interior; wd 0 is no edge
    assert grid_extension(lrs, [1e-4, 1e-3], (3.0, 1e-4)) == ([], [1e-5],
                                                               ["smallest weight decay"])


def test_sweep_extends_the_grid_when_the_best_is_on_its_edge(data):
    tiny = [1e-6, 1e-5]  # far too small: the largest lr wins, then the next one past it
    result = sweep(data, optimizer="sgd", lrs=tiny, weight_decays=[0.0], epochs=3,
                   max_extensions=2)
    assert [e["edges"] for e in result["extensions"]] == [["largest lr"], ["largest lr"]]
    added = [lr for e in result["extensions"] for lr in e["added_lrs"]]
    assert added == pytest.approx([1e-4, 1e-3])
    assert [g["lr"] for g in result["grid"]] == pytest.approx(tiny + added)
    assert result["best"]["lr"] == pytest.approx(1e-3)
    assert result["best_position"] == "edge: largest lr"  # bounded: still on the edge

    # Exactly what one sweep over the extended grid gives: heads are independent.
    whole = sweep(data, optimizer="sgd", lrs=tiny + added, weight_decays=[0.0], epochs=3)
    assert whole["extensions"] == []
    assert [g["val_top1"] for g in whole["grid"]] == [g["val_top1"] for g in result["grid"]]
    assert whole["test_top1"] == result["test_top1"]


def test_sweep_does_not_extend_when_the_best_is_inside(data):
    result = sweep(data, optimizer="sgd", lrs=[1e-5, 0.1, 1e4], weight_decays=[0.0], epochs=3,
                   max_extensions=2)
    assert result["best"]["lr"] == 0.1
    assert result["extensions"] == [] and result["best_position"] == "interior"
    assert len(result["grid"]) == 3
