"""`dal`: discriminative active learning (Gissin and Shalev-Shwartz, "Discriminative
Active Learning", arXiv 1907.06347, 2019).

DAL routes the study that a classifier, trained to tell labelled from unlabelled studies
in the model's feature space, is surest is unlabelled: the part of the stream the
labelled set represents worst. The classifier (`triage.model.discriminator`, a logistic
regression on the standardised pooled features) is refitted each time a retrain under
this strategy promotes a model, on every labelled image and the recent unlabelled pool,
and travels in that model's epistemic head; the score of an image is its
P(unlabelled). Until such a model serves (the first models, or one promoted under
another strategy) the uncertainty stands in (reason `no_discriminator`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np

from triage.gate.strategies.base import NO_DISCRIMINATOR
from triage.gate.strategies.embedding import EmbeddingStrategy

if TYPE_CHECKING:
    from triage.model.embedding import StudyEmbedding
    from triage.model.inference import StudyResult


class DalStrategy(EmbeddingStrategy):
    """P(unlabelled | features) of each image under the serving model's discriminator."""

    name: ClassVar[str] = "dal"
    fits_discriminator: ClassVar[bool] = True

    def missing_input(self, result: StudyResult) -> str | None:
        missing = super().missing_input(result)
        if missing is None and result.embedding.space.head.discriminator is None:
            return NO_DISCRIMINATOR
        return missing

    def image_scores(self, embedding: StudyEmbedding) -> np.ndarray:
        discriminator = embedding.space.head.discriminator
        if discriminator is None:
            raise ValueError("strategy dal needs a model whose head holds the labelled-"
                             "versus-unlabelled classifier (promoted by a retrain under dal)")
        return discriminator.prob_unlabelled(embedding.features)
