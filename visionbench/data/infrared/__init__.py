"""Thermal infrared: readers of the infrared segmentation layouts (SODA, MFNet, SCUT-Seg) and
the embedded generator that writes a thermal set in SODA's layout (``synthetic``)."""

from visionbench.data.infrared.readers import (
    SegmentationDataset,
    SegmentationTransform,
    detect_segmentation_format,
    read_segmentation_dataset,
)
from visionbench.data.infrared.synthetic import prepare_thermal

__all__ = [
    "SegmentationDataset",
    "SegmentationTransform",
    "detect_segmentation_format",
    "prepare_thermal",
    "read_segmentation_dataset",
]
