"""Prometheus metrics, registered on a registry that is passed in.

Labels are small closed sets (outcome, reason code, stage); never a UID, a path or PHI.
State counts (files, studies by state) are read from the store at scrape time by
:class:`triage.ops.collectors.StoreCollector`, so they are right after a restart too.
Every stage reports through the :class:`Metrics` it is handed; this module imports
nothing from the stages.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)

from triage import __version__

# The codes check_received (triage/ingest/dicom.py) and the C-STORE handler refuse with:
# exported at 0 from the start, like the DICOM node's other closed sets below.
RECEIVED_INVALID_REASONS = ("empty_file", "not_dicom", "invalid_header", "truncated",
                            "missing_uid", "invalid_image", "sop_mismatch")
_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_WAIT = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200)


@dataclass(frozen=True)
class Metrics:
    """Every metric the daemon updates directly."""

    files: Counter
    quarantined: Counter
    vanished: Counter
    ingest_stage_seconds: Histogram
    ingest_file_seconds: Histogram
    inbox_pending: Gauge
    ingest_paused: Gauge
    studies_completed: Counter
    studies_reopened: Counter
    study_assembly_seconds: Histogram
    scored: Counter
    gate_decisions: Counter
    gate_threshold: Gauge
    gate_routed_fraction: Gauge
    gate_label_rate_target: Gauge
    gate_auto_mix: Gauge
    inference_seconds: Histogram
    labels: Counter
    label_turnaround_seconds: Histogram
    gate_fallback: Counter
    gate_rescore_seconds: Histogram
    gate_batch_pending: Gauge
    gate_batch_wait_seconds: Histogram
    gate_batches: Counter
    auth_failures: Counter
    serving_model_ok: Gauge
    dicom_associations: Counter
    dicom_active_associations: Gauge
    dicom_idle_aborts: Counter
    dicom_instances: Counter
    dicom_store_seconds: Histogram
    dicomweb_stored: Counter
    received_invalid: Counter
    out_of_scope: Counter
    ood_flagged: Counter
    serving_model_load_failures: Counter


def build_metrics(registry: CollectorRegistry) -> Metrics:
    """Create and register the daemon's metrics on ``registry``."""
    # ``*_created`` series double the exposition and no dashboard here uses them.
    disable_created_metrics()
    Info("triage_build", "Version of the running triage daemon.", registry=registry).info(
        {"version": __version__}
    )
    metrics = Metrics(
        files=Counter(
            "triage_ingest_files",
            "Files taken from the inbox, by final outcome.",
            ["outcome"],
            registry=registry,
        ),
        quarantined=Counter(
            "triage_ingest_quarantined",
            "Files quarantined, by reason code.",
            ["reason"],
            registry=registry,
        ),
        vanished=Counter(
            "triage_ingest_vanished",
            "Files that disappeared from the inbox before they could be read.",
            registry=registry,
        ),
        ingest_stage_seconds=Histogram(
            "triage_ingest_stage_seconds",
            "Time spent per file in each ingestion stage.",
            ["stage"],
            buckets=_FAST,
            registry=registry,
        ),
        ingest_file_seconds=Histogram(
            "triage_ingest_file_seconds",
            "Time from picking a file up to its final state.",
            buckets=_FAST,
            registry=registry,
        ),
        inbox_pending=Gauge(
            "triage_inbox_pending_files",
            "Files seen in the inbox and not yet complete or ingested.",
            registry=registry,
        ),
        ingest_paused=Gauge(
            "triage_ingest_paused",
            "1 while ingestion is paused because free disk space is below ingest.min_free_bytes.",
            registry=registry,
        ),
        studies_completed=Counter(
            "triage_studies_completed",
            "Studies that became complete (a reopened study counts again).",
            registry=registry,
        ),
        studies_reopened=Counter(
            "triage_studies_reopened",
            "Complete studies reopened by a late instance.",
            registry=registry,
        ),
        study_assembly_seconds=Histogram(
            "triage_study_assembly_seconds",
            "Time from a study's first instance to its completion.",
            buckets=_WAIT,
            registry=registry,
        ),
        scored=Counter(
            "triage_scoring_studies",
            "Studies handed to the scorer, by result status (claim_lost: taken over by "
            "another replica while this one scored it; nothing stored).",
            ["status"],
            registry=registry,
        ),
        gate_decisions=Counter(
            "triage_gate_decisions",
            "Needs-label gate decisions, by reason (routed and not routed).",
            ["reason"],
            registry=registry,
        ),
        gate_threshold=Gauge(
            "triage_gate_threshold",
            "Current threshold on the combined quantile score (0 to 1).",
            registry=registry,
        ),
        gate_routed_fraction=Gauge(
            "triage_gate_routed_fraction",
            "Fraction of the gate's rolling window of scored studies that was routed.",
            registry=registry,
        ),
        gate_label_rate_target=Gauge(
            "triage_gate_label_rate_target",
            "Configured target fraction of studies to route (gate.label_rate).",
            registry=registry,
        ),
        inference_seconds=Histogram(
            "triage_inference_seconds",
            "Model inference time per study, by stage (trunk, mc, lossnet).",
            ["stage"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=registry,
        ),
        labels=Counter(
            "triage_labels",
            "Labels stored by readers, by label and reader role.",
            ["label", "role"],
            registry=registry,
        ),
        label_turnaround_seconds=Histogram(
            "triage_label_turnaround_seconds",
            "Time from a study being routed to its label.",
            buckets=(60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400, 172800, 604800),
            registry=registry,
        ),
        gate_fallback=Counter(
            "triage_gate_fallback",
            "Studies the gate scored with a stand-in component, by reason "
            "(no_loss_predictor: the uncertainty stood in for the predicted loss; "
            "no_epistemic_head: for the embedding an embedding strategy scores; "
            "no_discriminator: for dal's classifier, before a model promoted under dal).",
            ["reason"],
            registry=registry,
        ),
        gate_auto_mix=Gauge(
            "triage_gate_auto_mix",
            "Under gate.strategy auto: the probability that a study is ranked by each "
            "candidate strategy, from the labelled audits (absent under other strategies).",
            ["strategy"],
            registry=registry,
        ),
        gate_batch_pending=Gauge(
            "triage_gate_batch_pending",
            "Under gate.budget_manager batch: scored studies waiting for their batch.",
            registry=registry,
        ),
        gate_batch_wait_seconds=Histogram(
            "triage_gate_batch_wait_seconds",
            "Under gate.budget_manager batch: time from a study's scoring to its batch's "
            "decision (the latency the batch adds).",
            buckets=_WAIT,
            registry=registry,
        ),
        gate_batches=Counter(
            "triage_gate_batches",
            "Under gate.budget_manager batch: batches decided, by what closed them "
            "(size: gate.batch_size studies; age: the oldest waited gate.batch_seconds; "
            "model: the serving model changed).",
            ["trigger"],
            registry=registry,
        ),
        gate_rescore_seconds=Histogram(
            "triage_gate_rescore_seconds",
            "Time to rescore the gate's window with a new serving model.",
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300),
            registry=registry,
        ),
        auth_failures=Counter(
            "triage_auth_failures",
            "API requests refused for their token, by reason (missing, unknown, revoked; "
            "throttled: refused unchecked after too many failures from one client).",
            ["reason"],
            registry=registry,
        ),
        serving_model_ok=Gauge(
            "triage_serving_model_ok",
            "1 while the scorer serves the registry's serving version (or none exists yet: "
            "cold start); 0 while it serves an older version or none loads.",
            registry=registry,
        ),
        serving_model_load_failures=Counter(
            "triage_serving_model_load_failures",
            "Failed loads of a model checkpoint by the scorer, by reason "
            "(missing, corrupt, incompatible, error).",
            ["reason"],
            registry=registry,
        ),
        dicom_associations=Counter(
            "triage_dicom_associations",
            "DICOM associations requested of the receiver, by result (accepted; rejected_"
            "called_ae, rejected_calling_ae, rejected_host, rejected_busy: refused at "
            "association; released, aborted: how accepted ones ended).",
            ["result"],
            registry=registry,
        ),
        dicom_active_associations=Gauge(
            "triage_dicom_active_associations",
            "DICOM associations open now.",
            registry=registry,
        ),
        dicom_idle_aborts=Counter(
            "triage_dicom_idle_aborts",
            "DICOM associations aborted because their peer sent nothing for "
            "dicom.idle_timeout_seconds while no request of theirs was being answered "
            "(each also counts as aborted in triage_dicom_associations_total).",
            registry=registry,
        ),
        dicom_instances=Counter(
            "triage_dicom_instances",
            "C-STORE requests answered, by status (success; out_of_resources: disk or "
            "database, the sender retries; failed: not storable; echo: C-ECHO).",
            ["status"],
            registry=registry,
        ),
        dicom_store_seconds=Histogram(
            "triage_dicom_store_seconds",
            "Time from a C-STORE request to its answer (the instance durable).",
            buckets=_FAST,
            registry=registry,
        ),
        dicomweb_stored=Counter(
            "triage_dicomweb_stored_instances",
            "Instances in STOW-RS requests, by result (success, failed).",
            ["result"],
            registry=registry,
        ),
        received_invalid=Counter(
            "triage_received_invalid_instances",
            "Instances refused before they were acknowledged (C-STORE 0xA900/0xC000, STOW-RS "
            "FailedSOPSequence) because their bytes show the reader would not archive them, "
            "by origin (dicom, stow) and reason code (the quarantine's: not_dicom, "
            "invalid_header, truncated, missing_uid, invalid_image, ...; sop_mismatch: the "
            "data set is not the instance the C-STORE request names).",
            ["origin", "reason"],
            registry=registry,
        ),
        out_of_scope=Counter(
            "triage_out_of_scope_instances",
            "Instances archived out of the model's scope (never scored), by the first "
            "check they failed (modality, body_part, photometric, size).",
            ["reason"],
            registry=registry,
        ),
        ood_flagged=Counter(
            "triage_studies_ood_flagged",
            "Scored studies whose images look unlike the training data (the model's "
            "feature density below its threshold).",
            registry=registry,
        ),
    )
    # The DICOM node's label values are a closed set: export each at 0 from the start,
    # so rates and alerts see the first refusal as an increase, not a new series.
    for result in ("accepted", "rejected_called_ae", "rejected_calling_ae", "rejected_host",
                   "rejected_busy", "released", "aborted"):
        metrics.dicom_associations.labels(result)
    for status in ("success", "out_of_resources", "failed", "echo"):
        metrics.dicom_instances.labels(status)
    for result in ("success", "failed"):
        metrics.dicomweb_stored.labels(result)
    for origin in ("dicom", "stow"):
        for reason in RECEIVED_INVALID_REASONS:
            metrics.received_invalid.labels(origin, reason)
    for reason in ("modality", "body_part", "photometric", "size"):
        metrics.out_of_scope.labels(reason)
    # So are these (the load failures' reasons are set by the scorer's ServingLoader).
    for reason in ("missing", "unknown", "revoked", "throttled"):
        metrics.auth_failures.labels(reason)
    for reason in ("no_loss_predictor", "no_epistemic_head", "no_discriminator"):
        metrics.gate_fallback.labels(reason)
    for trigger in ("size", "age", "model"):  # the gate's batches (`budget_manager: batch`)
        metrics.gate_batches.labels(trigger)
    return metrics

