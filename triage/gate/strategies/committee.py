"""Query by committee with the MC-dropout (or Laplace) samples as the committee:
`vote_entropy`.

Seung et al. (1992) choose the example a committee of models disagrees on most. Here the
committee is the T predictive samples the scorer already draws for every study (MC
dropout, or the last layer's Laplace posterior with `model.epistemic: laplace`), so it
costs no extra network and no extra pass. Of the three disagreement measures
scikit-activeml and modAL offer, two are already strategies under other names with this
committee: consensus entropy, the entropy of the members' mean, is `entropy`; maximum
(KL) disagreement, the members' mean KL divergence from that mean, is `bald`'s mutual
information (`tests/gate/test_measures.py` checks both identities). Vote entropy is the
one that differs: it counts votes and ignores how sure each member is.
"""

from __future__ import annotations

from typing import ClassVar

from triage.gate.strategies.uncertainty import EntropyStrategy


class VoteEntropyStrategy(EntropyStrategy):
    """Entropy (bits) of the committee's votes for each class (Dagan & Engelson 1995):
    0 when every member's most likely class is the same, 1 bit when two classes split
    the members in half."""

    name: ClassVar[str] = "vote_entropy"
    measure: ClassVar[str] = "vote_entropy"
