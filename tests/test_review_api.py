"""The review queue API against the real server and SQLite file."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import FAST_ENV, DaemonProcess, make_image

LEASE_SECONDS = 3.0


def make_token(proc: DaemonProcess, role: str, name: str) -> str:
    out = proc.cli("token", "create", "--role", role, "--name", name)
    return out.stdout.strip().splitlines()[-1]


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("review") / "home"
    env = {**FAST_ENV, "TRIAGE__REVIEW__LEASE_MINUTES": str(LEASE_SECONDS / 60)}
    proc = DaemonProcess(home, env, []).start()
    for i in range(6):
        make_image(
            proc.inbox / f"{i}.dcm", study_uid=f"2.25.{700 + i}", seed=i, window=(40.0, 400.0)
        )
    proc.wait_for(lambda s: s["studies"]["scored"] == 6, 40, "six studies routed")
    tokens = {
        "alice": make_token(proc, "radiologist", "Dr Alice"),
        "bob": make_token(proc, "radiologist", "Dr Bob"),
        "ops": make_token(proc, "ops", "Ops On-call"),
        "admin": make_token(proc, "admin", "Admin"),
    }
    client = httpx.Client(base_url=proc.url, timeout=10)
    yield proc, client, tokens
    client.close()
    proc.stop(signal.SIGKILL)


def _pending(client: httpx.Client, token: str) -> list[int]:
    items = client.get("/api/queue", params={"state": "pending"}, headers=auth(token)).json()
    return [item["study_id"] for item in items["items"]]


def test_tokens_and_roles(server) -> None:
    proc, client, tokens = server
    assert client.get("/healthz").status_code == 200  # the one open route
    missing = client.get("/api/queue")
    assert missing.status_code == 401 and "missing bearer token" in missing.json()["detail"]
    assert client.get("/api/queue", headers=auth("trg_nope")).status_code == 401
    refused = client.post("/api/queue/next", headers=auth(tokens["ops"]))
    assert refused.status_code == 403 and "radiologist" in refused.json()["detail"]
    assert client.get("/api/me", headers=auth(tokens["ops"])).json()["role"] == "ops"
    assert client.get("/openapi.json").status_code == 200


def test_fifty_concurrent_claims_of_one_study_give_one_winner(server) -> None:
    proc, client, tokens = server
    study = _pending(client, tokens["alice"])[0]
    readers = [make_token(proc, "radiologist", f"Reader {i}") for i in range(5)]

    def claim(i: int) -> int:
        with httpx.Client(base_url=proc.url, timeout=30) as own:
            return own.post(
                f"/api/studies/{study}/claim", headers=auth(readers[i % len(readers)])
            ).status_code

    with ThreadPoolExecutor(max_workers=50) as pool:
        codes = list(pool.map(claim, range(50)))
    # the winner may renew its own lease; every other reader is refused
    winners = {c for c in codes if c == 200}
    assert winners and codes.count(409) >= 50 - codes.count(200)
    items = client.get("/api/queue", params={"state": "claimed"}, headers=auth(tokens["alice"]))
    claimed = [i for i in items.json()["items"] if i["study_id"] == study]
    assert len(claimed) == 1
    holders = {claimed[0]["claimed_by"]}
    assert len(holders) == 1
    # exactly one reader's claims succeeded
    winner_reader = claimed[0]["claimed_by"]
    assert winner_reader.startswith("Reader ")
    ok_by_reader = {i % len(readers) for i, c in enumerate(codes) if c == 200}
    assert len(ok_by_reader) == 1


def test_label_rules_and_expired_lease(server) -> None:
    proc, client, tokens = server
    study = _pending(client, tokens["alice"])[0]
    unclaimed = client.post(
        f"/api/studies/{study}/label", json={"label": "normal"}, headers=auth(tokens["alice"])
    )
    assert unclaimed.status_code == 409 and "claim it first" in unclaimed.json()["detail"]
    assert (
        client.post(f"/api/studies/{study}/claim", headers=auth(tokens["alice"])).status_code == 200
    )
    others = client.post(
        f"/api/studies/{study}/label", json={"label": "normal"}, headers=auth(tokens["bob"])
    )
    assert others.status_code == 403 and "another reader" in others.json()["detail"]
    bad = client.post(
        f"/api/studies/{study}/label", json={"label": "maybe"}, headers=auth(tokens["alice"])
    )
    assert (
        bad.status_code == 422 and "normal, pneumonia, skip, not-diagnostic" in bad.json()["detail"]
    )
    time.sleep(LEASE_SECONDS + 0.5)
    late = client.post(
        f"/api/studies/{study}/label", json={"label": "normal"}, headers=auth(tokens["alice"])
    )
    assert late.status_code == 409 and "expired" in late.json()["detail"]
    assert study in _pending(client, tokens["bob"]), "an expired lease frees the study"
    assert (
        client.post(f"/api/studies/{study}/claim", headers=auth(tokens["bob"])).status_code == 200
    )


def test_next_label_once_correct_and_audit(server) -> None:
    proc, client, tokens = server
    reader = make_token(proc, "radiologist", "Dr Carol")
    claimed = client.post("/api/queue/next", headers=auth(reader))
    assert claimed.status_code == 200
    study = claimed.json()["study_id"]
    view = client.get(f"/api/studies/{study}", headers=auth(reader)).json()
    assert view["why"]["reason"] == "cold_start" and "prediction" not in view
    assert "patient" not in view and "DOE" not in json.dumps(view)
    image = view["images"][0]
    assert image["window"] == [40.0, 400.0]
    url = f"/api/studies/{study}/images/{image['instance_id']}/0.png"
    png = client.get(url, headers=auth(reader))
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content[:8] == b"\x89PNG\r\n\x1a\n"
    wide = client.get(url, params={"wc": 40, "ww": 4000}, headers=auth(reader))
    assert wide.content != png.content  # window/level changes the rendering
    stored = client.post(
        f"/api/studies/{study}/label",
        json={"label": "pneumonia", "comment": "RLL opacity"},
        headers=auth(reader),
    )
    assert stored.status_code == 201
    again = client.post(
        f"/api/studies/{study}/label", json={"label": "normal"}, headers=auth(reader)
    )
    assert again.status_code == 409 and "already labeled" in again.json()["detail"]
    assert (
        client.post(
            f"/api/studies/{study}/correction", json={"label": "normal"}, headers=auth(reader)
        ).status_code
        == 403
    )
    fixed = client.post(
        f"/api/studies/{study}/correction", json={"label": "normal"}, headers=auth(tokens["admin"])
    )
    assert fixed.status_code == 201
    history = client.get(f"/api/studies/{study}/labels", headers=auth(reader)).json()["labels"]
    assert [(h["label"], h["is_correction"], h["superseded_by"] is None) for h in history] == [
        ("pneumonia", 0, False),
        ("normal", 1, True),
    ]
    me = client.get("/api/me", headers=auth(reader)).json()
    assert me["tally"]["labeled_today"] == 1 and me["tally"]["median_seconds"] >= 0
    metrics = client.get("/metrics").text
    assert 'triage_labels_total{label="pneumonia",role="radiologist"} 1.0' in metrics
    assert 'triage_queue_items{state="labeled"} 1.0' in metrics
    trail = proc.cli("audit", "--since", "1h", "--json")
    actions = [
        (r["actor"], r["action"], r["study_id"]) for r in map(json.loads, trail.stdout.splitlines())
    ]
    for action in ("claim", "view", "label"):
        assert ("Dr Carol", action, study) in actions
    assert ("Admin", "correct", study) in actions
    assert ("cli", "token_create", None) in actions
    rows = [json.loads(line) for line in trail.stdout.splitlines()]
    assert all(r["address"] == "127.0.0.1" for r in rows if r["action"] == "label")


def test_revoked_token_stops_working(server) -> None:
    proc, client, tokens = server
    token = make_token(proc, "radiologist", "Temp Reader")
    assert client.get("/api/me", headers=auth(token)).status_code == 200
    listing = proc.cli("token", "list").stdout
    token_id = next(line.split()[0] for line in listing.splitlines() if "Temp Reader" in line)
    proc.cli("token", "revoke", token_id)
    refused = client.get("/api/me", headers=auth(token))
    assert refused.status_code == 401 and "revoked" in refused.json()["detail"]


def test_metrics_pass_promtool_after_real_traffic(server) -> None:
    import shutil as _shutil

    promtool = _shutil.which("promtool")
    if promtool is None:
        pytest.skip(
            "promtool not found: `apt-get install prometheus` (make test does this as root)"
        )
    proc, client, tokens = server
    exposition = client.get("/metrics").text
    assert "triage_ingest_files_total" in exposition and "triage_gate_decisions_total" in exposition
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=exposition, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() == "" and checked.stderr.strip() == "", checked.stderr
