"""Input normalization sealed into the encoder: raw input through a sealed encoder equals
normalized input through the plain one, at every entry point, for both families."""

import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from visionbench.backbones import create_backbone
from visionbench.backbones.sealed import InputSpec, input_spec, seal, unseal
from visionbench.data.datamodule import build_transform
from visionbench.errors import ConfigError
from visionbench.evals.features import pooled_features

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def vit():
    torch.manual_seed(0)
    return create_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2).eval()


def resnet():
    torch.manual_seed(0)
    return create_backbone("resnet18").eval()


def normalized(x):
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


@pytest.mark.parametrize("make", [vit, resnet])
def test_sealed_raw_input_equals_plain_normalized_input(make):
    torch.manual_seed(1)
    x = torch.rand(2, 3, 32, 32)
    plain = make()
    sealed = seal(make(), InputSpec.of(MEAN, STD))
    with torch.no_grad():
        assert torch.equal(sealed(x), plain(normalized(x)))
        if hasattr(plain, "blocks"):
            for pooling in ("cls", "mean", "lastk"):
                assert torch.equal(pooled_features(sealed, x, pooling, 2),
                                   pooled_features(plain, normalized(x), pooling, 2))


def test_sealing_adds_no_state_dict_keys_and_follows_the_device():
    plain = vit()
    sealed = seal(vit(), InputSpec.of(MEAN, STD))
    assert sealed.state_dict().keys() == plain.state_dict().keys()
    sealed.to(torch.float64)
    assert sealed.input_normalization.mean.dtype == torch.float64


def test_sealed_equals_torchvision_normalize_on_a_real_image():
    img = Image.fromarray(torch.randint(0, 256, (40, 40, 3), dtype=torch.uint8).numpy())
    raw = build_transform(32, 3, MEAN, STD, train=False, normalize=False)(img)[None]
    norm = build_transform(32, 3, MEAN, STD, train=False)(img)[None]
    assert raw.min() >= 0 and raw.max() <= 1
    plain, sealed = vit(), seal(vit(), InputSpec.of(MEAN, STD))
    with torch.no_grad():
        assert torch.equal(sealed.forward_features(raw), plain.forward_features(norm))


def test_resize_scale_and_reseal():
    x = torch.rand(1, 3, 48, 48)
    spec = InputSpec.of(MEAN, STD, scale=0.5, size=32, interpolation="bilinear")
    plain, sealed = vit(), seal(vit(), spec)
    expected = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False,
                             antialias=True) * 0.5
    with torch.no_grad():
        assert torch.equal(sealed(x), plain(normalized(expected)))
    assert input_spec(sealed) == spec
    seal(sealed, InputSpec.of((0, 0, 0), (1, 1, 1)))  # replaces, does not stack
    with torch.no_grad():
        assert torch.equal(sealed(x[..., :32, :32]), plain(x[..., :32, :32]))
    unseal(sealed)
    assert input_spec(sealed) is None
    with torch.no_grad():
        assert torch.equal(sealed(x[..., :32, :32]), plain(x[..., :32, :32]))


def test_bad_specs_and_inputs():
    with pytest.raises(ConfigError, match="std must be positive"):
        InputSpec.of(MEAN, (0.2, 0.0, 0.2))
    with pytest.raises(ConfigError, match="3 means but 1 stds"):
        InputSpec.of(MEAN, (0.2,))
    with pytest.raises(ConfigError, match="interpolation"):
        InputSpec.of(MEAN, STD, interpolation="lanczos")
    sealed = seal(vit(), InputSpec.of(MEAN, STD))
    with pytest.raises(ValueError, match=r"expected \(B, 3, H, W\)"):
        sealed(torch.rand(1, 1, 32, 32))
    with pytest.raises(ConfigError, match="no backbone family"):
        seal(torch.nn.Linear(3, 3), InputSpec.of(MEAN, STD))
    with pytest.raises(ValueError, match="eval transforms only"):
        build_transform(32, 3, MEAN, STD, train=True, normalize=False)


def test_a_deep_copy_of_a_sealed_encoder_normalizes_with_its_own_copy():
    import copy

    sealed = seal(vit(), InputSpec.of(MEAN, STD))
    twin = copy.deepcopy(sealed).to(torch.float64)  # the original stays float32
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert twin(x.double()).dtype == torch.float64
        assert torch.equal(sealed(x), vit()(normalized(x)))
    unseal(twin)  # removes the copy's hook, not the original's
    assert input_spec(sealed) is not None
    with torch.no_grad():
        assert torch.equal(sealed(x), vit()(normalized(x)))
