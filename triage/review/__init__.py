"""The review stage: the queue and its leases (:mod:`triage.review.queue`), tokens and
roles (:mod:`triage.review.auth`), the audit trail (:mod:`triage.review.audit`), the
`review:` settings.

A stage: imports only the store, telemetry and errors.
"""
