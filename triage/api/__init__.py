"""The HTTP server: one FastAPI app (`app.py`), one router per resource (`review`,
`images`, `ops`, `ops_status`, `viewer`, `dicomweb_routes`), and what they share
(`deps`, `security`, `throttle`, `transport`, `study_view`).

Above the stages and :mod:`triage.config`: it may import them; only the entry points
(`triage.cli`) import it. `app.py` names :class:`triage.daemon.Daemon` in type hints only.
"""
