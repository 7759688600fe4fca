"""Study-level scoring and checkpoints."""

import pytest
import torch

from triage.model.checkpoint import load_checkpoint, save_checkpoint
from triage.model.inference import STAGES, pick_images, score_study
from triage.model.lossnet import build_loss_predictor
from triage.model.measures import MEASURES
from triage.model.network import build_network
from triage.model.settings import ModelSettings

TINY = ModelSettings(input_size=16, channels=(4, 8), subunits=1, max_images_per_study=3)


@pytest.mark.parametrize(
    ("num", "most", "expected"),
    [(2, 3, [0, 1]), (5, 3, [0, 2, 4]), (10, 4, [0, 3, 6, 9]), (7, 1, [3]), (1, 8, [0])],
)
def test_pick_images_evenly_spaced(num, most, expected):
    assert pick_images(num, most) == expected


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_network(TINY).eval(), build_loss_predictor(TINY).eval()


def test_score_study_result(model):
    net, lossnet = model
    images = torch.rand(7, 1, 16, 16)
    result = score_study(net, lossnet, images, TINY, seed=0)
    assert result.num_images == 3 and result.num_images_total == 7
    assert sum(result.probs) == pytest.approx(1.0, abs=1e-5) and len(result.probs) == 2
    assert set(result.uncertainty) == set(MEASURES)
    assert 0 <= result.uncertainty["entropy"] <= 1.0 + 1e-6
    assert set(result.durations) == set(STAGES) and all(v >= 0 for v in result.durations.values())
    assert isinstance(result.predicted_loss, float)
    with pytest.raises(AttributeError):
        result.num_images = 1  # frozen


def test_reduction_max_takes_most_uncertain_image(model):
    net, lossnet = model
    images = torch.rand(3, 1, 16, 16)
    per_image = [score_study(net, lossnet, images[i : i + 1], TINY, seed=0) for i in range(3)]
    study = score_study(net, lossnet, images, TINY, seed=0)
    mean = score_study(net, lossnet, images, TINY.model_copy(update={"image_reduction": "mean"}),
                       seed=0)  # fmt: skip
    # the loss predictor is deterministic, so per-image values are exact
    losses = [r.predicted_loss for r in per_image]
    assert study.predicted_loss == pytest.approx(max(losses), abs=1e-5)
    assert mean.predicted_loss == pytest.approx(sum(losses) / 3, abs=1e-5)
    assert study.uncertainty["margin"] <= mean.uncertainty["margin"] + 1e-6
    assert study.uncertainty["entropy"] >= mean.uncertainty["entropy"] - 1e-6


def test_score_study_without_loss_predictor(model):
    result = score_study(model[0], None, torch.rand(1, 1, 16, 16), TINY)
    assert result.predicted_loss is None


def test_score_study_rejects_wrong_size(model):
    with pytest.raises(ValueError, match="images"):
        score_study(*model, torch.rand(1, 1, 32, 32), TINY)


def test_default_settings_score_a_study():
    settings = ModelSettings()
    net, lossnet = build_network(settings), build_loss_predictor(settings)
    result = score_study(net, lossnet, torch.rand(2, 1, 64, 64), settings)
    assert result.num_images == 2 and len(result.probs) == 2


def test_checkpoint_round_trip(tmp_path, model):
    net, lossnet = model
    path = save_checkpoint(tmp_path / "m.pt", net, lossnet, TINY, {"version": "v1", "auroc": 0.9})
    loaded = load_checkpoint(path, expected=TINY)
    assert loaded.settings == TINY and loaded.metadata == {"version": "v1", "auroc": 0.9}
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.network(x), net(x))
        maps = net.forward_with_features(x)[1]
        assert torch.equal(loaded.loss_predictor(maps), lossnet(maps))
    assert not loaded.network.training


def test_checkpoint_without_loss_predictor(tmp_path, model):
    path = save_checkpoint(tmp_path / "m.pt", model[0], None, TINY)
    assert load_checkpoint(path).loss_predictor is None


def test_corrupt_checkpoint(tmp_path, model):
    path = save_checkpoint(tmp_path / "m.pt", *model, TINY)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"m\.pt.*corrupt"):
        load_checkpoint(path)


def test_foreign_file(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match=r"x\.pt.*not a triage-checkpoint"):
        load_checkpoint(path)


def test_mismatched_checkpoint(tmp_path, model):
    path = save_checkpoint(tmp_path / "m.pt", *model, TINY)
    with pytest.raises(ValueError, match=r"m\.pt.*channels"):
        load_checkpoint(path, expected=TINY.model_copy(update={"channels": (4, 16)}))
    other = TINY.model_copy(update={"channels": (4, 16)})
    bad = save_checkpoint(tmp_path / "bad.pt", model[0], None, other)  # weights for (4, 8)
    with pytest.raises(ValueError, match=r"bad\.pt.*do not match"):
        load_checkpoint(bad)


def test_metadata_must_be_json(tmp_path, model):
    with pytest.raises(ValueError, match="metadata"):
        save_checkpoint(tmp_path / "m.pt", *model, TINY, {"when": object()})


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "none.pt")
