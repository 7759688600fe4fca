"""`badge`: the norm of the study's gradient embedding (Ash et al., "Deep Batch Active
Learning by Diverse, Uncertain Gradient Lower Bounds", ICLR 2020).

BADGE embeds an unlabelled example by the gradient of the cross-entropy with respect to
the last layer's weights, taking the model's own prediction as the label:
g = (p - e_yhat) (x) phi, whose norm ||p - e_yhat|| ||phi|| is a lower bound on the
gradient the true label would give. The paper then picks a batch by k-means++ over these
embeddings, which needs a pool; in the stream each study is decided on arrival, so this
strategy is the per-study half: the norm, large when the model is unsure (p far from its
own one-hot guess) about a study with large features. The diverse-batch half needs a
buffered budget manager, which the gate does not have (README, "Acquisition strategies").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np

from triage.gate.strategies.embedding import EmbeddingStrategy

if TYPE_CHECKING:
    from triage.model.embedding import StudyEmbedding


class BadgeStrategy(EmbeddingStrategy):
    """||p - e_yhat||_2 * ||phi||_2 of each image (the last layer's gradient embedding
    norm under the predicted label, bias excluded as in the paper)."""

    name: ClassVar[str] = "badge"

    def image_scores(self, embedding: StudyEmbedding) -> np.ndarray:
        probs = embedding.probs()
        residual = probs.copy()
        residual[np.arange(len(probs)), probs.argmax(axis=1)] -= 1.0
        return np.linalg.norm(residual, axis=1) * np.linalg.norm(embedding.features, axis=1)
