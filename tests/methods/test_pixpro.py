"""PixPro: box coordinates, positive pairs, momentum, LARS, the loss, a Lightning step.

``reference_loss`` restates zdaxie/PixPro ``contrast/models/PixPro.py`` (``MLP2d`` with
batch-statistics BN, ``featprop``, ``regression_loss`` with its positive mask, the instance
branch) in float64 with explicit per-image, per-bin loops, and checks the module against it
from the same C5 feature maps. ``reference_lars`` writes out ``contrast/lars.py`` over SGD.
"""

import math
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, default_collate
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from visionbench.backbones import create_backbone
from visionbench.errors import ConfigError
from visionbench.methods import METHODS, method_class
from visionbench.methods.lars import LARS, add_weight_decay
from visionbench.methods.pixpro import (
    CoordView,
    PixPro,
    PixProConfig,
    PixProTransform,
    RandomHorizontalFlipCoord,
    RandomResizedCropCoord,
    bin_centers,
    crop_coords,
    momentum_at,
    positive_mask,
)

HIDDEN, DIM = 16, 8


def tiny_encoder(seed: int = 0):
    torch.manual_seed(seed)
    return create_backbone("resnet18", layers=(1, 1, 1, 1), channels=(8, 16, 32, 32),
                           stem_width=8)


def tiny_section(**kw) -> PixProConfig:
    return PixProConfig(proj_hidden_dim=HIDDEN, proj_dim=DIM, **kw)


def make_pixpro(seed: int = 0, **kw) -> PixPro:
    enc = tiny_encoder(seed)
    return PixPro(enc, tiny_section(**kw), batch_size=4)


def random_image(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode)


# -- coordinates and positive pairs ------------------------------------------------------------


def test_crop_coords_by_hand():
    # An 11 x 21 (W x H) image, crop top 5, left 2, 10 high, 4 wide: official normalization by
    # W - 1 = 10 and H - 1 = 20 of the first / last pixel index.
    got = crop_coords(i=5, j=2, h=10, w=4, height=21, width=11)
    assert torch.allclose(got, torch.tensor([2 / 10, 5 / 20, 5 / 10, 14 / 20]))
    whole = crop_coords(0, 0, 21, 11, 21, 11)
    assert torch.equal(whole, torch.tensor([0.0, 0.0, 1.0, 1.0]))


def test_random_crop_returns_the_box_it_cut():
    img = random_image(37, 23)
    crop = RandomResizedCropCoord(16, scale=(0.08, 1.0))
    torch.manual_seed(3)
    out, coord = crop(img)
    torch.manual_seed(3)
    i, j, h, w = T.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3])
    assert torch.equal(coord, crop_coords(i, j, h, w, 23, 37))
    expected = TF.resized_crop(img, i, j, h, w, [16, 16], T.InterpolationMode.BILINEAR)
    assert out.size == (16, 16) and np.array_equal(np.array(out), np.array(expected))


def test_bin_centres_by_hand_and_flip_reverses_columns():
    coords = torch.tensor([[0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 0.5, 0.5]])  # second: flipped
    cx, cy = bin_centers(coords, 2, 2)
    assert torch.allclose(cx, torch.tensor([[0.25, 0.75, 0.25, 0.75],
                                            [0.875, 0.625, 0.875, 0.625]]))
    assert torch.allclose(cy, torch.tensor([[0.25, 0.25, 0.75, 0.75],
                                            [0.125, 0.125, 0.375, 0.375]]))


def test_positive_mask_by_hand():
    # Query box: the whole image, 2x2 bins of 0.5 (diagonal 0.7071), centres 0.25 / 0.75.
    # Key box [0.5, 0, 1, 0.5]: bins of 0.25 (diagonal 0.3536), centres x 0.625 / 0.875,
    # y 0.125 / 0.375. Distances over the larger diagonal sqrt(0.5), bins row-major:
    # q0 (.25,.25): .559 .901 .559 .901   q1 (.75,.25): .25 .25 .25 .25
    # q2 (.25,.75): 1.03 1.25 .75 1.03    q3 (.75,.75): .901 .901 .559 .559
    cq = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    ck = torch.tensor([[0.5, 0.0, 1.0, 0.5]])
    d = math.sqrt(0.5)
    assert math.sqrt(0.140625 + 0.140625) / d == pytest.approx(0.75)  # q2-k2: just outside
    expected = torch.tensor([[1, 0, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 1, 1.0]])
    mask = positive_mask(cq, ck, 2, 2, 0.7)
    assert mask.shape == (1, 4, 4) and torch.equal(mask[0], expected)
    # pos_ratio 0.76 takes q2-k2 (0.75) in, nothing else changes.
    wider = expected.clone()
    wider[2, 2] = 1
    assert torch.equal(positive_mask(cq, ck, 2, 2, 0.76)[0], wider)
    # The key view flipped ([1, 0, 0.5, 0.5]): its columns swap, so the mask's key columns do.
    flipped = positive_mask(cq, torch.tensor([[1.0, 0.0, 0.5, 0.5]]), 2, 2, 0.7)[0]
    assert torch.equal(flipped, expected[:, [1, 0, 3, 2]])
    # Swapping the roles of the views transposes the mask.
    assert torch.equal(positive_mask(ck, cq, 2, 2, 0.7)[0], expected.T)


# -- transform ----------------------------------------------------------------------------------


def test_flip_swaps_x1_and_x2_and_mirrors_the_view():
    img = random_image(30, 20, seed=1)
    crop = RandomResizedCropCoord(12)
    photometric = T.Compose([T.PILToTensor()])
    torch.manual_seed(7)
    plain, c_plain = CoordView(crop, RandomHorizontalFlipCoord(p=0.0), photometric)(img)
    torch.manual_seed(7)
    flipped, c_flip = CoordView(crop, RandomHorizontalFlipCoord(p=1.0), photometric)(img)
    assert torch.equal(flipped, TF.hflip(plain))
    assert torch.equal(c_flip, c_plain[[2, 1, 0, 3]])
    assert c_flip[0] > c_flip[2] and c_plain[0] < c_plain[2]


def test_transform_outputs_and_collate():
    tf = PixProTransform(32, 3, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    torch.manual_seed(0)
    samples = [tf({"image": random_image(40, 30, seed=s), "label": s}) for s in range(3)]
    for out in samples:
        assert set(out) == {"view1", "view2", "coords1", "coords2"}
        for key in ("view1", "view2"):
            assert out[key].shape == (3, 32, 32) and out[key].dtype == torch.float32
        for key in ("coords1", "coords2"):
            assert out[key].shape == (4,)
            assert bool(((out[key] >= 0) & (out[key] <= 1)).all())
            assert out[key][3] > out[key][1]  # a flip never swaps y
    batch = default_collate(samples)
    assert batch["view1"].shape == (3, 3, 32, 32) and batch["coords2"].shape == (3, 4)
    # Solarize is on view 2 only, blur always on view 1 (BYOL's asymmetric pair).
    names1 = repr(tf.view1.photometric)
    names2 = repr(tf.view2.photometric)
    assert "RandomSolarize" not in names1 and "RandomSolarize" in names2
    grey = PixProTransform(32, 1, [0.5], [0.25])({"image": random_image(40, 30), "label": 0})
    assert grey["view1"].shape == (1, 32, 32)


# -- momentum -------------------------------------------------------------------------------------


def test_momentum_schedule():
    assert momentum_at(0, 1000, 0.99) == pytest.approx(0.99)
    assert momentum_at(500, 1000, 0.99) == pytest.approx(0.995)
    assert momentum_at(1000, 1000, 0.99) == pytest.approx(1.0)
    assert momentum_at(250, 1000, 0.99) == pytest.approx(1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2)


def test_momentum_update_is_m_key_plus_one_minus_m_online():
    model = make_pixpro(ins_loss_weight=0.5).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))  # online and key differ
    pairs = [("encoder", "encoder_k"), ("projector", "projector_k"),
             ("projector_instance", "projector_instance_k")]
    before = {k: [p.clone() for p in getattr(model, k).parameters()] for pair in pairs
              for k in pair}
    buffers = [b.clone() for b in model.encoder_k.buffers()]
    model.update_momentum_encoder(0.9)
    for online, key in pairs:
        for q, k_old, k_new in zip(before[online], before[key], getattr(model, key).parameters(),
                                   strict=True):
            assert torch.allclose(k_new, 0.9 * k_old + 0.1 * q, atol=1e-12)
        for q_old, q_new in zip(before[online], getattr(model, online).parameters(), strict=True):
            assert torch.equal(q_old, q_new)
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.encoder_k.buffers(), strict=True))
    assert all(not p.requires_grad for p in model.encoder_k.parameters())


def test_momentum_runs_once_per_optimizer_step():
    model = make_pixpro()
    model._trainer = SimpleNamespace(global_step=500, num_training_batches=100,
                                     accumulate_grad_batches=1)  # K = 100 x 100 epochs
    assert model.total_steps() == 10000
    assert model.momentum_step() == pytest.approx(momentum_at(500, 10000, 0.99))
    assert model.momentum_step() is None  # a later micro-batch of the same step
    model._trainer.global_step = 501
    assert model.momentum_step() == pytest.approx(momentum_at(501, 10000, 0.99))
    model._trainer = None


# -- LARS -----------------------------------------------------------------------------------------


def test_lars_steps_against_the_written_out_update():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    bias = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    lr, wd, mom, trust, eps = 0.5, 1e-2, 0.9, 1e-3, 1e-8
    opt = LARS([{"params": [bias], "weight_decay": 0.0, "ignore": True},
                {"params": [weight], "weight_decay": wd, "ignore": False}],
               lr=lr, momentum=mom, trust_coef=trust, eps=eps)
    w, b = weight.detach().clone(), bias.detach().clone()
    buf_w = buf_b = None
    for _ in range(2):
        gw, gb = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
        weight.grad, bias.grad = gw.clone(), gb.clone()
        opt.step()
        d = gw + wd * w  # decay first, then the adaptive rate on the decayed gradient
        d = d * (trust * w.norm() / (d.norm() + eps))
        buf_w = d if buf_w is None else mom * buf_w + d
        w = w - lr * buf_w
        buf_b = gb if buf_b is None else mom * buf_b + gb  # bias: no decay, no adaptation
        b = b - lr * buf_b
        assert torch.allclose(weight.detach(), w, rtol=0, atol=1e-14)
        assert torch.allclose(bias.detach(), b, rtol=0, atol=1e-14)
        assert torch.equal(weight.grad, gw)  # gradients are left as they were


def test_pixpro_groups_exclude_bn_bias_and_keys():
    model = make_pixpro()
    groups = model.optimizer_groups()
    no_decay, decay = groups
    assert no_decay["ignore"] is True and no_decay["weight_decay"] == 0
    assert decay["ignore"] is False and decay["weight_decay"] == pytest.approx(1e-5)
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids([model.projector.bn1.weight, model.projector.linear1.bias,
                model.encoder.bn1.weight]) <= ids(no_decay["params"])
    assert ids([model.projector.linear1.weight, model.value_transform.weight,
                model.encoder.conv1.weight]) <= ids(decay["params"])
    assert not ids(model.encoder_k.parameters()) & ids(decay["params"] + no_decay["params"])
    official = add_weight_decay(model, 1e-5)
    assert [ids(g["params"]) for g in groups] == [ids(g["params"]) for g in official]
    opt = model.make_optimizer(groups, 0.25)
    assert isinstance(opt, LARS) and opt.param_groups[1]["momentum"] == 0.9
    assert opt.trust_coef == 1e-3 and opt.eps == 1e-8 and opt.param_groups[0]["lr"] == 0.25


# -- loss -----------------------------------------------------------------------------------------


def ref_normalize(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x / (x * x).sum(dim, keepdim=True).sqrt().clamp_min(1e-12)


def ref_conv1x1(x, conv):
    w = conv.weight.detach()[:, :, 0, 0]
    return torch.einsum("nchw,oc->nohw", x, w) + conv.bias.detach().view(1, -1, 1, 1)


def ref_mlp2d(x, mlp):
    y = ref_conv1x1(x, mlp.linear1)
    mean = y.mean(dim=(0, 2, 3), keepdim=True)
    var = ((y - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)  # training-mode BN: biased var
    bn = mlp.bn1
    y = (y - mean) / torch.sqrt(var + bn.eps) * bn.weight.detach().view(1, -1, 1, 1)
    y = torch.clamp(y + bn.bias.detach().view(1, -1, 1, 1), min=0)
    return ref_conv1x1(y, mlp.linear2)


def ref_featprop(x, layer, vt, gamma):
    n, c, h, w = x.shape
    value = {0: lambda t: t, 1: lambda t: ref_conv1x1(t, vt), 2: lambda t: ref_mlp2d(t, vt)}
    v = ref_normalize(value[layer](x), 1).reshape(n, c, h * w)
    xn = ref_normalize(x, 1).reshape(n, c, h * w)
    out = torch.zeros_like(v)
    for b in range(n):
        for i in range(h * w):
            for j in range(h * w):
                s = max(float(xn[b, :, i] @ xn[b, :, j]), 0.0) ** gamma
                out[b, :, i] += s * v[b, :, j]
    return ref_normalize(out.reshape(n, c, h, w), 1)


def ref_pixel_loss(q, k, cq, ck, ratio):
    n, c, h, w = q.shape
    per_image = []
    for b in range(n):
        def centre(box, r, col):
            x1, y1, x2, y2 = (float(v) for v in box)
            return (x1 + (col + 0.5) * (x2 - x1) / w, y1 + (r + 0.5) * (y2 - y1) / h)

        diag = max(math.hypot((cq[b, 2] - cq[b, 0]) / w, (cq[b, 3] - cq[b, 1]) / h),
                   math.hypot((ck[b, 2] - ck[b, 0]) / w, (ck[b, 3] - ck[b, 1]) / h))
        total, count = 0.0, 0
        for i in range(h * w):
            xq, yq = centre(cq[b], i // w, i % w)
            for j in range(h * w):
                xk, yk = centre(ck[b], j // w, j % w)
                if math.hypot(xq - xk, yq - yk) / diag < ratio:
                    total += float(q[b, :, i // w, i % w] @ k[b, :, j // w, j % w])
                    count += 1
        per_image.append(total / (count + 1e-6))
    return -2 * sum(per_image) / n


def reference_loss(model: PixPro, v1, v2, c1, c2, layer: int) -> float:
    with torch.no_grad():
        f1, f2 = model.encoder.forward_features(v1), model.encoder.forward_features(v2)
        k1, k2 = model.encoder_k.forward_features(v1), model.encoder_k.forward_features(v2)
    g = model.gamma
    p1 = ref_featprop(ref_mlp2d(f1, model.projector), layer, model.value_transform, g)
    p2 = ref_featprop(ref_mlp2d(f2, model.projector), layer, model.value_transform, g)
    z1 = ref_normalize(ref_mlp2d(k1, model.projector_k), 1)
    z2 = ref_normalize(ref_mlp2d(k2, model.projector_k), 1)
    loss = ref_pixel_loss(p1, z2, c1, c2, 0.7) + ref_pixel_loss(p2, z1, c2, c1, 0.7)
    if model.ins_loss_weight > 0:
        def pool(t):
            return ref_normalize(t.mean(dim=(2, 3)), 1)

        q1 = pool(ref_mlp2d(ref_mlp2d(f1, model.projector_instance), model.predictor))
        q2 = pool(ref_mlp2d(ref_mlp2d(f2, model.projector_instance), model.predictor))
        y1 = pool(ref_mlp2d(k1, model.projector_instance_k))
        y2 = pool(ref_mlp2d(k2, model.projector_instance_k))
        ins = -2 * (q1 * y2).sum(1).mean() - 2 * (q2 * y1).sum(1).mean()
        loss = loss + model.ins_loss_weight * float(ins)
    return loss


@pytest.mark.parametrize("layer,ins", [(0, 0.0), (1, 0.0), (2, 0.5)])
def test_loss_matches_float64_restatement(layer, ins):
    model = make_pixpro(transform_layer=layer, ins_loss_weight=ins).double().train()
    with torch.no_grad():  # keys differ from the online side, as after some training
        for key in ("encoder_k", "projector_k", "projector_instance_k"):
            for p in getattr(model, key, torch.nn.Identity()).parameters():
                p.mul_(1 + 0.3 * torch.randn_like(p))
        for p in model.projector.parameters():  # BN scales away from 1, shifts from 0
            p.add_(0.1 * torch.randn_like(p))
    torch.manual_seed(1)
    v1, v2 = torch.randn(3, 3, 96, 96, dtype=torch.float64), torch.randn(3, 3, 96, 96,
                                                                       dtype=torch.float64)
    c1 = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.1, 0.2, 0.7, 0.9], [0.9, 0.1, 0.2, 0.6]])
    c2 = torch.tensor([[0.2, 0.1, 0.8, 0.7], [0.6, 0.3, 0.0, 1.0], [0.3, 0.0, 1.0, 0.5]])
    got = model(v1, v2, c1, c2)
    assert got.dtype == torch.float64 and got.requires_grad
    want = reference_loss(model, v1, v2, c1, c2, layer)
    assert got.item() == pytest.approx(want, rel=1e-9, abs=1e-10)
    assert positive_mask(c1, c2, 3, 3, 0.7).sum() > 0
    got.backward()
    assert model.projector.linear1.weight.grad is not None
    assert all(p.grad is None for p in model.encoder_k.parameters())


# -- Lightning, registry, refusals ------------------------------------------------------------


def test_fast_dev_run_under_lightning():
    data = SimpleNamespace(image_size=64, in_chans=3, mean=[0.485, 0.456, 0.406],
                           std=[0.229, 0.224, 0.225], batch_size=4)
    model_section = SimpleNamespace(backbone="resnet18")
    section = tiny_section(warmup_epochs=0)  # the warmup's first lr is 0: no visible step
    module = method_class("pixpro").from_config(tiny_encoder(), section, model_section, data)
    transform = PixPro.train_transform(section, data)
    torch.manual_seed(0)
    samples = [transform({"image": random_image(80, 70, seed=s), "label": 0}) for s in range(4)]
    loader = DataLoader(samples, batch_size=4)
    before = module.projector.linear1.weight.detach().clone()
    trainer = L.Trainer(fast_dev_run=True, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, loader)
    assert trainer.global_step == 1
    assert isinstance(trainer.optimizers[0], LARS)
    loss = trainer.callback_metrics["train_loss_step"].item()
    assert math.isfinite(loss) and -4.0 - 1e-6 <= loss <= 4.0 + 1e-6
    assert module.base_lr == pytest.approx(1.0 * 4 / 256)
    assert not torch.equal(before, module.projector.linear1.weight)  # LARS stepped
    # Evaluation (the validation loss) runs no momentum update.
    module.eval()
    keys = [p.clone() for p in module.projector_k.parameters()]
    with torch.no_grad():
        assert math.isfinite(module.pretrain_loss(next(iter(loader)), generator_seed=0).item())
    assert all(torch.equal(a, b) for a, b in zip(keys, module.projector_k.parameters(),
                                                 strict=True))


def test_registered_with_the_paper_defaults():
    assert METHODS["pixpro"] is PixPro and PixPro.config is PixProConfig
    assert PixPro.families == ("resnet",) and PixPro.sync_batchnorm is True
    c = PixProConfig()
    assert (c.epochs, c.warmup_epochs, c.blr, c.weight_decay, c.min_lr) == (100, 5, 1.0, 1e-5, 1e-6)
    assert (c.momentum_base, c.pos_ratio, c.gamma, c.transform_layer, c.ins_loss_weight) == (
        0.99, 0.7, 2.0, 1, 0.0)
    assert (c.proj_hidden_dim, c.proj_dim, c.crop_scale) == (4096, 256, (0.08, 1.0))
    with pytest.raises(ValueError):
        PixProConfig(transform_layer=3)
    with pytest.raises(ValueError):
        PixProConfig(crop_scale=(0.5, 0.2))


def test_refuses_a_vit_with_one_line_naming_the_families():
    vit = create_backbone("vit_tiny_patch16_224", img_size=32, depth=1)
    with pytest.raises(ConfigError) as info:
        PixPro.from_config(vit, PixProConfig(), SimpleNamespace(backbone="vit_tiny_patch16_224"),
                           SimpleNamespace(batch_size=4))
    message = str(info.value)
    assert "\n" not in message and "resnet" in message and "vit_tiny_patch16_224" in message


def test_projects_the_c5_map_of_resnet50():
    enc = create_backbone("resnet50", norm="batchnorm")
    model = PixPro(enc, PixProConfig(proj_hidden_dim=HIDDEN, proj_dim=DIM), batch_size=2)
    assert model.projector.linear1.in_channels == 2048  # C5: 2048 x 7 x 7 at 224 (stride 32)
    with torch.no_grad():
        assert enc.eval().forward_features(torch.zeros(1, 3, 64, 64)).shape == (1, 2048, 2, 2)
