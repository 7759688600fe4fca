"""`alfa_mix`: how little the study's features must be mixed toward a class anchor
before the prediction flips (Parvaneh et al., "Active Learning by Feature Mixing",
CVPR 2022).

ALFA-Mix interpolates an unlabelled example's features z toward the anchor of each
class, the mean of the labelled features of that class, z~ = z + alpha (.) (z* - z)
with a per-feature alpha, ||alpha||_2 <= eps, and takes the example as a candidate when
some such mix changes the predicted class: an example whose prediction a small move
toward labelled data overturns has features the model has not yet learnt to use. The
paper finds alpha by a first-order step on the loss, which is exact for the linear last
layer: mixing toward anchor z*_c changes the margin between the predicted class yhat
and a class o by alpha . ((z*_c - z) (.) (w_yhat - w_o)), so the smallest ||alpha|| that
flips yhat to o is

    eps_flip = (logit_yhat - logit_o) / ||(z*_c - z) (.) (w_yhat - w_o)||_2

(the per-feature 0 <= alpha <= 1 box of the paper is not imposed). In the stream the
study is decided on arrival, so instead of the paper's candidate set and its k-means
clustering, the score is 1 / (1 + eps_flip), minimised over anchors and classes: 1 on
the decision boundary, smaller the further a flip lies. The anchors are the class means
of the model's training features (the epistemic head's), which are the labelled studies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np

from triage.gate.strategies.embedding import EmbeddingStrategy

if TYPE_CHECKING:
    from triage.model.embedding import StudyEmbedding


def flip_distance(embedding: StudyEmbedding) -> np.ndarray:
    """The smallest ||alpha||_2 that flips each image's prediction, [K] (inf when no mix
    toward any anchor changes it)."""
    z = embedding.features.astype(np.float64)  # [K, F]
    weight = embedding.space.weight.astype(np.float64)  # [C, F]
    logits = embedding.logits().astype(np.float64)  # [K, C]
    k = np.arange(len(z))
    predicted = logits.argmax(axis=1)
    margins = logits[k, predicted][:, None] - logits  # [K, C], 0 for the predicted class
    apart = weight[predicted][:, None, :] - weight[None, :, :]  # [K, C, F]
    toward = embedding.space.anchors.astype(np.float64)[None] - z[:, None, :]  # [K, A, F]
    reach = np.linalg.norm(toward[:, :, None, :] * apart[:, None, :, :], axis=-1)  # [K, A, C]
    with np.errstate(divide="ignore", invalid="ignore"):
        eps = np.where(reach > 0, margins[:, None, :] / reach, np.inf)
    eps[k, :, predicted] = np.inf  # the predicted class is no flip
    return eps.min(axis=(1, 2))


class AlfaMixStrategy(EmbeddingStrategy):
    """1 / (1 + eps_flip) of each image: the closer a mix toward a labelled class anchor
    flips its prediction, the larger."""

    name: ClassVar[str] = "alfa_mix"

    def image_scores(self, embedding: StudyEmbedding) -> np.ndarray:
        return 1.0 / (1.0 + flip_distance(embedding))
