"""What every stage reports through: structured JSON logs (:mod:`triage.telemetry.logs`,
the `log:` settings) and the Prometheus instruments (:mod:`triage.telemetry.metrics`).

The bottom layer with :mod:`triage.errors`: imports nothing else from triage. What reads
the stages for operators (status page, summary, collectors) is :mod:`triage.ops`.
"""
