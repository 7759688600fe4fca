"""The acquisition stage: which scored studies a radiologist should label.

- `strategies/`: the score of each study (random, entropy, bald, predicted_loss,
  combined); one file per strategy and a line in `STRATEGIES`.
- `budget_managers.py`: from scores to "route it or not" under the budget (`quantile`,
  `coin`).
- `budget_gate.py`: `BudgetGate`, which joins the two with audits, cold start, the
  daily cap and the rolling window; `settings.py`: the `gate:` config section.
- `queries.py`: coverage queries (unlabelled studies that extend the labelled set's
  coverage) and re-ordering the pending queue under a newly promoted model.
- `coldstart.py`: the label-free cold-start selector.
- `scorer.py` (`GateScorer`) and `worker.py` (`ScoringWorker`): the daemon's scoring
  thread, which runs the model, asks the gate and stores the decision.

The uncertainty measures the strategies rank by are the model's
(:mod:`triage.model.measures`). A stage: imports the model, the core-set, the review
queue (routed studies are enqueued), the store, telemetry and errors; never training,
ingest or the API.

Importing this package (or `triage.gate.settings`) does not import torch; `scorer`,
`worker`, `coldstart` and `queries` do and are imported by their module path.
"""

from triage.gate.budget_gate import (
    NOVELTY,
    ROUTED_REASONS,
    SKIPPED_REASONS,
    BatchEntry,
    BudgetGate,
    Decision,
    uniform_pair,
)
from triage.gate.budget_managers import BUDGET_MANAGERS, BudgetManager
from triage.gate.settings import GateSettings
from triage.gate.strategies import STRATEGIES, Strategy, make_strategy

__all__ = [
    "BUDGET_MANAGERS",
    "NOVELTY",
    "ROUTED_REASONS",
    "SKIPPED_REASONS",
    "STRATEGIES",
    "BatchEntry",
    "BudgetGate",
    "BudgetManager",
    "Decision",
    "GateSettings",
    "Strategy",
    "make_strategy",
    "uniform_pair",
]
