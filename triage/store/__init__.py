"""The store: the SQLite connection, schema and migrations, transactions
(:mod:`triage.store.db`); the preprocessed pixels and a study's images read back in
reading order (:mod:`triage.store.images`); the `studies:` settings
(:mod:`triage.store.settings`).

Lowest layer but telemetry and errors: imports nothing else from triage.
"""
