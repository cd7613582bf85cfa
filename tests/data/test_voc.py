import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visionbench.data.images.scenes import (
    SCENE_CLASSES,
    generate_scene,
    generate_scenes,
    load_scenes,
    prepare_scenes,
    scenes_root,
)
from visionbench.data.images.voc import VOC_CLASSES, VOCDetection, read_split, write_voc
from visionbench.errors import DataError

CLASSES = ["cat", "dog", "person"]


def solid(colour, size=(40, 30)) -> Image.Image:
    return Image.new("RGB", size, colour)


def samples() -> list[dict]:
    return [
        {"image_id": "000001", "image": solid((200, 10, 10)),
         "boxes": torch.tensor([[0.0, 0.0, 40.0, 30.0], [5.0, 6.0, 20.0, 18.0]]),
         "labels": torch.tensor([3, 1]), "difficult": torch.tensor([False, True])},
        {"image_id": "000002", "image": np.full((20, 24, 3), 90, np.uint8),
         "boxes": [[2.0, 3.0, 10.5, 12.0]], "labels": [2]},
        {"image_id": "000003", "image": solid((0, 0, 255)), "boxes": torch.zeros(0, 4),
         "labels": torch.zeros(0, dtype=torch.int64)},
    ]


@pytest.fixture
def voc(tmp_path: Path) -> Path:
    return write_voc(tmp_path / "voc", samples(), CLASSES,
                     {"trainval": ["000001", "000003"], "test": ["000002"]})


def test_write_read_round_trip(voc: Path) -> None:
    assert read_split(voc, "trainval") == ["000001", "000003"]
    assert (voc / "ImageSets" / "Main" / "test.txt").read_text() == "000002\n"
    train = VOCDetection(voc, "trainval", classes=CLASSES)
    assert len(train) == 2 and train.ids == ["000001", "000003"]
    first = train[0]
    assert first["image_id"] == "000001"
    assert first["image"].mode == "RGB" and first["image"].size == (40, 30)
    assert np.abs(np.asarray(first["image"], float) - (200, 10, 10)).max() < 8  # JPEG
    assert first["boxes"].dtype == torch.float32 and first["labels"].dtype == torch.int64
    assert torch.equal(first["boxes"], torch.tensor([[0.0, 0, 40, 30], [5, 6, 20, 18]]))
    assert first["labels"].tolist() == [3, 1] and first["difficult"].tolist() == [False, True]
    empty = train[1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    test = VOCDetection(voc, "test", classes=CLASSES)
    item = test[0]
    assert item["image"].size == (24, 20)
    assert torch.allclose(item["boxes"], torch.tensor([[2.0, 3.0, 10.5, 12.0]]))
    assert item["labels"].tolist() == [2] and item["difficult"].tolist() == [False]
    assert test.annotations[0].width == 24 and test.annotations[0].height == 20
    target = test.target(0)
    assert "image" not in target and target["image_id"] == "000002"
    without = VOCDetection(voc, "trainval", classes=CLASSES, keep_difficult=False)
    assert without[0]["labels"].tolist() == [3]


def test_xml_is_voc_1_based_and_a_whole_image_box_reads_as_the_image(voc: Path) -> None:
    xml = (voc / "Annotations" / "000001.xml").read_text()
    assert "<xmin>1</xmin>" in xml and "<xmax>40</xmax>" in xml and "<ymax>30</ymax>" in xml
    assert "<name>person</name>" in xml and "<difficult>1</difficult>" in xml
    assert "<width>40</width>" in xml


def test_reads_a_hand_written_voc_annotation(tmp_path: Path) -> None:
    root = tmp_path / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    solid((1, 2, 3), (500, 375)).save(root / "JPEGImages" / "000005.jpg")
    (root / "ImageSets/Main/trainval.txt").write_text("000005\n\n")
    (root / "Annotations/000005.xml").write_text(
        "<annotation><folder>VOC2007</folder><filename>000005.jpg</filename>"
        "<size><width>500</width><height>375</height><depth>3</depth></size>"
        "<object><name>chair</name><pose>Rear</pose><truncated>0</truncated>"
        "<difficult>0</difficult><bndbox><xmin>263</xmin><ymin>211</ymin><xmax>324</xmax>"
        "<ymax>339</ymax></bndbox></object>"
        "<object><name>person</name><bndbox><xmin>5</xmin><ymin>1</ymin><xmax>67</xmax>"
        "<ymax>100.5</ymax></bndbox><part><name>head</name></part></object></annotation>")
    data = VOCDetection(root, "trainval")
    assert data.classes == list(VOC_CLASSES)
    sample = data[0]
    assert sample["boxes"].tolist() == [[262.0, 210.0, 324.0, 339.0], [4.0, 0.0, 67.0, 100.5]]
    assert sample["labels"].tolist() == [VOC_CLASSES.index("chair") + 1,
                                         VOC_CLASSES.index("person") + 1]
    assert sample["difficult"].tolist() == [False, False]


def test_bad_xml_and_unknown_class_name_the_file(voc: Path) -> None:
    bad = voc / "Annotations" / "000003.xml"
    bad.write_text("<annotation><object><name>cat</name>")
    with pytest.raises(DataError) as err:
        VOCDetection(voc, "trainval", classes=CLASSES)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DataError) as err:
        VOCDetection(voc, "test", classes=["cat", "person"])  # 000002 is a dog
    message = str(err.value)
    assert str(voc / "Annotations" / "000002.xml") in message and "'dog'" in message
    bad.write_text("<annotation><object><name>cat</name><bndbox><xmin>a</xmin></bndbox>"
                   "</object></annotation>")
    with pytest.raises(DataError, match=r"000003\.xml.*xmin"):
        VOCDetection(voc, "trainval", classes=CLASSES)


def test_bad_layout_is_a_data_error_naming_what_is_missing(voc: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"val\.txt.*available: test, trainval"):
        VOCDetection(voc, "val", classes=CLASSES)
    with pytest.raises(DataError, match="Pascal VOC folder not found"):
        VOCDetection(tmp_path / "nowhere")
    (voc / "Annotations" / "000002.xml").unlink()
    with pytest.raises(DataError, match=r"000002\.xml.*not found"):
        VOCDetection(voc, "test", classes=CLASSES)
    (voc / "JPEGImages" / "000001.jpg").unlink()
    with pytest.raises(DataError, match=r"000001\.jpg.*not found"):
        VOCDetection(voc, "trainval", classes=CLASSES)
    (voc / "ImageSets" / "Main" / "trainval.txt").write_text("\n")
    with pytest.raises(DataError, match="no image ids"):
        VOCDetection(voc, "trainval", classes=CLASSES)


def test_writer_rejects_bad_samples(tmp_path: Path) -> None:
    sample = samples()[1]
    with pytest.raises(DataError, match="labels outside"):
        write_voc(tmp_path / "a", [{**sample, "labels": [4]}], CLASSES)
    with pytest.raises(DataError, match="twice"):
        write_voc(tmp_path / "b", [sample, sample], CLASSES)
    with pytest.raises(DataError, match="not written"):
        write_voc(tmp_path / "c", [sample], CLASSES, {"test": ["000009"]})


# ----------------------------------------------------------------------------- scenes


def test_scenes_are_deterministic_from_the_seed() -> None:
    a, b = generate_scene(48, 3, "trainval", 5), generate_scene(48, 3, "trainval", 5)
    assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    assert np.array_equal(a["boxes"], b["boxes"]) and np.array_equal(a["labels"], b["labels"])
    other = generate_scene(48, 4, "trainval", 5)
    assert not np.array_equal(np.asarray(a["image"]), np.asarray(other["image"]))
    assert not np.array_equal(np.asarray(a["image"]),
                              np.asarray(generate_scene(48, 3, "test", 5)["image"]))


def test_scene_boxes_are_inside_the_image_tight_and_of_distinct_classes() -> None:
    counts = set()
    for index in range(12):
        scene = generate_scene(48, 0, "trainval", index)
        boxes, labels, coverage = scene["boxes"], scene["labels"], scene["coverage"]
        assert scene["image"].size == (48, 48)
        assert 1 <= len(boxes) <= 4 and len(set(labels.tolist())) == len(labels)
        assert labels.min() >= 1 and labels.max() <= len(SCENE_CLASSES)
        counts.add(len(boxes))
        for (x0, y0, x1, y1), cover in zip(boxes, coverage, strict=True):
            assert 0 <= x0 < x1 <= 48 and 0 <= y0 < y1 <= 48
            inside = np.zeros_like(cover, dtype=bool)
            inside[y0:y1, x0:x1] = True
            assert cover[~inside].max(initial=0) == 0  # every object pixel is in its box
            # tight: each edge row / column holds object pixels
            assert cover[y0, x0:x1].any() and cover[y1 - 1, x0:x1].any()
            assert cover[y0:y1, x0].any() and cover[y0:y1, x1 - 1].any()
        for i in range(len(boxes)):  # objects never overlap
            for j in range(i):
                a, b = boxes[i], boxes[j]
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
    assert len(counts) >= 2


def test_prepare_scenes_writes_voc_once_and_reads_back(tmp_path: Path) -> None:
    root = prepare_scenes(image_size=32, seed=1, n_trainval=3, n_test=2, cache_dir=tmp_path)
    assert root == scenes_root(32, 1, 3, 2, tmp_path)
    assert json.loads((root / "COMPLETE").read_text())["classes"] == SCENE_CLASSES
    assert [p.name for p in tmp_path.iterdir()] == [root.name]  # no temporary left over
    train, test = load_scenes(root, "trainval"), load_scenes(root, "test")
    assert len(train) == 3 and len(test) == 2
    for split, data in (("trainval", train), ("test", test)):
        for index in range(len(data)):
            scene = generate_scene(32, 1, split, index)
            sample = data[index]
            assert sample["image_id"] == scene["image_id"]
            assert sample["boxes"].tolist() == scene["boxes"].astype(float).tolist()
            assert sample["labels"].tolist() == scene["labels"].tolist()
    mtime = (root / "COMPLETE").stat().st_mtime_ns
    assert prepare_scenes(32, 1, 3, 2, cache_dir=tmp_path) == root
    assert (root / "COMPLETE").stat().st_mtime_ns == mtime
    with pytest.raises(DataError, match="other parameters"):
        generate_scenes(root, image_size=32, seed=2, n_trainval=3, n_test=2)
