"""The store: the connection (SQLite by default, PostgreSQL with `store.url`), schema and
migrations, transactions (:mod:`triage.store.db`; PostgreSQL's dialect layer in
:mod:`triage.store.postgres`); the preprocessed pixels and a study's images read back in
reading order (:mod:`triage.store.images`); the `store:` and `studies:` settings
(:mod:`triage.store.settings`).

Lowest layer but telemetry and errors: imports nothing else from triage.
"""
