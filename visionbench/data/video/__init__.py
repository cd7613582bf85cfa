"""Video: decoding (PyAV), raw-frame folders and VideoMAE V2's list files (``readers``), its
frame sampling (``sampling``), the embedded motion generator that writes the Kinetics layout
(``synthetic``), and the video-classification datamodule (``datamodule``)."""

from visionbench.data.video.datamodule import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    VideoClassificationDataModule,
    VideoEvalTransform,
    VideoFinetuneTransform,
    VideoMAEPretrainTransform,
    VideoMultiViewTransform,
)
from visionbench.data.video.readers import (
    ClassificationListDataset,
    ClipDataset,
    KineticsDataset,
    PretrainListDataset,
    read_frames,
    read_video,
    video_frame_count,
)
from visionbench.data.video.sampling import ClipSampler
from visionbench.data.video.synthetic import (
    MOTION_CLASSES,
    generate_motion_clips,
    prepare_motion_clips,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MOTION_CLASSES",
    "ClassificationListDataset",
    "ClipDataset",
    "ClipSampler",
    "KineticsDataset",
    "PretrainListDataset",
    "VideoClassificationDataModule",
    "VideoEvalTransform",
    "VideoFinetuneTransform",
    "VideoMAEPretrainTransform",
    "VideoMultiViewTransform",
    "generate_motion_clips",
    "prepare_motion_clips",
    "read_frames",
    "read_video",
    "video_frame_count",
]
