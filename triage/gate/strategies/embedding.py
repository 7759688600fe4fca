"""The base of strategies that score a study by its place in the model's feature space.

`badge`, `emoc` and `alfa_mix` read `StudyResult.embedding` (`triage.model.embedding`):
the scored images' pooled features, the last linear layer and the training features'
class means and second moment, all held by a model with an epistemic head. Each scores
every scored image; the study takes its largest score (the image most worth a label,
as the gate's default `max` image reduction does for the uncertainty). A model without
a head has no embedding: the scorer then ranks by the uncertainty instead
(`Strategy.components_with_fallback`, reason `no_epistemic_head`).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING, ClassVar, Self

import numpy as np

from triage.gate.strategies.base import Strategy, StrategyOptions

if TYPE_CHECKING:
    from triage.model.embedding import StudyEmbedding
    from triage.model.inference import StudyResult


class EmbeddingStrategy(Strategy):
    """One component, named after the strategy: the largest of `image_scores`."""

    needs_embedding: ClassVar[bool] = True

    @classmethod
    def from_settings(cls, options: StrategyOptions) -> Self:
        return cls()

    def components(self, result: StudyResult) -> dict[str, float]:
        if result.embedding is None:
            raise ValueError(f"strategy {self.name} scores the study's embedding, which "
                             "only a model with an epistemic head gives")  # fmt: skip
        return {self.name: float(np.max(self.image_scores(result.embedding)))}

    @property
    def weights(self) -> dict[str, float]:
        return {self.name: 1.0}

    @abstractmethod
    def image_scores(self, embedding: StudyEmbedding) -> np.ndarray:
        """The score of each scored image, [K], larger = more worth labelling."""
