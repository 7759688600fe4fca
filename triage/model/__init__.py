"""The classifier and its lifecycle: the network, MC-dropout sampling, the learned loss
predictor, calibration, the epistemic head, the uncertainty measures (`measures.py`),
study scoring (`inference.py`), checkpoints, the registry of versions (`registry.py`)
and the loader of the served version (`serving.py`, `ModelUnavailable`; its stored status,
`serving_state.py`, reads without torch).

Below the stages (the gate scores with it, training fits and promotes it): imports only
the store, telemetry and errors.
"""
