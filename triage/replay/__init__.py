"""Replay a labelled image set into a running daemon as a DICOM stream.

An oracle reader labels the studies the gate routes, through the same HTTP API and
tokens a radiologist uses, and a report (report.json + curves.png) sums the run up:
``triage replay --help``. Modules: `source` (images and truth), `stream` (ordering,
grouping, the rate-limited DICOM writer), `oracle` (the reader), `report`, `cli`.
"""
