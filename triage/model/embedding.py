"""A study's place in the model's feature space, for strategies that score by it.

Some acquisition functions score a study by its pooled features (the last linear
layer's input) together with that layer and a summary of the training features: the
gradient embedding of BADGE, the anchors of ALFA-Mix, the expected output change of
EMOC (the strategies of `triage.gate.strategies`). `score_study` attaches a
`StudyEmbedding` to the result of every model that has an epistemic head, because the
head holds that summary (`FeatureSpace.of`) and the deterministic pass it needs
computes the features anyway; a model without a head gets None, and those strategies
fall back to the uncertainty.

All arrays are numpy: on one study's [K, F] features a numpy product costs a fraction of
a torch call, and the scores are a handful of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

    from triage.model.epistemic import EpistemicHead


@dataclass(frozen=True, eq=False)
class FeatureSpace:
    """One model's last layer and its training features' summary.

    Attributes:
        weight: The last layer's weight, [C, F] (features -> logits).
        bias: Its bias, [C].
        head: The model's fitted epistemic head, whose class Gaussians summarise the
            training features.
    """

    weight: np.ndarray
    bias: np.ndarray
    head: EpistemicHead

    @classmethod
    def of(cls, fc: torch.nn.Linear, head: EpistemicHead) -> FeatureSpace:
        """The feature space of a network's last layer `fc` and its fitted `head` (views
        of their tensors: built per study, it copies nothing)."""
        return cls(weight=fc.weight.detach().numpy(), bias=fc.bias.detach().numpy(),
                   head=head)  # fmt: skip

    @property
    def anchors(self) -> np.ndarray:
        """The class means of the training features, [C, F] (`EpistemicHead.anchors`)."""
        return self.head.anchors

    @property
    def moment(self) -> np.ndarray:
        """The second moment E[a a^T] of the augmented training features a = [phi, 1],
        [F + 1, F + 1] (`EpistemicHead.feature_moment`, computed on first use)."""
        return self.head.feature_moment


@dataclass(frozen=True, eq=False)
class StudyEmbedding:
    """The pooled features of a study's scored images and the model's feature space.

    Attributes:
        features: Deterministic pooled features of the scored images, [K, F].
        space: The model's `FeatureSpace`.
    """

    features: np.ndarray
    space: FeatureSpace

    def logits(self) -> np.ndarray:
        """The last layer's logits of each image, [K, C] (temperature 1)."""
        return self.features @ self.space.weight.T + self.space.bias

    def probs(self) -> np.ndarray:
        """Softmax of `logits`, [K, C]."""
        logits = self.logits()
        logits = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)

    def augmented(self) -> np.ndarray:
        """[features, 1] of each image, [K, F + 1]."""
        return np.concatenate([self.features, np.ones((self.features.shape[0], 1),
                                                      dtype=self.features.dtype)], axis=1)
