"""Batch helpers: counting the samples of a batch for logging."""

import pytest
import torch

from visionbench.data.batch import count_samples
from visionbench.errors import DataError


def test_count_samples_reads_the_first_tensor_of_any_batch_shape():
    video = torch.zeros(3, 2, 3, 4, 8, 8)  # 3 videos x 2 repeated samples
    assert count_samples(video) == 3
    assert count_samples({"video_id": ["a", "b", "c"], "video": video,
                          "label": torch.zeros(3)}) == 3
    assert count_samples((torch.zeros(5, 3), torch.zeros(5))) == 5
    assert count_samples({"views": [torch.zeros(4, 3), torch.zeros(4, 3)]}) == 4  # nested
    assert count_samples({"step": torch.tensor(1), "x": torch.zeros(2, 1)}) == 2  # 0-d skipped
    with pytest.raises(DataError, match="no tensor"):
        count_samples({"video_id": ["a"]})
