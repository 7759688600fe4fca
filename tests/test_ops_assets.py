"""Ops assets against the real daemon: the Grafana dashboard and the alert rules query
only metrics `triage serve` exports, and the Prometheus, rule and compose files are valid.

The daemon runs with a promoted model (with a validation AUROC), every study routed as
`audit` and labeled, and one quarantined file, so that the conditional metrics (model
info, validation AUROC, audit accuracy, quarantine by reason) are exported too.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import signal
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import FAST_ENV, REPO, DaemonProcess, make_image
from prometheus_client.parser import text_string_to_metric_families
from test_review_api import auth, make_token

from triage.config import load_settings

SERVICE = REPO / "service"
DASHBOARD = SERVICE / "grafana" / "dashboards" / "triage.json"
ALERTS = SERVICE / "prometheus" / "alerts.yml"
METRIC = re.compile(r"\btriage_[a-zA-Z0-9_:]*")

# What the dashboard must show (the brief's sections), by metric family.
REQUIRED = {
    "ingestion": ["triage_ingest_files_total", "triage_ingest_quarantined_total",
                  "triage_inbox_pending_files", "triage_ingest_stage_seconds_bucket",
                  "triage_study_assembly_seconds_bucket", "triage_ingest_paused"],
    "scoring": ["triage_inference_seconds_bucket", "triage_gate_decisions_total",
                "triage_gate_routed_fraction", "triage_gate_label_rate_target",
                "triage_gate_threshold"],
    "queue": ["triage_queue_items", "triage_queue_oldest_pending_seconds",
              "triage_label_turnaround_seconds_bucket", "triage_labels_total"],
    "model": ["triage_model_info", "triage_model_validation_auroc",
              "triage_model_audit_accuracy", "triage_model_audit_samples"],
    "retraining": ["triage_retrain_runs", "triage_retrain_duration_seconds_sum",
                   "triage_retrain_last_run_timestamp_seconds", "triage_retrain_running",
                   "triage_retrain_progress", "triage_labels_since_retrain"],
    "storage": ["triage_state_dir_free_bytes"],
    "dicom node": ["triage_dicom_associations_total", "triage_dicom_instances_total",
                   "triage_dicom_store_seconds_bucket", "triage_dicom_active_associations",
                   "triage_out_of_scope_instances_total", "triage_studies_ood_flagged_total"],
}


def _promote_model(home: Path, auroc: float) -> str:
    """Register and promote a freshly initialised model with a recorded validation AUROC
    and an operating point with a threshold (so its gauges are exported too)."""
    import torch

    from triage.config import load_settings
    from triage.model.checkpoint import save_checkpoint
    from triage.model.lossnet import build_loss_predictor
    from triage.model.network import build_network
    from triage.model.registry import ModelRegistry
    from triage.store import db as store

    settings = load_settings(REPO / "config.yaml", home=home, environ={})
    torch.manual_seed(0)
    checkpoint = save_checkpoint(home / "seed.pt", build_network(settings.model),
                                 build_loss_predictor(settings.model), settings.model,
                                 {"operating_point": {"temperature": 1.25, "threshold": 0.5}})
    db = store.connect(settings.database())
    try:
        registry = ModelRegistry(db, settings.path("models"), settings.model)
        entry = registry.add(checkpoint, source="test", metrics={"validation": {"auroc": auroc}})
        registry.promote(entry.version)
    finally:
        db.close()
    return entry.version


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Sample names of /metrics after real traffic, and the exposition itself."""
    home = tmp_path_factory.mktemp("ops_assets") / "home"
    home.mkdir(parents=True)
    version = _promote_model(home, 0.75)
    env = {**FAST_ENV, "TRIAGE__GATE__LABEL_RATE": "1.0",
           "TRIAGE__GATE__EXPLORATION_RATE": "1.0", "TRIAGE__RETRAIN__ENABLED": "false"}
    proc = DaemonProcess(home, env, []).start()
    try:
        for i in range(2):
            make_image(proc.inbox / f"{i}.dcm", study_uid=f"2.25.{900 + i}", seed=i)
        (proc.inbox / "junk.dcm").write_bytes(b"this is not DICOM at all" * 8)
        proc.wait_for(lambda s: s["studies"]["scored"] == 2 and s["files"]["quarantined"] == 1,
                      45, "two scored studies and one quarantined file")
        reader = make_token(proc, "radiologist", "Dr Audit")
        with httpx.Client(base_url=proc.url, timeout=10) as client:
            for _ in range(2):
                claimed = client.post("/api/queue/next", headers=auth(reader))
                assert claimed.status_code == 200, claimed.text
                study = claimed.json()["study_id"]
                assert client.post(f"/api/studies/{study}/label", json={"label": "normal"},
                                   headers=auth(reader)).status_code == 201
            text = client.get("/metrics").text
    finally:
        proc.stop(signal.SIGKILL)
    names: set[str] = set()
    families: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
        families[family.name] = family.type
    return {"names": names, "families": families, "text": text, "version": version}


def _dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"]
            for target in panel.get("targets", [])]


def test_daemon_exports_the_conditional_metrics(exported) -> None:
    text = exported["text"]
    assert f'triage_model_info{{version="{exported["version"]}"}} 1.0' in text
    assert "triage_model_validation_auroc 0.75" in text
    assert "triage_model_audit_samples 2.0" in text
    assert re.search(r"^triage_model_audit_accuracy (0\.0|0\.5|1\.0)$", text, re.M)
    assert 'triage_quarantined_files{reason="not_dicom"} 1.0' in text


def test_dashboard_is_provisionable_and_uses_prometheus() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] == "triage"
    source = yaml.safe_load(
        (SERVICE / "grafana/provisioning/datasources/prometheus.yml").read_text())
    [datasource] = source["datasources"]
    assert datasource["type"] == "prometheus"
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": datasource["uid"]}, panel
        assert panel["targets"], panel["title"]
    provider = yaml.safe_load(
        (SERVICE / "grafana/provisioning/dashboards/triage.yml").read_text())
    assert provider["providers"][0]["type"] == "file"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_matches_its_generator() -> None:
    spec = importlib.util.spec_from_file_location(
        "build_dashboard", SERVICE / "grafana" / "build_dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert DASHBOARD.read_text() == module.render(), "run service/grafana/build_dashboard.py"


def test_every_panel_query_names_exported_metrics(exported) -> None:
    names = exported["names"]
    queries = _dashboard_queries()
    assert len(queries) > 30
    for title, expr in queries:
        used = METRIC.findall(expr)
        assert used or re.search(r"\bup\b", expr), (title, expr)
        missing = [name for name in used if name not in names]
        assert not missing, f"panel {title!r} queries {missing}, not exported by the daemon"


# The sample names of a family of each type, as a PromQL expression names them (the text
# format has no info type: an info family is a gauge named <name>_info).
SAMPLE_SUFFIXES = {"counter": ("_total",), "info": ("_info",), "gauge": ("",),
                   "histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count", ""),
                   "stateset": ("",), "unknown": ("",)}


def test_every_exported_triage_metric_has_a_panel(exported) -> None:
    """Every `triage_*` family the daemon's registry exports (its instruments and its
    scrape-time collectors, with a served model, audits and quarantine so that the
    conditional ones are there too) is queried by at least one dashboard panel."""
    families = {name: kind for name, kind in exported["families"].items()
                if name.startswith("triage_")}
    for conditional in ("triage_model_info", "triage_model_registry_info",
                        "triage_model_temperature",
                        "triage_model_decision_threshold", "triage_model_validation_auroc",
                        "triage_model_audit_accuracy", "triage_serving_model_ok",
                        "triage_serving_model_load_failures", "triage_auth_failures",
                        "triage_gate_fallback", "triage_gate_rescore_seconds"):
        assert conditional in families, conditional  # else the check below proves little
    assert len(families) >= 45
    used = {name for _, expr in _dashboard_queries() for name in METRIC.findall(expr)}
    missing = sorted(name for name, kind in families.items()
                     if not any(name + suffix in used for suffix in SAMPLE_SUFFIXES[kind]))
    assert not missing, f"no dashboard panel queries {missing}"


def test_dashboard_covers_every_section() -> None:
    used = {name for _, expr in _dashboard_queries() for name in METRIC.findall(expr)}
    for section, metrics in REQUIRED.items():
        assert not set(metrics) - used, (section, set(metrics) - used)


def test_alert_rules_name_exported_metrics_and_cover_the_cases(exported) -> None:
    rules = [rule for group in yaml.safe_load(ALERTS.read_text())["groups"]
             for rule in group["rules"]]
    alerts = {rule["alert"]: rule for rule in rules}
    for name in ("TriageDown", "TriageNoStudiesIngested", "TriageQuarantineSpike",
                 "TriageReviewQueueStale", "TriageRoutedFractionOffTarget",
                 "TriageRetrainFailed", "TriageDiskLow", "TriageIngestPaused",
                 "TriageServingModelNotOk", "TriageDicomStoresRefused",
                 "TriageStudiesLeftInError"):
        assert name in alerts, name
        assert alerts[name]["labels"]["severity"] in ("info", "warning", "critical")
    for rule in rules:
        missing = [m for m in METRIC.findall(rule["expr"]) if m not in exported["names"]]
        assert not missing, f"alert {rule['alert']} uses {missing}, not exported"


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not found: `apt-get install prometheus` (make test does this)")
    return promtool


def test_promtool_checks_and_unit_tests_the_rules() -> None:
    promtool = _promtool()
    for args in (["check", "rules", str(ALERTS)],
                 ["test", "rules", str(SERVICE / "prometheus" / "alerts_test.yml")]):
        done = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("name", ["prometheus.yml", "prometheus-compose.yml",
                                  "prometheus-replicas.yml"])
def test_promtool_checks_the_prometheus_config(name: str) -> None:
    path = SERVICE / "prometheus" / name
    done = subprocess.run([_promtool(), "check", "config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    config = yaml.safe_load(path.read_text())
    [job] = config["scrape_configs"]
    assert job["job_name"] == "triage"
    targets = {"prometheus.yml": ["127.0.0.1:8000"], "prometheus-compose.yml": ["triage:8000"],
               "prometheus-replicas.yml": ["triage-a:8000", "triage-b:8000"]}[name]
    assert job["static_configs"][0]["targets"] == targets


def _loopback_ports_and_known_volumes(compose: dict) -> None:
    """Every published port is on loopback; every mount is a file of service/ or a
    declared volume."""
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (SERVICE / source).exists(), (name, volume)
            else:
                assert source in compose["volumes"], (name, volume)


def test_the_replicas_compose_file_shares_one_store_and_the_shared_folders() -> None:
    """docker-compose.replicas.yml, checked as YAML (no Docker engine here): two replicas
    whose settings load, on one database, sharing archive, models and quarantine on one
    volume, each with its own home volume; every role is run by one of them; Prometheus
    scrapes both."""
    compose = yaml.safe_load((SERVICE / "docker-compose.replicas.yml").read_text())
    services = compose["services"]
    assert set(services) == {"db", "triage-a", "triage-b", "prometheus", "grafana"}
    replicas = {name: services[name] for name in ("triage-a", "triage-b")}
    roles: set[str] = set()
    homes = set()
    for name, service in replicas.items():
        env = {k: str(v) for k, v in service["environment"].items()}
        env["TRIAGE__STORE__URL"] = env["TRIAGE__STORE__URL"].replace(
            "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}", "secret")
        settings = load_settings(REPO / "config.yaml", environ=env)  # valid, as the image runs
        assert settings.replica_name() == name
        assert settings.store.url == "postgresql://triage:secret@db:5432/triage"
        for folder in ("archive", "models", "quarantine"):
            assert settings.path(folder) == Path("/shared") / folder
        roles |= set(settings.replica.roles)
        mounts = dict(v.split(":")[:2] for v in service["volumes"])
        assert mounts["triage-shared"] == "/shared"
        homes.add(next(src for src, dst in mounts.items() if dst == "/data"))
        assert service["depends_on"]["db"]["condition"] == "service_healthy"
    assert roles == {"receiver", "ingest", "score", "review", "retrain"}
    assert len(homes) == 2 and homes <= set(compose["volumes"])
    _loopback_ports_and_known_volumes(compose)
    assert "/shared" in (REPO / "Dockerfile").read_text()  # owned by the image's user


def test_compose_file_parses_and_mounts_files_that_exist() -> None:
    """No Docker engine here: the compose file is checked as YAML, not run."""
    compose = yaml.safe_load((SERVICE / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"triage", "prometheus", "grafana"}
    build = services["triage"]["build"]
    assert (SERVICE / build["context"] / build["dockerfile"]).is_file()
    assert "healthz" in " ".join(services["triage"]["healthcheck"]["test"])
    assert any(v.startswith("triage-data:") for v in services["triage"]["volumes"])
    _loopback_ports_and_known_volumes(compose)
    config = next(arg.split("=", 1)[1] for arg in services["prometheus"]["command"]
                  if arg.startswith("--config.file="))
    mounted = {v.split(":")[1]: SERVICE / v.split(":")[0]
               for v in services["prometheus"]["volumes"] if v.startswith(".")}
    assert config in mounted
    rules = yaml.safe_load(mounted[config].read_text())["rule_files"]
    for rule_file in rules:
        assert str(Path(config).parent / rule_file) in mounted, rule_file
    source = yaml.safe_load(
        (SERVICE / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert source["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load(
        (SERVICE / "grafana/provisioning/dashboards/triage.yml").read_text())
    dashboards = provider["providers"][0]["options"]["path"]
    grafana = {v.split(":")[1]: v.split(":")[0] for v in services["grafana"]["volumes"]}
    assert grafana[dashboards] == "./grafana/dashboards"
