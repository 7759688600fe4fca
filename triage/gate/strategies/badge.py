"""`badge`: the study's gradient embedding (Ash et al., "Deep Batch Active Learning by
Diverse, Uncertain Gradient Lower Bounds", ICLR 2020).

BADGE embeds an unlabelled example by the gradient of the cross-entropy with respect to
the last layer's weights, taking the model's own prediction as the label:
g = (p - e_yhat) (x) phi, whose norm ||p - e_yhat|| ||phi|| is a lower bound on the
gradient the true label would give. The paper then picks a batch by k-means++ over these
embeddings. The strategy gives both halves:

* the per-study score, the norm: large when the model is unsure (p far from its own
  one-hot guess) about a study with large features. The default budget manager
  (`quantile`) routes by it, each study on arrival;
* the embedding itself (`batch_embedding`), for the `batch` budget manager
  (`gate.budget_manager: batch`), which buffers studies and routes a k-means++ batch
  of them: the paper's algorithm, at the cost of decision latency
  (`triage.gate.budget_managers.BatchBudget`).

A multi-image study is represented by its image of largest norm, for the score and the
embedding alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np

from triage.gate.strategies.embedding import EmbeddingStrategy

if TYPE_CHECKING:
    from triage.model.embedding import StudyEmbedding
    from triage.model.inference import StudyResult


def _residuals(embedding: StudyEmbedding) -> np.ndarray:
    """p - e_yhat of each image, [K, C]: the cross-entropy's gradient w.r.t. the logits
    under the predicted label."""
    probs = embedding.probs()
    residual = probs.copy()
    residual[np.arange(len(probs)), probs.argmax(axis=1)] -= 1.0
    return residual


def gradient_embeddings(embedding: StudyEmbedding) -> np.ndarray:
    """Each image's last-layer gradient embedding under its predicted label,
    (p - e_yhat) (x) phi flattened, [K, C * F] (bias excluded, as in the paper)."""
    residual = _residuals(embedding)
    return (residual[:, :, None] * embedding.features[:, None, :]).reshape(len(residual), -1)


class BadgeStrategy(EmbeddingStrategy):
    """||p - e_yhat||_2 * ||phi||_2 of each image (the norm of its gradient embedding)."""

    name: ClassVar[str] = "badge"
    batch_embeddings: ClassVar[bool] = True

    def image_scores(self, embedding: StudyEmbedding) -> np.ndarray:
        # the norm of an outer product is the product of the norms
        return (np.linalg.norm(_residuals(embedding), axis=1)
                * np.linalg.norm(embedding.features, axis=1))

    def batch_embedding(self, result: StudyResult) -> np.ndarray | None:
        if result.embedding is None:
            return None
        grads = gradient_embeddings(result.embedding)
        best = int(np.argmax(self.image_scores(result.embedding)))
        return grads[best].astype(np.float32)
