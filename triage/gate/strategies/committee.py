"""Query by committee with the MC-dropout (or Laplace) samples as the committee:
`vote_entropy`, `consensus_entropy` and `max_disagreement`.

Seung et al. (1992) choose the example a committee of models disagrees on most. Here the
committee is the T predictive samples the scorer already draws for every study (MC
dropout, or the last layer's Laplace posterior with `model.epistemic: laplace`), so it
costs no extra network and no extra pass. Of the three disagreement measures
scikit-activeml and modAL offer, two equal other strategies with this committee:
consensus entropy, the entropy of the members' mean, is `entropy`; maximum (KL)
disagreement, the members' mean KL divergence from that mean, is `bald`'s mutual
information (`tests/gate/test_measures.py` checks both identities). They are registered
under their committee names too, so that a site that reads the query-by-committee
literature finds them; they route exactly as `entropy` and `bald`. Vote entropy is the
one that differs: it counts votes and ignores how sure each member is.
"""

from __future__ import annotations

from typing import ClassVar

from triage.gate.strategies.uncertainty import EntropyStrategy


class ConsensusEntropyStrategy(EntropyStrategy):
    """Entropy (bits) of the committee's mean distribution (McCallum & Nigam 1998; Settles
    2009, section 3.4): with the T samples as the committee, the `entropy` measure."""

    name: ClassVar[str] = "consensus_entropy"
    measure: ClassVar[str] = "entropy"


class MaxDisagreementStrategy(EntropyStrategy):
    """Mean KL divergence (bits) of each member from the committee's mean (McCallum & Nigam
    1998): with the T samples as the committee, the `bald` mutual information."""

    name: ClassVar[str] = "max_disagreement"
    measure: ClassVar[str] = "bald"


class VoteEntropyStrategy(EntropyStrategy):
    """Entropy (bits) of the committee's votes for each class (Dagan & Engelson 1995):
    0 when every member's most likely class is the same, 1 bit when two classes split
    the members in half."""

    name: ClassVar[str] = "vote_entropy"
    measure: ClassVar[str] = "vote_entropy"
