"""Saving and loading a trained model (classifier + loss predictor) to one file."""

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic
import torch

from triage.model.calibration import OperatingPoint
from triage.model.epistemic import EpistemicHead
from triage.model.lossnet import LossPredictor, build_loss_predictor
from triage.model.network import TriageNet, build_network
from triage.model.settings import ModelSettings

FORMAT = "triage-checkpoint"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint; both modules are in eval mode.

    Attributes:
        settings: The model settings the networks were built from.
        network: The classifier.
        loss_predictor: The loss predictor, or None if none was saved.
        metadata: Free-form JSON-compatible metadata (e.g. version, metrics).
        epistemic: The last-layer Laplace posterior and feature density fitted after
            training (`triage.model.epistemic`), or None (older files, or not fitted).
        judge: The network that was judged on the validation labels, trained without
            them, when `network` is its refit on every label
            (`retrain.refit_on_all_labels`); None when `network` itself was judged.
    """

    settings: ModelSettings
    network: TriageNet
    loss_predictor: LossPredictor | None
    metadata: dict[str, Any] = field(default_factory=dict)
    epistemic: EpistemicHead | None = None
    judge: TriageNet | None = None

    @property
    def held_out_network(self) -> TriageNet:
        """The network to score on the validation labels: it never trained on them."""
        return self.judge if self.judge is not None else self.network

    @property
    def operating_point(self) -> OperatingPoint:
        """Temperature and threshold stored with the model (identity for older files)."""
        return OperatingPoint.from_json(self.metadata.get("operating_point"))


def save_checkpoint(
    path: str | os.PathLike[str],
    network: TriageNet,
    loss_predictor: LossPredictor | None,
    settings: ModelSettings,
    metadata: Mapping[str, Any] | None = None,
    epistemic: EpistemicHead | None = None,
    judge: TriageNet | None = None,
) -> Path:
    """Write network and loss predictor weights, settings and metadata to `path`.

    The file is written next to `path` and renamed into place, so a reader never
    sees a half-written checkpoint.

    Args:
        path: Destination file.
        network: The classifier built from `settings`.
        loss_predictor: Its loss predictor, or None.
        settings: The model settings.
        metadata: JSON-serialisable mapping, e.g. {"version": "2024-05-01", "metrics": {...}}.
        epistemic: The network's fitted `EpistemicHead`, or None.
        judge: The judged network when `network` is its refit on every label, or None.

    Returns:
        The path written.
    """
    meta = dict(metadata or {})
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"metadata must be JSON-serialisable: {exc}") from exc
    # metadata travels as a JSON string: weights_only loading accepts only plain containers
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "settings": json.dumps(settings.model_dump(mode="json")),
        "metadata": json.dumps(meta),
        "network": network.state_dict(),
        "loss_predictor": None if loss_predictor is None else loss_predictor.state_dict(),
        "epistemic": None if epistemic is None else epistemic.state(),
        "judge_network": None if judge is None else judge.state_dict(),
    }
    target = Path(path)
    partial = target.with_name(target.name + ".partial")
    torch.save(payload, partial)
    os.replace(partial, target)
    return target


def load_checkpoint(
    path: str | os.PathLike[str], expected: ModelSettings | None = None
) -> Checkpoint:
    """Load a checkpoint written by `save_checkpoint` (with `weights_only=True`).

    Args:
        path: The checkpoint file.
        expected: If given, the saved settings must describe the same network
            (`labels`, `input_size`, `channels`, strides, `subunits`, `lossnet_width`).

    Returns:
        The `Checkpoint`.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: The file is corrupt, not a triage checkpoint, or does not match
            its settings or `expected`; the message names the file.
    """
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"checkpoint {source} does not exist")
    try:
        payload = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged files
        raise ValueError(f"checkpoint {source} is corrupt or unreadable: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"checkpoint {source} is not a {FORMAT} file")
    if payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {source} has format_version {payload.get('format_version')!r}, "
            f"this build reads {FORMAT_VERSION}"
        )
    try:
        settings = ModelSettings.model_validate(json.loads(payload["settings"]))
        metadata = json.loads(payload["metadata"])
    except (KeyError, TypeError, ValueError, pydantic.ValidationError) as exc:
        raise ValueError(f"checkpoint {source} has invalid settings or metadata: {exc}") from exc
    if expected is not None:
        keys = ("labels", "input_size", "channels", "stage_strides", "subunits",
                "lossnet_width")
        for key in keys:
            if getattr(settings, key) != getattr(expected, key):
                raise ValueError(
                    f"checkpoint {source} was trained with {key}={getattr(settings, key)!r}, "
                    f"configuration expects {getattr(expected, key)!r}"
                )
    network = build_network(settings)
    loss_predictor = epistemic = judge = None
    try:
        network.load_state_dict(payload["network"])
        if payload.get("judge_network") is not None:
            judge = build_network(settings)
            judge.load_state_dict(payload["judge_network"])
            judge.eval()
        if payload.get("loss_predictor") is not None:
            loss_predictor = build_loss_predictor(settings)
            loss_predictor.load_state_dict(payload["loss_predictor"])
        if payload.get("epistemic") is not None:
            epistemic = EpistemicHead.from_state(payload["epistemic"])
            features, classes = network.fc.in_features, network.fc.out_features
            if tuple(epistemic.weights.shape[1:]) != (features + 1, classes):
                raise RuntimeError(f"epistemic head of shape {tuple(epistemic.weights.shape)}")
    except (KeyError, RuntimeError, TypeError, AttributeError) as exc:
        raise ValueError(f"checkpoint {source} weights do not match its settings: {exc}") from exc
    network.eval()
    if loss_predictor is not None:
        loss_predictor.eval()
    return Checkpoint(settings, network, loss_predictor, metadata, epistemic, judge)
