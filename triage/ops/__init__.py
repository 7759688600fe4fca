"""What operators read: `triage status` (:mod:`triage.ops.status`), the ops summary and
its gauges (:mod:`triage.ops.summary`), the store's state counts at each scrape
(:mod:`triage.ops.collectors`).

Above the stages: it reads them (served model, retrain runs, queue and files) and
none of them imports it. Imported by the entry points and the API.
"""
