"""`emoc`: expected model output change (Freytag, Rodner and Denzler, "Selecting
Influential Examples: Active Learning with Expected Model Output Changes", ECCV 2014;
for deep networks through the last layer, Kaeding et al., ACCV 2016).

EMOC scores a candidate x by how much the model's outputs on the data would move if x
were labelled and learnt, in expectation over the label the model itself predicts:
E_{y ~ p(y|x)} E_{x'} ||f(x'; theta + d theta(x, y)) - f(x'; theta)||_1. This is the
last-layer approximation, stated: only the final linear layer moves, by one gradient
step of the cross-entropy on (x, y), d W = -eta (p - e_y) a^T with a = [phi(x), 1]; the
logits of x' then move by -eta (p - e_y) (a . a'), whose L1 norm is
eta ||p - e_y||_1 |a . a'|. With ||p - e_y||_1 = 2 (1 - p_y):

    EMOC(x) ~ 2 sum_y p_y (1 - p_y) * E_x' |a . a'|

The expectation over x' is taken over the training features' distribution (the epistemic
head's class Gaussians), and E|a . a'| is bounded by its root mean square,
sqrt(a^T E[a' a'^T] a), computed from their second moment. The step size eta is common
to all studies and drops out of the ranking.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np

from triage.gate.strategies.embedding import EmbeddingStrategy

if TYPE_CHECKING:
    from triage.model.embedding import StudyEmbedding


class EmocStrategy(EmbeddingStrategy):
    """2 sum_y p_y (1 - p_y) * sqrt(a^T M a) of each image: the expected L1 change of the
    last layer's outputs over the training distribution (second moment M) after one
    gradient step on the image with a label drawn from its own prediction."""

    name: ClassVar[str] = "emoc"

    def image_scores(self, embedding: StudyEmbedding) -> np.ndarray:
        probs = embedding.probs().astype(np.float64)
        change = 2.0 * (probs * (1.0 - probs)).sum(axis=1)
        a = embedding.augmented().astype(np.float64)
        reach = np.sqrt(np.maximum(np.einsum("kf,fg,kg->k", a, embedding.space.moment, a), 0.0))
        return change * reach
