"""Periodic retraining: fixed validation split, core-set rebalancing, a training
subprocess, safe promotion through the model registry.

Modules are imported where they are used (`triage.config` imports
`triage.retrain.settings`, so this package file stays import-free).
"""
