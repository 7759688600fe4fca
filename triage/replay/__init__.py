"""Replay a labelled image set into a running daemon as a DICOM stream.

An oracle reader labels the studies the gate routes, through the same HTTP API and
tokens a radiologist uses, and a report (report.json + curves.png) sums the run up:
``triage replay --help``. Modules: `source` (images and truth), `datasets` (the
PneumoniaMNIST files), `stream` (ordering, grouping, the rate-limited DICOM writer),
`dicom_writer` (images as DICOM datasets), `oracle` (the reader), `report`, `commands`
(the `triage replay` command); `lockstep` runs the daemon's parts in lockstep for the
benchmarks.

A tool above the stages, beside the API: it may import the configuration and any stage.
"""
