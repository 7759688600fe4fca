"""Write ``dashboards/triage.json``, the provisioned Grafana dashboard of triage.

The JSON is generated so that every panel stays consistent (data source, units, layout);
edit the panel list below and run ``python service/grafana/build_dashboard.py``.
``tests/test_ops_assets.py`` checks that the committed file matches this script and that
every metric a panel queries is one the daemon exports.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).parent / "dashboards" / "triage.json"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
JOB = 'job="triage"'


def q(expr: str, legend: str = "", instant: bool = False) -> dict[str, Any]:
    """One Prometheus query of a panel."""
    return {"expr": expr, "legendFormat": legend or "__auto", "instant": instant,
            "range": not instant}


def quantiles(metric: str, by: str = "", window: str = "5m",
              levels: tuple[float, ...] = (0.5, 0.95)) -> list[dict[str, Any]]:
    """Histogram quantile queries, one per level (optionally split by a label)."""
    group = f"le, {by}" if by else "le"
    legend = "{{" + by + "}} " if by else ""
    return [q(f"histogram_quantile({level}, sum by ({group}) "
              f"(rate({metric}_bucket{{{JOB}}}[{window}])))", f"{legend}p{round(level * 100)}")
            for level in levels]


def panel(kind: str, title: str, targets: list[dict[str, Any]], *, unit: str = "short",
          width: int = 8, height: int = 8, description: str = "",
          options: dict[str, Any] | None = None,
          defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """A panel of ``kind`` (timeseries, stat, bargauge) with its queries."""
    return {
        "type": kind, "title": title, "description": description,
        "datasource": DATASOURCE,
        "targets": [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, **t}
                    for i, t in enumerate(targets)],
        "fieldConfig": {"defaults": {"unit": unit, **(defaults or {})}, "overrides": []},
        "options": options or {},
        "gridPos": {"w": width, "h": height},
    }


def stat(title: str, targets: list[dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
    options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
               "colorMode": "value", "graphMode": "none", "textMode": "auto",
               **kwargs.pop("options", {})}
    return panel("stat", title, targets, width=kwargs.pop("width", 4),
                 height=kwargs.pop("height", 4), options=options, **kwargs)


def bars(title: str, targets: list[dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
    options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
               "orientation": "horizontal", "displayMode": "basic", "showUnfilled": True}
    return panel("bargauge", title, targets, options=options, **kwargs)


def series(title: str, targets: list[dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
    options = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
               "tooltip": {"mode": "multi", "sort": "desc"}}
    return panel("timeseries", title, targets, options=options, **kwargs)


def thresholds(*steps: tuple[float | None, str]) -> dict[str, Any]:
    return {"thresholds": {"mode": "absolute",
                           "steps": [{"value": v, "color": c} for v, c in steps]}}


ROWS: list[tuple[str, list[dict[str, Any]]]] = [
    ("Overview", [
        stat("Daemon up", [q(f"up{{{JOB}}}", "{{instance}}")],
             defaults={"mappings": [{"type": "value", "options": {
                 "0": {"text": "DOWN", "color": "red"}, "1": {"text": "up", "color": "green"}}}],
                 **thresholds((None, "red"), (1, "green"))}),
        stat("Version", [q(f"triage_build_info{{{JOB}}}", "{{version}}", instant=True)],
             options={"textMode": "name"}),
        stat("Replicas", [q(f"triage_replica_info{{{JOB}}}", "{{replica}} ({{roles}})",
                            instant=True)],
             description="Each daemon scraped, by replica.name, with the loops it runs. "
                         "Replicas on one store report the same store-wide figures "
                         "(studies, queue, model): read one target's, do not add them.",
             options={"textMode": "name"}),
        stat("Silent replicas", [q(f'max(triage_replicas{{{JOB},state="silent"}})')],
             description="Replicas on the shared store without a heartbeat for longer than "
                         "replica.lease_seconds (dead or cut off); 0 with one daemon.",
             defaults=thresholds((None, "green"), (1, "red"))),
        stat("Serving model", [q(f"triage_model_info{{{JOB}}}", "{{version}}", instant=True)],
             description="The version the scorer serves. Absent (No data) during cold start, "
                         "before any model is promoted, and while no promoted version loads.",
             options={"textMode": "name"}),
        stat("Model serving", [q(f"triage_serving_model_ok{{{JOB}}}")],
             description="DEGRADED while the scorer serves an older version than the "
                         "registry's, or none loads (studies wait); see the Model row.",
             defaults={"mappings": [{"type": "value", "options": {
                 "0": {"text": "DEGRADED", "color": "red"},
                 "1": {"text": "ok", "color": "green"}}}],
                 **thresholds((None, "red"), (1, "green"))}),
        stat("Studies in error", [q(f'triage_studies{{{JOB},state="error"}}')],
             description="Studies whose stored images could not be read, retried after "
                         "studies.error_retry_seconds, then left for an operator.",
             defaults=thresholds((None, "green"), (1, "red"))),
        stat("Ingest", [q(f"triage_ingest_paused{{{JOB}}}")],
             description="Paused while free disk space is below ingest.min_free_bytes.",
             defaults={"mappings": [{"type": "value", "options": {
                 "0": {"text": "running", "color": "green"},
                 "1": {"text": "PAUSED (disk)", "color": "red"}}}],
                 **thresholds((None, "green"), (1, "red"))}),
        stat("Oldest pending review", [q(f"triage_queue_oldest_pending_seconds{{{JOB}}}")],
             unit="s", defaults=thresholds((None, "green"), (14400, "orange"), (86400, "red"))),
        stat("Free disk", [q(f"triage_state_dir_free_bytes{{{JOB}}}")], unit="bytes",
             defaults=thresholds((None, "red"), (5 * 2**30, "orange"), (20 * 2**30, "green"))),
    ]),
    ("Ingestion", [
        series("Files by outcome (per minute)",
               [q(f"sum by (outcome) (rate(triage_ingest_files_total{{{JOB}}}[5m])) * 60",
                  "{{outcome}}")], unit="short"),
        series("Quarantined files by reason (per hour)",
               [q(f"sum by (reason) (increase(triage_ingest_quarantined_total{{{JOB}}}[1h]))",
                  "{{reason}}")]),
        bars("Quarantined files in the store, by reason",
             [q(f"sum by (reason) (triage_quarantined_files{{{JOB}}})", "{{reason}}",
                instant=True)]),
        series("Inbox pending files", [q(f"triage_inbox_pending_files{{{JOB}}}", "pending")]),
        series("Ingest stage latency", quantiles("triage_ingest_stage_seconds", "stage"),
               unit="s"),
        series("Time per file (pick-up to final state)",
               quantiles("triage_ingest_file_seconds"), unit="s"),
        series("Study assembly wait (first instance to complete)",
               quantiles("triage_study_assembly_seconds", window="30m"), unit="s"),
        series("Studies completed and reopened (per hour)", [
            q(f"sum(rate(triage_studies_completed_total{{{JOB}}}[15m])) * 3600", "completed"),
            q(f"sum(rate(triage_studies_reopened_total{{{JOB}}}[15m])) * 3600", "reopened"),
            q(f"sum(rate(triage_ingest_vanished_total{{{JOB}}}[15m])) * 3600", "files vanished"),
        ]),
        series("Ingest paused by low disk", [q(f"triage_ingest_paused{{{JOB}}}", "paused")],
               defaults={"min": 0, "max": 1}),
        bars("Files by state", [q(f"triage_files{{{JOB}}}", "{{state}}", instant=True)]),
        bars("Studies by state", [q(f"triage_studies{{{JOB}}}", "{{state}}", instant=True)]),
    ]),
    ("DICOM node and scope", [
        stat("Open associations", [q(f"triage_dicom_active_associations{{{JOB}}}")],
             width=4),
        series("Associations by result (per minute)",
               [q(f"sum by (result) (rate(triage_dicom_associations_total{{{JOB}}}[5m])) * 60",
                  "{{result}}"),
                q(f"sum(rate(triage_dicom_idle_aborts_total{{{JOB}}}[5m])) * 60",
                  "idle aborted")], width=10,
               description="rejected_*: refused at association (AE title, host, busy: "
                           "max_associations open). idle aborted: no PDU for "
                           "dicom.idle_timeout_seconds (also counted in aborted)."),
        series("C-STORE answers by status (per second)",
               [q(f"sum by (status) (rate(triage_dicom_instances_total{{{JOB}}}[5m]))",
                  "{{status}}")], width=10,
               description="out_of_resources (0xA700): disk or database; the sender retries."),
        series("Refused before Success by reason (per hour)",
               [q("sum by (origin, reason) "
                  f"(increase(triage_received_invalid_instances_total{{{JOB}}}[1h]))",
                  "{{origin}} {{reason}}")],
               description="C-STORE 0xA900/0xC000 and STOW-RS failures: what the bytes show "
                           "the reader would not archive; not stored, the sender keeps it."),
        series("C-STORE answer time (instance durable)",
               quantiles("triage_dicom_store_seconds"), unit="s"),
        series("STOW-RS instances (per minute)",
               [q(f"sum by (result) (rate(triage_dicomweb_stored_instances_total{{{JOB}}}[5m]))"
                  " * 60", "{{result}}")]),
        series("Out of scope by reason (per hour)",
               [q(f"sum by (reason) (increase(triage_out_of_scope_instances_total{{{JOB}}}[1h]))",
                  "{{reason}}")]),
        series("Studies unlike the training data (per hour)",
               [q(f"sum(increase(triage_studies_ood_flagged_total{{{JOB}}}[1h]))", "flagged")]),
    ]),
    ("Scoring and the gate", [
        series("Inference time by stage", quantiles("triage_inference_seconds", "stage"),
               unit="s"),
        series("Gate decisions by reason (per hour)",
               [q(f"sum by (reason) (rate(triage_gate_decisions_total{{{JOB}}}[15m])) * 3600",
                  "{{reason}}")]),
        series("Routed fraction vs target", [
            q(f"triage_gate_routed_fraction{{{JOB}}}", "routed (gate window)"),
            q(f"triage_gate_label_rate_target{{{JOB}}}", "target"),
        ], unit="percentunit", defaults={"min": 0, "max": 1}),
        series("Gate threshold (combined quantile score)",
               [q(f"triage_gate_threshold{{{JOB}}}", "threshold")],
               unit="percentunit", defaults={"min": 0, "max": 1}),
        series("Scoring results (per hour)",
               [q(f"sum by (status) (rate(triage_scoring_studies_total{{{JOB}}}[15m])) * 3600",
                  "{{status}}")]),
        series("Gate fallbacks by reason (per hour)",
               [q(f"sum by (reason) (increase(triage_gate_fallback_total{{{JOB}}}[1h]))",
                  "{{reason}}")],
               description="no_loss_predictor: the model has no loss predictor, so the "
                           "uncertainty stood in for the predicted loss. no_epistemic_head: "
                           "the model has no epistemic head, so the uncertainty stood in "
                           "for the embedding score of badge, emoc or alfa_mix. "
                           "no_discriminator: dal before a model promoted under it."),
        series("Window rescore time (new serving model)",
               quantiles("triage_gate_rescore_seconds", window="1h"), unit="s"),
        series("batch: studies waiting for their batch",
               [q(f"triage_gate_batch_pending{{{JOB}}}", "waiting"),
                q(f"sum by (trigger) (increase(triage_gate_batches_total{{{JOB}}}[1h]))",
                  "batches/h {{trigger}}")],
               description="Under gate.budget_manager batch: scored studies waiting for "
                           "the batch's decision (state batched), and batches decided in "
                           "the last hour by what closed them (size, age, model). Empty "
                           "under any other budget manager."),
        series("batch: wait from scoring to decision",
               quantiles("triage_gate_batch_wait_seconds", window="1h"), unit="s",
               description="The latency the batch adds to a study's routing (at most "
                           "gate.batch_seconds, unless the scorer was stopped)."),
        series("auto: mix of candidate strategies",
               [q(f"triage_gate_auto_mix{{{JOB}}}", "{{strategy}}")],
               unit="percentunit", defaults={"min": 0, "max": 1},
               description="Under gate.strategy auto: the probability that a study is "
                           "ranked by each candidate, learnt from the labelled audits "
                           "(empty under any other strategy)."),
    ]),
    ("Review queue", [
        series("Queue items by state", [q(f"triage_queue_items{{{JOB}}}", "{{state}}")]),
        series("Oldest pending item age",
               [q(f"triage_queue_oldest_pending_seconds{{{JOB}}}", "oldest pending")], unit="s"),
        series("Label turnaround (routed to labeled)",
               quantiles("triage_label_turnaround_seconds", window="6h", levels=(0.5, 0.9)),
               unit="s"),
        series("Labels by class and role (per hour)",
               [q(f"sum by (label, role) (increase(triage_labels_total{{{JOB}}}[1h]))",
                  "{{label}} ({{role}})")]),
    ]),
    ("Model", [
        stat("Served model version",
             [q(f"triage_model_info{{{JOB}}}", "{{version}}", instant=True)],
             description="The version the scorer loaded and scores with; the figures of "
                         "this row are its own.",
             options={"textMode": "name"}, width=4),
        stat("Registry's serving version",
             [q(f"triage_model_registry_info{{{JOB}}}", "{{version}}", instant=True)],
             description="Differs from the served version when its checkpoint cannot be "
                         "loaded (an older version serves, or none).",
             options={"textMode": "name"}, width=4),
        stat("Serving since", [q(f"triage_model_promoted_timestamp_seconds{{{JOB}}} * 1000")],
             unit="dateTimeFromNow", width=4),
        stat("Validation AUROC", [q(f"triage_model_validation_auroc{{{JOB}}}")],
             unit="none", width=4, defaults={"decimals": 3}),
        stat("Audit samples", [q(f"triage_model_audit_samples{{{JOB}}}")], width=4),
        stat("Served = registry's", [q(f"triage_serving_model_ok{{{JOB}}}")], width=4,
             defaults={"mappings": [{"type": "value", "options": {
                 "0": {"text": "no", "color": "red"}, "1": {"text": "yes", "color": "green"}}}],
                 **thresholds((None, "red"), (1, "green"))}),
        series("Live accuracy (audit) and validation AUROC", [
            q(f"triage_model_audit_accuracy{{{JOB}}}", "audit accuracy"),
            q(f"triage_model_validation_auroc{{{JOB}}}", "validation AUROC"),
        ], unit="percentunit", width=12, defaults={"min": 0, "max": 1},
            description="Audit accuracy: studies routed at random as `audit` whose current "
                        "class label matches the model's prediction (see audit samples)."),
        series("Audit samples", [q(f"triage_model_audit_samples{{{JOB}}}", "samples")],
               width=12),
        series("Operating point of the served model", [
            q(f"triage_model_temperature{{{JOB}}}", "temperature"),
            q(f"triage_model_decision_threshold{{{JOB}}}", "decision threshold"),
        ], unit="none", width=12,
            description="Temperature its logits are divided by, and the calibrated "
                        "probability of the second class at or above which it predicts it "
                        "(no threshold: argmax)."),
        series("Model load failures by reason (per hour)",
               [q(f"sum by (reason) (increase(triage_serving_model_load_failures_total"
                  f"{{{JOB}}}[1h]))", "{{reason}}")], width=12,
               description="Failed checkpoint loads by the scorer (missing, corrupt, "
                           "incompatible, error); retried each minute."),
    ]),
    ("Retraining", [
        bars("Retrain runs by result",
             [q(f"triage_retrain_runs{{{JOB}}}", "{{result}}", instant=True)]),
        stat("Last run started",
             [q(f"(triage_retrain_last_run_timestamp_seconds{{{JOB}}} > 0) * 1000")],
             unit="dateTimeFromNow"),
        stat("Running", [q(f"triage_retrain_running{{{JOB}}}")],
             defaults={"mappings": [{"type": "value", "options": {
                 "0": {"text": "idle"}, "1": {"text": "running", "color": "blue"}}}]}),
        stat("Progress", [q(f"triage_retrain_progress{{{JOB}}}")], unit="percentunit"),
        stat("Labels since last retrain", [q(f"triage_labels_since_retrain{{{JOB}}}")]),
        series("Run duration", [
            q(f"triage_retrain_last_duration_seconds{{{JOB}}}", "last run"),
            q(f"triage_retrain_duration_seconds_sum{{{JOB}}} / "
              f"triage_retrain_duration_seconds_count{{{JOB}}}", "mean of finished runs"),
        ], unit="s", width=12),
        series("Retrain progress", [q(f"triage_retrain_progress{{{JOB}}}", "progress")],
               unit="percentunit", width=12, defaults={"min": 0, "max": 1}),
    ]),
    ("Access", [
        series("Refused API requests by reason (per hour)",
               [q(f"sum by (reason) (increase(triage_auth_failures_total{{{JOB}}}[1h]))",
                  "{{reason}}")], width=24,
               description="Tokens missing, unknown or revoked; throttled: refused unchecked "
                           "after too many failures from one client."),
    ]),
    ("Storage", [
        series("Free bytes on the state directory",
               [q(f"triage_state_dir_free_bytes{{{JOB}}}", "free")], unit="bytes", width=24),
    ]),
]


def build() -> dict[str, Any]:
    """The dashboard as a dict (rows with panels laid out left to right)."""
    panels: list[dict[str, Any]] = []
    y = 0
    next_id = 1
    for title, row in ROWS:
        panels.append({"type": "row", "title": title, "id": next_id, "collapsed": False,
                       "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []})
        next_id += 1
        y += 1
        x = 0
        line_height = 0
        for item in row:
            item = json.loads(json.dumps(item))
            w, h = item["gridPos"]["w"], item["gridPos"]["h"]
            if x + w > 24:
                x, y, line_height = 0, y + line_height, 0
            item["gridPos"] = {"x": x, "y": y, "w": w, "h": h}
            item["id"] = next_id
            next_id += 1
            x += w
            line_height = max(line_height, h)
            panels.append(item)
        y += line_height
    return {
        "uid": "triage-ops",
        "title": "triage",
        "description": "Ingestion, needs-label gate, review queue, model and retraining of "
                       "the triage daemon.",
        "tags": ["triage", "dicom"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-24h", "to": "now"},
        "templating": {"list": []},
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    """The dashboard JSON text as committed."""
    return json.dumps(build(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    sys.stdout.write(f"wrote {OUT}\n")
