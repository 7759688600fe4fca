"""Finding and loading PneumoniaMNIST (skipped where the data is absent)."""

import numpy as np
import pytest
import torch

from triage.replay.datasets import (
    find_data_dir,
    images_to_tensor,
    labels_to_tensor,
    load_pneumoniamnist_dev,
)

SKIP = "PneumoniaMNIST not found: set TRIAGE_DATA_DIR or place it in ../shared/data"


def test_env_var_pointing_nowhere(monkeypatch, tmp_path):
    monkeypatch.setenv("TRIAGE_DATA_DIR", str(tmp_path))
    assert find_data_dir() is None
    with pytest.raises(FileNotFoundError, match="TRIAGE_DATA_DIR"):
        load_pneumoniamnist_dev()


def test_dev_split_shapes():
    if find_data_dir() is None:
        pytest.skip(SKIP)
    data = load_pneumoniamnist_dev()
    assert data["train_images"].shape == (4690, 28, 28) and data["train_images"].dtype == np.uint8
    assert data["val_images"].shape == (516, 28, 28)
    assert set(np.unique(data["train_labels"])) == {0, 1}
    assert int(data["val_labels"].sum()) == 381  # pneumonia count from the data README


def test_images_to_tensor():
    images = np.full((2, 28, 28), 255, dtype=np.uint8)
    x = images_to_tensor(images, 64)
    assert x.shape == (2, 1, 64, 64) and x.dtype == torch.float32
    assert torch.allclose(x, torch.ones_like(x))
    assert labels_to_tensor(np.array([[1], [0]])).tolist() == [1, 0]
    with pytest.raises(ValueError, match="images"):
        images_to_tensor(images[0], 64)
