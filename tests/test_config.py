import pytest

from visionbench.config import parse_set, resolve_config
from visionbench.errors import ConfigError
from visionbench.registry import EXPERIMENTS, get_experiment
from visionbench.results.leaderboard import read_reference


def test_demo_profile_overrides_defaults():
    cfg = resolve_config("mae")
    assert cfg.profile == "demo"
    assert cfg.data.dataset == "shapes" and cfg.data.image_size == 32
    assert cfg.model.backbone_kwargs["patch_size"] == 8
    assert cfg.pretrain.mask_ratio == 0.75  # from the defaults
    assert cfg.data.root is None


def test_sets_and_flags_apply_in_order(tmp_path):
    cfg = resolve_config(
        "mae", "demo", ["pretrain.epochs=3", "eval.knn.k=7", "model.backbone_kwargs.depth=2"],
        {"pretrain.epochs": 5, "seed": 11, "data.root": str(tmp_path), "seed_unused": None},
    )
    assert cfg.pretrain.epochs == 5  # the named flag wins over --set
    assert cfg.eval.knn.k == 7
    assert cfg.model.backbone_kwargs["depth"] == 2
    assert cfg.seed == 11 and cfg.data.root == str(tmp_path)


def test_paper_profile_needs_a_data_root(tmp_path):
    with pytest.raises(ConfigError, match="--data-root"):
        resolve_config("mae", "paper")
    cfg = resolve_config("mae", "paper", flags={"data.root": str(tmp_path)})
    assert cfg.model.backbone == "vit_base_patch16_224"
    assert cfg.data.image_size == 224 and cfg.pretrain.epochs == 800
    assert cfg.pretrain.blr == 1.5e-4 and cfg.pretrain.warmup_epochs == 40
    assert resolve_config("mae", "paper", require_data=False).data.root is None


@pytest.mark.parametrize(
    "sets,flags,message",
    [
        (["model.foo=1"], {}, "unknown key 'model.foo'; allowed here: backbone"),
        (["data.batch_size=abc"], {}, "data.batch_size: Input should be a valid integer"),
        (["pretrain.mask_ratio=1.5"], {}, "pretrain.mask_ratio"),
        ([], {"model.backbone": "vit_nope"}, "unknown backbone 'vit_nope'"),
        ([], {"model.norm": "nope"}, "unknown norm 'nope'; allowed: "),
        ([], {"data.root": "/does/not/exist"}, "data root /does/not/exist does not exist"),
        ([], {"trainer.precision": "8-bit"}, "trainer.precision"),
        (["eval.linear_probe.lrs=[0.1]"], {}, "at least 8"),
        (["pretrain=3"], {}, "pretrain"),
        (["model.weights=/no/such.pt"], {}, "model.weights: weights file /no/such.pt not found"),
        (["pretrain.official_weights=/no/w.pth"], {}, "pretrain.official_weights: weights file"),
        (["eval.detection.epochs=2"], {}, "eval.detection: give exactly one of epochs"),
        (["eval.detection.arch=c5"], {}, "eval.detection.arch"),
        (["eval.finetune.label_fractions=[0.1, 0.1]"], {}, "fractions repeat"),
        (["eval.finetune.label_fractions=[0]"], {}, "eval.finetune.label_fractions.0"),
    ],
)
def test_errors_name_the_key_and_what_is_allowed(sets, flags, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")) as err:
        resolve_config("mae", "demo", sets, flags)
    assert "\n" not in str(err.value)
    assert str(err.value).startswith(str(resolve_config.__globals__["config_path"]("mae")))


def test_parse_set():
    assert parse_set("a.b=3") == ("a.b", 3)
    assert parse_set("a=[1, 2]") == ("a", [1, 2])
    assert parse_set("a=hello") == ("a", "hello")
    with pytest.raises(ConfigError, match="expected key.path=value"):
        parse_set("novalue")
    with pytest.raises(ConfigError, match="empty key"):
        parse_set("a..b=1")


def test_unknown_experiment_and_profile():
    with pytest.raises(ConfigError, match="unknown experiment 'nope'; available: .*mae"):
        get_experiment("nope")
    with pytest.raises(ConfigError, match="unknown profile"):
        resolve_config("mae", "fast")


def test_registry_numbers_match_reference_csv():
    rows = read_reference("results/reference.csv")
    keys = ("experiment", "backbone", "norm", "placement", "init", "dataset", "protocol",
            "variant", "metric", "epochs")
    expected = []
    for entry in EXPERIMENTS.values():
        resolve_config(entry.name)  # every entry has a config that validates
        expected += entry.reference_rows()
    assert len(rows) == len(expected)
    for want in expected:
        match = [row for row in rows if all(row[k] == want[k] for k in keys)]
        assert len(match) == 1, want
        assert float(match[0]["value"]) == want["value"]
        assert match[0]["run_id"] == want["run_id"]


def test_norm_must_fit_the_backbone_family():
    with pytest.raises(ConfigError, match="norm 'evonorm_b0' does not fit .* token norms"):
        resolve_config("mae", flags={"model.norm": "evonorm_b0"})
    with pytest.raises(ConfigError, match="norm 'dyt' does not fit resnet18, which takes conv"):
        resolve_config("mae", flags={"model.backbone": "resnet18", "model.norm": "dyt"})
    cfg = resolve_config("alpha-bn", flags={"model.backbone": "resnet18",
                                            "model.norm": "bcn_ws", "model.backbone_kwargs": {}})
    assert cfg.model.norm == "bcn_ws"
    cfg = resolve_config("alpha-bn", sets=["model.norm=null"])
    assert cfg.model.norm == "batchnorm"  # the family's


def test_a_method_names_the_families_it_pretrains():
    with pytest.raises(ConfigError, match="pretrain.method: mae pretrains vit backbones, not "
                                          r"resnet50 \(resnet\)"):
        resolve_config("mae", sets=["model.norm=null"], flags={"model.backbone": "resnet50",
                                                               "model.backbone_kwargs": {}})


def test_norm_options_are_checked_against_the_catalog_when_the_config_loads():
    cfg = resolve_config("mae", sets=["model.norm_options={prepbn: {decay_fraction: 0.5}, "
                                      "powernorm: {grad_scale: paper}}"])
    assert cfg.model.norm_options["prepbn"] == {"decay_fraction": 0.5}
    with pytest.raises(ConfigError, match="model.norm_options: norm 'prepbn' has no option"
                                          r".*\['decay'\]; allowed: decay_fraction"):
        resolve_config("mae", sets=["model.norm_options={prepbn: {decay: 0.5}}"])
    with pytest.raises(ConfigError, match="model.norm_options: unknown norm 'nonorm'"):
        resolve_config("mae", sets=["model.norm_options={nonorm: {}}"])
    # batchnorm is a token and a conv norm: either entry's options are accepted
    resolve_config("mae", sets=["model.norm_options={batchnorm: {momentum: 0.01}}"])


def test_demo_and_paper_profiles_carry_the_official_schedules():
    mae = resolve_config("mae", "paper", require_data=False)
    assert mae.pretrain.effective_batch_size == 4096  # main_pretrain.py, on any device count
    assert mae.eval.finetune.effective_batch_size == 1024
    assert mae.eval.finetune.auto_augment == "rand-m9-mstd0.5-inc1"
    assert mae.eval.finetune.reprob == 0.25
    ablation = resolve_config("norm-ablation", "paper", require_data=False)
    assert ablation.model.norm_options["prepbn"] == {"total_steps": 300000}  # SLAB deit.py
    demo = resolve_config("norm-ablation")
    assert demo.model.norm_options["prepbn"]["decay_fraction"] == 0.8  # 300000 / 375300
    assert resolve_config("evonorm").ablation.conv.preact == ["batchnorm"]


@pytest.mark.parametrize("sets, want", [
    (["pretrain.mask_ratio=1.5"], "pretrain.mask_ratio: Input should be less than 1"),
    (["pretrain.decoder_widht=3"], "unknown key 'pretrain.decoder_widht'; allowed here: "
                                   "blr, checkpoint_every_n_steps, decoder_depth"),
    (["pretrain.method=byol"], "pretrain.method: unknown method 'byol'; allowed: mae"),
    (["pretrain={epochs: 3}"], "pretrain.method: missing; allowed: mae"),
    (["ablation.entries=[{norm: dyt, pretrain: {mask_ratio: 2}}]"],
     "ablation.entries.0.pretrain: mask_ratio: Input should be less than 1"),
])
def test_errors_inside_a_union_member_name_the_key(sets, want):
    with pytest.raises(ConfigError, match=None) as err:
        resolve_config("norm-ablation", sets=sets)
    assert want in str(err.value), str(err.value)


def test_pretrain_is_optional_and_each_method_brings_its_own_defaults():
    assert resolve_config("alpha-bn").pretrain is None
    pixpro = resolve_config("pixpro", "paper", require_data=False).pretrain
    assert (pixpro.method, pixpro.blr, pixpro.weight_decay, pixpro.pos_ratio) == (
        "pixpro", 1.0, 1e-5, 0.7)
    unip = resolve_config("unip-infrared", "paper", require_data=False).pretrain
    assert unip.mae.mask_ratio == 0.75 and unip.teacher.layer == 17
