import pytest
import torch
from timm.models.resnet import BasicBlock, ResNet
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader, TensorDataset

from visionbench.errors import ConfigError, DataError
from visionbench.evals.features import cached_features, extract_features

EMBED = 32


def tiny_vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=EMBED, depth=3, num_heads=2,
                             num_classes=0)


def tiny_loader(n: int = 10) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, 16, 16, generator=g)
    labels = torch.arange(n) % 3
    return DataLoader(TensorDataset(images, labels), batch_size=4)


@pytest.mark.parametrize(("pooling", "dim"),
                         [("cls", EMBED), ("mean", EMBED), ("lastk", 2 * EMBED)])
def test_vit_feature_shapes(pooling, dim):
    feats, labels = extract_features(tiny_vit(), tiny_loader(), pooling=pooling, last_k=2,
                                     progress=False)
    assert feats.shape == (10, dim)
    assert feats.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert labels.tolist() == [i % 3 for i in range(10)]


def test_poolings_match_the_token_definitions():
    vit = tiny_vit().eval()
    images = next(iter(tiny_loader()))[0]
    with torch.no_grad():
        tokens = vit.forward_features(images)
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        block_cls = []
        for block in vit.blocks:
            x = block(x)
            block_cls.append(vit.norm(x)[:, 0])
    cls, _ = extract_features(vit, [(images, torch.zeros(4))], "cls", progress=False)
    mean, _ = extract_features(vit, [(images, torch.zeros(4))], "mean", progress=False)
    lastk, _ = extract_features(vit, [(images, torch.zeros(4))], "lastk", last_k=2,
                                progress=False)
    torch.testing.assert_close(cls, tokens[:, 0])
    torch.testing.assert_close(mean, tokens[:, 1:].mean(dim=1))
    torch.testing.assert_close(lastk, torch.cat(block_cls[-2:], dim=1))
    assert not vit.training


def test_resnet_uses_global_pool_for_any_pooling():
    resnet = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=0)
    feats, _ = extract_features(resnet, tiny_loader(4), pooling="lastk", progress=False)
    assert feats.shape == (4, resnet.num_features)


def test_unknown_pooling_is_a_config_error():
    with pytest.raises(ConfigError, match="cls.*mean.*lastk"):
        extract_features(tiny_vit(), tiny_loader(), pooling="gap", progress=False)


def test_cache_written_once_and_reloaded_without_backbone(tmp_path):
    vit = tiny_vit()
    calls = []
    vit.register_forward_pre_hook(lambda module, args: calls.append(1))
    vit.patch_embed.register_forward_pre_hook(lambda module, args: calls.append(1))
    path = tmp_path / "cache" / "train_cls.pt"
    feats, labels = cached_features(path, vit, tiny_loader(), "cls", 4, "cpu")
    assert path.exists() and calls
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind
    calls.clear()
    again, again_labels = cached_features(path, vit, tiny_loader(), "cls", 4, "cpu")
    assert calls == []
    torch.testing.assert_close(again, feats)
    assert torch.equal(again_labels, labels)


def test_cache_built_with_another_pooling_is_refused(tmp_path):
    path = tmp_path / "train.pt"
    cached_features(path, tiny_vit(), tiny_loader(), "lastk", 2, "cpu", progress=False)
    with pytest.raises(DataError, match="pooling"):
        cached_features(path, tiny_vit(), tiny_loader(), "cls", 2, "cpu", progress=False)
    with pytest.raises(DataError, match="last_k"):
        cached_features(path, tiny_vit(), tiny_loader(), "lastk", 3, "cpu", progress=False)
