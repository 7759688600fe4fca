"""Locating and loading the PneumoniaMNIST development data.

PneumoniaMNIST (MedMNIST v2, CC BY 4.0): 28x28 uint8 chest X-rays, labels
0 = normal, 1 = pneumonia. The files are not part of the repository: they are
looked up in the directory named by the environment variable
`TRIAGE_DATA_DIR`, else in `../shared/data` next to the repository root. Users
outside this environment can get the original data with the `medmnist`
package (`PneumoniaMNIST(split=..., download=True)`).
"""

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ENV_VAR = "TRIAGE_DATA_DIR"
DEV_FILE = "pneumoniamnist_dev.npz"
DEV_KEYS = ("train_images", "train_labels", "val_images", "val_labels")
HOLDOUT_FILE = "pneumoniamnist_holdout.npz"
HOLDOUT_KEYS = ("test_images", "test_labels")


def find_data_dir() -> Path | None:
    """Directory holding `pneumoniamnist_dev.npz`, or None if none is found.

    `$TRIAGE_DATA_DIR` wins when set (None if the file is not there); otherwise
    `<repository root>/../shared/data` is tried.
    """
    configured = os.environ.get(ENV_VAR)
    if configured:
        candidate = Path(configured).expanduser()
        return candidate if (candidate / DEV_FILE).is_file() else None
    candidate = Path(__file__).resolve().parents[3] / "shared" / "data"
    return candidate if (candidate / DEV_FILE).is_file() else None


def load_pneumoniamnist_dev(data_dir: Path | None = None) -> dict[str, np.ndarray]:
    """Load the development split (never the holdout).

    Args:
        data_dir: Directory of the file; default `find_data_dir()`.

    Returns:
        `train_images` uint8 [4690, 28, 28], `train_labels` uint8 [4690, 1],
        `val_images` uint8 [516, 28, 28], `val_labels` uint8 [516, 1].

    Raises:
        FileNotFoundError: The file cannot be found.
    """
    return _load_arrays(DEV_FILE, DEV_KEYS, data_dir)


def images_to_tensor(images: np.ndarray, input_size: int) -> torch.Tensor:
    """uint8 images [N, H, W] to float [N, 1, input_size, input_size] in [0, 1] (bilinear)."""
    if images.ndim != 3:
        raise ValueError(f"images must be [N, H, W], got shape {images.shape}")
    if input_size < 1:
        raise ValueError(f"input_size must be >= 1, got {input_size}")
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0).unsqueeze(1)
    if x.shape[-2:] != (input_size, input_size):
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False)
    return x.clamp_(0.0, 1.0)


def labels_to_tensor(labels: np.ndarray) -> torch.Tensor:
    """Labels [N] or [N, 1] to torch.long [N]."""
    return torch.from_numpy(np.asarray(labels).reshape(-1).astype(np.int64))


def load_pneumoniamnist_holdout(data_dir: Path | None = None) -> dict[str, np.ndarray]:
    """Load the holdout test split: for final reported figures only (never for training,
    model selection or thresholds).

    Returns:
        `test_images` uint8 [621, 28, 28], `test_labels` uint8 [621, 1].

    Raises:
        FileNotFoundError: The file cannot be found.
    """
    return _load_arrays(HOLDOUT_FILE, HOLDOUT_KEYS, data_dir)


def _load_arrays(name: str, keys: tuple[str, ...], data_dir: Path | None) -> dict[str, np.ndarray]:
    directory = data_dir if data_dir is not None else find_data_dir()
    if directory is None or not (Path(directory) / name).is_file():
        raise FileNotFoundError(f"{name} not found: set {ENV_VAR} or place it in ../shared/data")
    with np.load(Path(directory) / name) as archive:
        missing = [k for k in keys if k not in archive]
        if missing:
            raise ValueError(f"{Path(directory) / name} lacks arrays {missing}")
        return {key: archive[key] for key in keys}
