"""The training stage: periodic retraining with a fixed validation split, core-set
rebalancing, a training subprocess (`worker.py`, started by `scheduler.py`), and safe
promotion through the model registry (:mod:`triage.model.registry`).

A stage above the gate: after a promotion the worker re-orders the queue with the
gate's strategy and picks the coverage queries (:mod:`triage.gate.queries`); otherwise
it imports the model, the core-set, the store, telemetry and errors. `worker.py` is the
subprocess's entry point and the one module here that loads the configuration
(:mod:`triage.config`); the contract names that exception.

Modules are imported where they are used (`triage.config` imports
`triage.training.settings`, so this package file stays import-free).
"""
