import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visionbench.data.cache import MARKER
from visionbench.data.video.datamodule import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    VideoClassificationDataModule,
    VideoEvalTransform,
    VideoFinetuneTransform,
    VideoMAEPretrainTransform,
    VideoMultiViewTransform,
    clip_rand_augment,
    multiscale_crop_box,
    random_resized_crop_box,
    same_on_every_frame,
)
from visionbench.data.video.readers import (
    ClassificationListDataset,
    KineticsDataset,
    PretrainListDataset,
    read_frames,
    read_video,
    video_frame_count,
)
from visionbench.data.video.sampling import (
    ClipSampler,
    center_clip_indices,
    multiview_clip_indices,
    pretrain_indices,
    segment_indices,
    segment_multiview_indices,
    spatial_crop_starts,
    train_clip_indices,
)
from visionbench.data.video.synthetic import (
    GENERATOR_VERSION,
    MOTION_CLASSES,
    generate_motion_clips,
    prepare_motion_clips,
    render_clip,
    write_mp4,
)
from visionbench.errors import ConfigError, DataError

SIZE, FRAMES = 32, 16
TRAIN, VAL, TEST = 12, 8, 1  # clips per class: enough for the probes


@pytest.fixture(scope="module")
def motion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_motion_clips(image_size=SIZE, num_frames=FRAMES, seed=0,
                                train_per_class=TRAIN, val_per_class=VAL,
                                test_per_class=TEST,
                                cache_dir=tmp_path_factory.mktemp("vcache"))


def one_line_error(err: pytest.ExceptionInfo, *parts: str) -> str:
    message = str(err.value)
    assert "\n" not in message
    for part in parts:
        assert part in message
    return message


# ----------------------------------------------------------------------------- generator


def test_generated_layout_lists_and_readback(motion: Path) -> None:
    assert len(MOTION_CLASSES) >= 10 and MOTION_CLASSES == sorted(set(MOTION_CLASSES))
    marker = json.loads((motion / MARKER).read_text())
    assert marker["version"] == GENERATOR_VERSION and marker["image_size"] == SIZE
    assert motion.name == f"motion-v{GENERATOR_VERSION}-32px-16f-s0-n{TRAIN}-{VAL}-{TEST}"
    for split, per_class in (("train", TRAIN), ("val", VAL), ("test", TEST)):
        assert sorted(p.name for p in (motion / split).iterdir()) == MOTION_CLASSES
        lines = (motion / f"{split}.csv").read_text().splitlines()
        assert len(lines) == per_class * len(MOTION_CLASSES)
        for line in lines:
            path, label = line.split()
            assert path.startswith(f"{split}/{MOTION_CLASSES[int(label)]}/")
            assert path.endswith(".mp4") and (motion / path).is_file()
    pretrain = (motion / "pretrain.csv").read_text().splitlines()
    assert pretrain == [f"{line.split()[0]} 0 -1"
                        for line in (motion / "train.csv").read_text().splitlines()]

    clip = motion / "train" / "rotate_cw" / "rotate_cw_00003.mp4"
    video = read_video(clip)
    assert video.shape == (FRAMES, SIZE, SIZE, 3) and video.dtype == torch.uint8
    assert video_frame_count(clip) == FRAMES
    assert torch.equal(read_video(clip, [5, 2, 5]), video[[5, 2, 5]])
    assert torch.equal(read_video(clip, [40]), video[[-1]])  # past the end: the last frame

    val = KineticsDataset(motion, "val", sampler=ClipSampler("val", FRAMES, 1))
    assert val.classes == MOTION_CLASSES and len(val) == VAL * len(MOTION_CLASSES)
    assert val.targets == [MOTION_CLASSES.index(Path(e.path).parent.name) for e in val.entries]
    sample = val[7]
    assert sample["video"].shape == (FRAMES, SIZE, SIZE, 3)
    assert sample["video"].dtype == torch.uint8
    assert sample["label"] == val.targets[7] and sample["video_id"] == Path(
        val.entries[7].path).stem
    # the decoded clip is the rendered one (RGB order, range), up to H.264's loss
    class_id = MOTION_CLASSES.index("rotate_cw")
    rendered = render_clip("rotate_cw", SIZE, FRAMES, np.random.default_rng([0, 0, class_id, 3]))
    decoded = video.numpy().astype(float)
    rgb_error = np.abs(decoded - rendered).mean()
    luma = np.array([0.299, 0.587, 0.114])
    assert np.abs((decoded - rendered) @ luma).mean() < 5
    # yuv420p halves the chroma resolution: at 32 px with six coloured objects most of
    # the RGB error is that; channels in BGR order would be far further off
    assert rgb_error < 16 and rgb_error < np.abs(decoded[..., ::-1] - rendered).mean() / 2


def test_generation_is_deterministic_and_written_once(motion: Path, tmp_path: Path) -> None:
    small = dict(image_size=SIZE, num_frames=FRAMES, train_per_class=2, val_per_class=1,
                 test_per_class=0)
    again = generate_motion_clips(tmp_path / "again", seed=0, **small)
    other = generate_motion_clips(tmp_path / "other", seed=1, **small)
    written = sorted(p.relative_to(again) for p in again.rglob("*.mp4"))
    assert len(written) == 3 * len(MOTION_CLASSES)
    for rel in written:  # byte-identical to the larger set's clips of the same index
        assert (again / rel).read_bytes() == (motion / rel).read_bytes(), rel
        assert (other / rel).read_bytes() != (motion / rel).read_bytes(), rel
    name = "translate_ne/translate_ne_00001.mp4"
    assert not (again / "test").exists() and not (again / "test.csv").exists()
    stamp = (again / "train" / name).stat().st_mtime_ns
    assert generate_motion_clips(tmp_path / "again", seed=0, **small) == again
    assert (again / "train" / name).stat().st_mtime_ns == stamp  # not written twice
    with pytest.raises(DataError, match="other parameters"):
        generate_motion_clips(tmp_path / "again", seed=2, **small)
    with pytest.raises(ConfigError):
        generate_motion_clips(tmp_path / "odd", image_size=33)


# ----------------------------------------------------------------------------- decoding


def test_corrupt_missing_and_empty_videos_are_one_line_data_errors(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).bytes(2000))
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    for path in (corrupt, empty):
        for read in (read_video, video_frame_count):
            with pytest.raises(DataError) as err:
                read(path)
            one_line_error(err, str(path), "not a decodable video")
    with pytest.raises(DataError) as err:
        read_video(tmp_path / "absent.mp4")
    one_line_error(err, str(tmp_path / "absent.mp4"), "not found")
    (tmp_path / "list.csv").write_text("corrupt.mp4 0\n")
    with pytest.raises(DataError) as err:
        ClassificationListDataset(tmp_path / "list.csv", tmp_path)[0]
    one_line_error(err, str(corrupt))


# ----------------------------------------------------------------------------- list files


def write_frames(folder: Path, count: int, start: int = 1, size=(12, 10),
                 template: str = "img_{:05}.jpg") -> Path:
    """Frames whose red channel is 8 * (their 0-based position)."""
    folder.mkdir(parents=True)
    for k in range(count):
        Image.new("RGB", size, (8 * k, 100, 200)).save(folder / template.format(start + k))
    return folder


def red(video: torch.Tensor) -> list[int]:
    return [round(float(v) / 8) for v in video[..., 0].float().mean(dim=(-1, -2)).reshape(-1)]


def test_pretrain_list_of_videos_and_raw_frames(motion: Path, tmp_path: Path) -> None:
    write_frames(tmp_path / "frames" / "182040", 20, start=1)
    write_frames(tmp_path / "frames" / "AVA" / "clip7", 12, start=9601)
    video = "train/expand/expand_00000.mp4"
    (tmp_path / "pretrain.csv").write_text(
        f"{motion / video} 0 -1\nframes/182040 1 20\n\nframes/AVA/clip7 9601 12\n")
    ds = PretrainListDataset(tmp_path / "pretrain.csv", tmp_path,
                             sampler=ClipSampler("pretrain", num_frames=4, sampling_rate=2))
    assert len(ds) == 3 and ds.targets == [-1, -1, -1] and ds.classes == []
    assert [e.is_video for e in ds.entries] == [True, False, False]
    first = ds[0]  # an absolute path stays as it is
    assert first["video"].shape == (4, SIZE, SIZE, 3) and first["label"] == -1
    assert first["video_id"] == "expand_00000"
    torch.manual_seed(0)
    frames = ds[1]
    assert frames["video"].shape == (4, 10, 12, 3) and frames["video_id"] == "182040"
    positions = red(frames["video"])
    assert np.all(np.diff(positions) == 2) and 0 <= positions[0] <= 20 - 8
    assert red(ds.load(2, ClipSampler("pretrain", 4, 4), np.random.default_rng(0))["video"]) \
        == [0, 4, 8, 8]  # 12 frames < 4 x 4: padded as the official
    # the official's default template and start index are used for fine-tune frame lists
    assert red(read_frames(tmp_path / "frames" / "182040", [0, 19])) == [0, 19]


def test_classification_lists_of_videos_and_frame_folders(motion: Path, tmp_path: Path) -> None:
    write_frames(tmp_path / "ssv2" / "74225", 32, start=1)
    (tmp_path / "list.csv").write_text(
        f"{motion}/val/contract/contract_00001.mp4 3\nssv2/74225 32 1\n")
    ds = ClassificationListDataset(tmp_path / "list.csv", tmp_path,
                                   sampler=ClipSampler("val", num_frames=8, sampling_rate=2))
    assert ds.targets == [3, 1] and ds.classes == ["0", "1", "2", "3"]
    assert ds[0]["video"].shape == (8, SIZE, SIZE, 3) and ds[0]["label"] == 3
    sample = ds[1]
    assert sample["label"] == 1 and sample["video_id"] == "74225"
    assert red(sample["video"]) == [2, 6, 10, 14, 18, 22, 26, 30]  # middle of 8 segments
    test = ds.load(1, ClipSampler("test", num_frames=8, test_num_segment=2))
    assert test["video"].shape == (2, 8, 10, 12, 3)
    assert red(test["video"][0]) == [0, 4, 8, 12, 16, 20, 24, 28]
    assert red(test["video"][1]) == [2, 6, 10, 14, 18, 22, 26, 30]
    named = ClassificationListDataset(tmp_path / "list.csv", tmp_path, classes=list("abcd"))
    assert named.classes == list("abcd")
    with pytest.raises(DataError) as err:
        ClassificationListDataset(tmp_path / "list.csv", tmp_path, classes=["a", "b"])
    one_line_error(err, str(tmp_path / "list.csv"), "outside the 2 classes")


def test_in_memory_clips_are_decoded_once_and_read_the_same_frames(motion: Path,
                                                                   tmp_path: Path) -> None:
    import shutil

    clip = tmp_path / "clip.mp4"
    shutil.copy(motion / "train/expand/expand_00000.mp4", clip)
    (tmp_path / "list.csv").write_text("clip.mp4 3\n")
    samplers = [ClipSampler("pretrain", num_frames=4, sampling_rate=2),
                ClipSampler("test", num_frames=8, sampling_rate=4, test_num_segment=2),
                ClipSampler("val", num_frames=8, sampling_rate=8)]  # past the end: pads
    kept = ClassificationListDataset(tmp_path / "list.csv", tmp_path, in_memory=True)
    decoded = ClassificationListDataset(tmp_path / "list.csv", tmp_path)
    expected = [decoded.load(0, s, np.random.default_rng(7))["video"] for s in samplers]
    assert kept.frame_count(0) == decoded.frame_count(0) == FRAMES
    clip.unlink()  # read once by frame_count: every later sample comes from the kept frames
    for sampler, frames in zip(samplers, expected, strict=True):
        got = kept.load(0, sampler, np.random.default_rng(7))
        assert got["label"] == 3 and got["video_id"] == "clip"
        assert torch.equal(got["video"], frames)
    with pytest.raises(DataError):
        decoded.load(0)  # without in_memory the file is read every time


@pytest.mark.parametrize(("reader", "text", "line", "what"), [
    ("classification", "a.mp4 0\nb.mp4\n", 2, "1 fields"),
    ("classification", "a.mp4 zero\n", 1, "label 'zero' is not an integer"),
    ("classification", "a.mp4 1\nframes 10 -3\n", 2, "negative label"),
    ("classification", "a.mp4 1 2 3\n", 1, "4 fields"),
    ("classification", "frames 0 1\n", 1, "0 frames"),
    ("pretrain", "a.mp4 0 -1\n# comment\na.mp4 0\n", 3, "2 fields"),
    ("pretrain", "a.mp4 0 many\n", 1, "total frames 'many'"),
])
def test_malformed_lines_name_the_file_and_line(tmp_path: Path, reader: str, text: str,
                                                line: int, what: str) -> None:
    path = tmp_path / "list.csv"
    path.write_text(text)
    cls = ClassificationListDataset if reader == "classification" else PretrainListDataset
    with pytest.raises(DataError) as err:
        cls(path, tmp_path)
    one_line_error(err, f"{path}:{line}:", what)


def test_missing_and_empty_list_files(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        ClassificationListDataset(tmp_path / "nope.csv")
    one_line_error(err, "nope.csv", "list file not found")
    (tmp_path / "empty.csv").write_text("\n\n")
    with pytest.raises(DataError) as err:
        PretrainListDataset(tmp_path / "empty.csv")
    one_line_error(err, "empty.csv", "lists no clips")


def test_kinetics_layout_classes_and_a_mislabelled_clip(motion: Path, tmp_path: Path) -> None:
    root = tmp_path / "k"
    clip = render_clip("translate_e", 32, 8, np.random.default_rng(0))
    for name in ("walk", "jump"):
        (root / "train" / name).mkdir(parents=True)
        write_mp4(root / "train" / name / f"{name}_0.mp4", clip)
    (root / "train.csv").write_text("train/jump/jump_0.mp4 0\ntrain/walk/walk_0.mp4 1\n")
    ds = KineticsDataset(root, "train")
    assert ds.classes == ["jump", "walk"] and ds.targets == [0, 1]
    assert ds[1]["video"].shape == (16, 32, 32, 3)  # 8 frames padded to 16
    (root / "train.csv").write_text("train/jump/jump_0.mp4 0\ntrain/walk/walk_0.mp4 0\n")
    with pytest.raises(DataError) as err:
        KineticsDataset(root, "train")
    one_line_error(err, f"{root / 'train.csv'}:2:", "class folder 'walk'")


# ----------------------------------------------------------------------------- sampling


def test_pretrain_sampling_strides_inside_the_clip_and_pads_short_clips() -> None:
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(300):
        ix = pretrain_indices(100, 16, 4, rng)
        assert len(ix) == 16 and np.all(np.diff(ix) == 4)
        assert ix[0] >= 0 and ix[-1] < 100
        starts.add(int(ix[0]))
    assert starts == set(range(100 - 64 + 1))  # every start that fits
    assert pretrain_indices(64, 16, 4, 0).tolist() == list(range(0, 64, 4))
    # shorter than 16 x 4: strided while it fits, then the last frame again
    assert pretrain_indices(10, 16, 4, 0).tolist() == [0, 4, 8] + [8] * 13
    assert np.all(np.diff(pretrain_indices(40, 16, 2, 0)) == 2)
    assert pretrain_indices(1, 4, 2, 0).tolist() == [0, 0, 0, 0]


def test_finetune_train_and_central_clips() -> None:
    rng = np.random.default_rng(1)
    for _ in range(100):
        ix = train_clip_indices(300, 16, 4, rng)
        assert len(ix) == 16 and np.all(np.diff(ix) > 0) and ix[0] >= 0 and ix[-1] < 300
        assert ix[-1] - ix[0] <= 64 and np.all(np.abs(np.diff(ix) - 4) <= 1)
    centre = center_clip_indices(300, 16, 4)
    assert (centre[0] + centre[-1]) / 2 == pytest.approx(150, abs=3)
    short = train_clip_indices(16, 16, 4, rng)  # 16 / 4 frames spread, then the last repeated
    assert short.tolist() == [0, 5, 10, 15] + [15] * 12
    assert np.array_equal(center_clip_indices(16, 16, 4), short)


def test_multiview_clips_are_evenly_spaced_segments() -> None:
    views = multiview_clip_indices(300, 16, 4, num_segments=5)
    assert views.shape == (5, 16) and np.all(np.diff(views, axis=1) == 4)
    starts = views[:, 0]
    assert starts[0] == 0 and views[-1, -1] == 296  # the last strided frame
    assert np.all(np.abs(np.diff(starts) - np.diff(starts).mean()) <= 4)
    assert multiview_clip_indices(300, 16, 4, num_segments=1)[0, 0] == (75 - 16) // 2 * 4
    padded = multiview_clip_indices(20, 16, 4, num_segments=2)  # 5 strided frames, padded
    assert padded.tolist() == [[0, 4, 8, 12, 16] + [16] * 11] * 2
    segments = segment_multiview_indices(48, 16, test_num_segment=2)
    assert segments.shape == (2, 16)
    assert segments[0].tolist() == list(range(0, 48, 3))
    assert segments[1].tolist() == [int(1.5 + 3 * x) for x in range(16)]
    assert segment_indices(48, 16, train=False).tolist() == list(range(1, 48, 3))
    train = segment_indices(48, 16, rng=np.random.default_rng(0))
    assert np.all((train // 3) == np.arange(16))
    assert segment_indices(5, 8, rng=0).tolist() == [0, 0, 0, 0, 1, 2, 3, 4]
    assert spatial_crop_starts(48, 32, 3) == [0, 8, 16]
    assert spatial_crop_starts(32, 32, 3) == [0, 0, 0]
    assert spatial_crop_starts(48, 32, 1) == [8]
    sampler = ClipSampler("test", 16, 4, test_num_segment=5)
    assert sampler(300).shape == (5, 16) and sampler(300, is_video=False).shape == (5, 16)
    with pytest.raises(ConfigError):
        ClipSampler("bogus")
    with pytest.raises(ConfigError):
        ClipSampler("train", num_frames=0)


# ----------------------------------------------------------------------------- transforms


def coded_clip(t: int = 6, h: int = 20, w: int = 30) -> torch.Tensor:
    """uint8 (T, H, W, 3): red = column, green = row, blue = 10 * frame."""
    x = torch.zeros(t, h, w, 3, dtype=torch.uint8)
    x[..., 0] = torch.arange(w, dtype=torch.uint8)
    x[..., 1] = torch.arange(h, dtype=torch.uint8)[:, None]
    x[..., 2] = (10 * torch.arange(t, dtype=torch.uint8))[:, None, None]
    return x


def test_multiview_transform_orders_views_segment_major() -> None:
    clips = torch.stack([coded_clip(), coded_clip() + 100])  # 2 segments
    out = VideoMultiViewTransform(10, num_crop=3, normalize=False)(
        {"video": clips, "label": 0, "video_id": "x"})["video"]
    assert out.shape == (6, 3, 6, 10, 10)
    # short side 20 -> 10, long 30 -> 15: crops start at 0, 2, 5 along the width
    for v in range(6):
        segment, crop = divmod(v, 3)
        left_column = out[v, 0, 0, 0, 0] * 255 - 100 * segment
        assert float(left_column) == pytest.approx([0.5, 4.5, 10.5][crop], abs=0.6)
        assert float(out[v, 2, 3, 0, 0] * 255) == pytest.approx(30 + 100 * segment, abs=1)


def test_eval_and_train_transforms_on_tensors() -> None:
    sample = {"video": coded_clip(), "label": 2, "video_id": "x"}
    raw = VideoEvalTransform(10, normalize=False)(sample)["video"]
    assert raw.shape == (3, 6, 10, 10) and 0 <= raw.min() and raw.max() <= 1
    normed = VideoEvalTransform(10)(sample)["video"]
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1), torch.tensor(IMAGENET_STD).view(
        3, 1, 1, 1)
    assert torch.allclose(normed, (raw - mean) / std, atol=1e-5)
    torch.manual_seed(0)
    for transform in (VideoFinetuneTransform(12), VideoMAEPretrainTransform(12)):
        out = transform(sample)
        assert out["video"].shape == (3, 6, 12, 12) and out["label"] == 2
        blue = out["video"][2] * IMAGENET_STD[2] + IMAGENET_MEAN[2]  # one crop for all frames
        assert torch.allclose(blue.mean(dim=(1, 2)) * 255, torch.arange(6.0) * 10, atol=1e-3)
    for _ in range(50):
        top, left, h, w = random_resized_crop_box(20, 30, (0.08, 1.0), (0.75, 1.3333))
        assert 0 <= top and top + h <= 20 and 0 <= left and left + w <= 30
        top, left, h, w = multiscale_crop_box(20, 30, 12)
        assert (h, w) != (0, 0) and top + h <= 20 and left + w <= 30
        assert h in (20, 17, 15, 13, 12) and w in (20, 17, 15, 13, 12)


def test_rand_augment_draws_once_for_all_frames_of_a_clip() -> None:
    import random

    still = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 24, 24, 3),
                                                               dtype=np.uint8)).repeat(5, 1, 1, 1)
    policy = clip_rand_augment("rand-m9-n3-mstd0", 24)
    changed = 0
    for seed in range(8):
        random.seed(seed)
        np.random.seed(seed)
        out = same_on_every_frame(policy, still)
        assert out.shape == still.shape and out.dtype == torch.uint8
        assert (out == out[:1]).all()  # one draw: the same ops and magnitudes on every frame
        changed += int(not torch.equal(out, still))
    assert changed >= 4
    for bad in ("rand-x9", "v0"):
        with pytest.raises(ConfigError, match="auto_augment"):
            clip_rand_augment(bad, 24)


def test_finetune_transform_repeats_draws_and_erases_one_box_through_the_clip() -> None:
    sample = {"video": torch.full((4, 20, 20, 3), 128, dtype=torch.uint8), "label": 1}
    torch.manual_seed(0)
    out = VideoFinetuneTransform(16, auto_augment="rand-m7-n4-mstd0.5-inc1", reprob=0.25,
                                 num_sample=3)(sample)
    assert out["video"].shape == (3, 3, 4, 16, 16) and out["label"] == 1
    out = VideoFinetuneTransform(16, reprob=1.0, num_sample=2)(sample)
    grey = (128 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    boxes = []
    for draw in out["video"]:
        erased = (draw - grey.view(3, 1, 1, 1)).abs().amax(dim=0) > 1e-4  # (T, H, W)
        assert erased.any() and (erased == erased[:1]).all()  # one box, in every frame ...
        assert not torch.equal(draw[:, 0][:, erased[0]], draw[:, 1][:, erased[0]])  # new noise
        boxes.append(erased[0])
    assert not torch.equal(boxes[0], boxes[1])  # ... drawn again for each repeated sample
    plain = VideoFinetuneTransform(16)(sample)["video"]
    assert plain.shape == (3, 4, 16, 16) and torch.allclose(plain, grey.view(3, 1, 1, 1)
                                                            .expand_as(plain), atol=1e-5)
    with pytest.raises(ConfigError, match="num_sample"):
        VideoFinetuneTransform(16, num_sample=0)


# ----------------------------------------------------------------------------- datamodule


def test_datamodule_batches(motion: Path) -> None:
    dm = VideoClassificationDataModule(motion, image_size=24, batch_size=4, num_frames=8,
                                       sampling_rate=2, test_num_segment=2, test_num_crop=3)
    n = len(MOTION_CLASSES)
    assert dm.classes == MOTION_CLASSES and dm.num_classes == n and dm.num_views == 6
    assert dm.splits.format == "kinetics"
    assert len(dm.splits.train) == TRAIN * n and len(dm.splits.val) == VAL * n
    assert len(dm.splits.test) == TEST * n
    assert dm.input_spec.mean == IMAGENET_MEAN and dm.input_spec.std == IMAGENET_STD

    batch = next(iter(dm.train_dataloader()))
    assert batch["video"].shape == (4, 3, 8, 24, 24) and batch["video"].dtype == torch.float32
    assert batch["label"].dtype == torch.int64 and batch["label"].shape == (4,)
    assert isinstance(batch["video_id"], list) and len(batch["video_id"]) == 4

    normed = next(iter(dm.eval_dataloader("val")))
    raw = next(iter(dm.eval_dataloader("val", raw=True)))
    assert normed["video"].shape == raw["video"].shape == (4, 3, 8, 24, 24)
    assert 0 <= raw["video"].min() and raw["video"].max() <= 1
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1, 1)
    assert torch.allclose(normed["video"], (raw["video"] - mean) / std, atol=1e-5)
    assert normed["video_id"] == raw["video_id"] and torch.equal(normed["label"], raw["label"])

    test = next(iter(dm.test_dataloader()))
    assert test["video"].shape == (4, 6, 3, 8, 24, 24)
    assert test["label"].shape == (4,) and len(test["video_id"]) == 4
    assert next(iter(dm.val_dataloader()))["video"].shape == (4, 3, 8, 24, 24)
    with pytest.raises(ConfigError):
        dm.eval_dataloader("holdout")


def test_datamodule_carves_val_and_test_from_lists(motion: Path, tmp_path: Path) -> None:
    lines = (motion / "train.csv").read_text()
    (tmp_path / "train.csv").write_text(lines)
    dm = VideoClassificationDataModule(tmp_path, batch_size=2, data_root=motion,
                                       val_fraction=0.25, test_fraction=0.25, label_fraction=0.5)
    dm.setup()
    n = len(MOTION_CLASSES)
    assert dm.splits.format == "list" and dm.classes == [str(i) for i in range(n)]
    assert len(dm.splits.val) == len(dm.splits.test) == 3 * n  # a quarter of 12 a class
    assert len(dm.splits.train) == 3 * n  # half of the 6 a class left
    assert sorted(np.bincount(dm.splits.val.targets).tolist()) == [3] * n  # stratified
    only_val = VideoClassificationDataModule(None, train_list=tmp_path / "train.csv",
                                             val_list=motion / "val.csv", data_root=motion)
    only_val.setup()  # a val list and no test list: val is the test set, val is carved
    assert len(only_val.splits.test) == VAL * len(MOTION_CLASSES)
    assert len(only_val.splits.val) == round(0.1 * TRAIN * len(MOTION_CLASSES))
    with pytest.raises(DataError) as err:
        VideoClassificationDataModule(tmp_path / "nothing").setup()
    one_line_error(err, "train list not found")
    with pytest.raises(ConfigError):
        VideoClassificationDataModule(motion, train_kind="bogus")


# ----------------------------------------------------------------------------- probes


def _blur(a: np.ndarray) -> np.ndarray:
    taps = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0
    out = sum(w * np.roll(a, k - 2, axis=-1) for k, w in enumerate(taps))
    return sum(w * np.roll(out, k - 2, axis=-2) for k, w in enumerate(taps))


def _box(a: np.ndarray, r: int = 2) -> np.ndarray:
    return sum(np.roll(a, (dy, dx), axis=(-2, -1))
               for dy in range(-r, r + 1) for dx in range(-r, r + 1))


def flow_features(clip: np.ndarray) -> np.ndarray:
    """Clip-level motion features: Lucas-Kanade flow between consecutive frames, the
    background's (median) flow subtracted, and per frame pair the moving region's mean flow
    and its rotation and divergence about its centroid, averaged over the clip."""
    g = _blur(clip.astype(np.float64).mean(-1))
    mid, it = 0.5 * (g[1:] + g[:-1]), g[1:] - g[:-1]
    ix = 0.5 * (np.roll(mid, -1, -1) - np.roll(mid, 1, -1))
    iy = 0.5 * (np.roll(mid, -1, -2) - np.roll(mid, 1, -2))
    sxx, sxy, syy, sxt, syt = (_box(v) for v in (ix * ix, ix * iy, iy * iy, ix * it, iy * it))
    det = sxx * syy - sxy**2 + 1e-3
    vx, vy = -(syy * sxt - sxy * syt) / det, -(sxx * syt - sxy * sxt) / det
    h, w = g.shape[1:]
    ys, xs = np.mgrid[0:h, 0:w]
    feats = []
    for t in range(len(vx)):
        valid = det[t] > np.percentile(det[t], 30)
        u, v = vx[t] - np.median(vx[t][valid]), vy[t] - np.median(vy[t][valid])
        weight = np.clip(np.hypot(u, v) - 0.3, 0, None) * valid
        cx = np.angle((weight * np.exp(2j * np.pi * xs / w)).sum()) / (2 * np.pi) * w
        cy = np.angle((weight * np.exp(2j * np.pi * ys / h)).sum()) / (2 * np.pi) * h
        dx, dy = (xs - cx + w / 2) % w - w / 2, (ys - cy + h / 2) % h - h / 2
        total, spread = weight.sum() + 1e-9, (weight * (dx * dx + dy * dy)).sum() + 1e-9
        feats.append([(weight * u).sum() / total, (weight * v).sum() / total,
                      (weight * (dx * v - dy * u)).sum() / spread,
                      (weight * (dx * u + dy * v)).sum() / spread])
    feats = np.array(feats)
    return np.concatenate([feats.mean(0), np.median(feats, 0)])


def frame_features(frames: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) -> per frame: an 8 x 8 RGB thumbnail; an 8 x 8 saliency map (distance
    from the frame's median colour: where the objects are); the joint 4 x 4 x 4 colour
    histograms of the frame and of its salient pixels (which colours); mean and std."""
    f = frames.astype(np.float64) / 255.0
    n, h, w, _ = f.shape

    def thumb(a: np.ndarray) -> np.ndarray:
        return a.reshape(n, 8, h // 8, 8, w // 8, -1).mean(axis=(2, 4)).reshape(n, -1)

    saliency = np.abs(f - np.median(f, axis=(1, 2), keepdims=True)).sum(-1)
    salient = saliency > np.percentile(saliency, 85, axis=(1, 2), keepdims=True)
    bins = np.minimum(frames // 64, 3).astype(np.int64)
    code = (bins[..., 0] * 16 + bins[..., 1] * 4 + bins[..., 2]).reshape(n, -1)
    hist = np.stack([np.bincount(c, minlength=64) for c in code]) / code.shape[1]
    hist_salient = np.stack([np.bincount(c[m], minlength=64) / max(m.sum(), 1)
                             for c, m in zip(code, salient.reshape(n, -1), strict=True)])
    return np.concatenate([thumb(f), thumb(saliency[..., None]), hist, hist_salient,
                           f.mean(axis=(1, 2)), f.std(axis=(1, 2))], axis=1)


def linear_probe(x_train, y_train, x_test, y_test, num_classes: int, wd: float) -> float:
    """Test accuracy of an L2-regularized softmax regression (L-BFGS, standardized inputs)."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    xtr = torch.tensor((x_train - mu) / sd)
    xte = torch.tensor((x_test - mu) / sd)
    weight = torch.zeros(xtr.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")
    target = torch.tensor(y_train)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xtr @ weight + bias, target)
        loss = loss + wd * (weight**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((xte @ weight + bias).argmax(1).numpy() == y_test).mean())


@pytest.mark.slow
def test_the_class_is_in_the_motion_not_in_any_frame(motion: Path) -> None:
    k = len(MOTION_CLASSES)
    chance = 1.0 / k
    data = {}
    for split in ("train", "val"):
        ds = KineticsDataset(motion, split)
        clips = np.stack([read_video(e.path).numpy() for e in ds.entries])
        data[split] = (clips, np.array(ds.targets))
    (train, y_train), (val, y_val) = data["train"], data["val"]

    clip_acc = linear_probe(np.stack([flow_features(c) for c in train]), y_train,
                            np.stack([flow_features(c) for c in val]), y_val, k, wd=1e-2)
    assert clip_acc > 3 * chance, clip_acc

    t = train.shape[1]
    all_frames = linear_probe(frame_features(train.reshape(-1, *train.shape[2:])),
                              np.repeat(y_train, t),
                              frame_features(val.reshape(-1, *val.shape[2:])),
                              np.repeat(y_val, t), k, wd=1e-2)
    assert all_frames < 2 * chance, all_frames
    for start in (0, t // 2 - 1, t - 3):  # nor frames at the start, middle or end of clips
        part = slice(start, start + 3)
        acc = linear_probe(frame_features(train[:, part].reshape(-1, *train.shape[2:])),
                           np.repeat(y_train, 3),
                           frame_features(val[:, part].reshape(-1, *val.shape[2:])),
                           np.repeat(y_val, 3), k, wd=1e-2)
        assert acc < 2 * chance, (start, acc)


def test_loader_workers_read_clips_after_this_process_decoded_one(motion: Path) -> None:
    """A worker forked after PyAV decoded in its parent hung; workers start from a fork
    server. Run in a subprocess so a regression fails on the timeout instead of hanging."""
    import subprocess
    import sys

    script = (
        "from visionbench.data.video.datamodule import VideoClassificationDataModule as D\n"
        "from visionbench.data.video.readers import read_video\n"
        "import sys\n"
        "if __name__ == '__main__':\n"
        "    root = sys.argv[1]\n"
        "    dm = D(root, image_size=16, batch_size=8, num_workers=1, num_frames=8,\n"
        "           sampling_rate=2)\n"
        "    dm.setup()\n"
        "    read_video(next(iter(sorted(__import__('pathlib').Path(root).rglob('*.mp4')))))\n"
        "    print(sum(b['video'].shape[0] for b in dm.train_dataloader()))\n")
    result = subprocess.run([sys.executable, "-c", script, str(motion)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.split()[-1]) == TRAIN * len(MOTION_CLASSES)
