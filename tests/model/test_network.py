"""Network shapes, trunk/stochastic split and MC dropout."""

import pytest
import torch

from triage.model.mc_dropout import mc_dropout_mode, mc_predict
from triage.model.network import MC_SCOPES, build_network
from triage.model.settings import ModelSettings

TINY = ModelSettings(input_size=16, channels=(4, 8, 8), subunits=1, labels=["a", "b", "c"])


def test_default_network_shapes():
    settings = ModelSettings()
    net = build_network(settings).eval()
    x = torch.rand(3, 1, settings.input_size, settings.input_size)
    logits, maps = net.forward_with_features(x)
    assert logits.shape == (3, 2)
    assert [tuple(m.shape) for m in maps] == [(3, 16, 32, 32), (3, 32, 16, 16), (3, 64, 8, 8),
                                               (3, 128, 4, 4)]  # fmt: skip


@pytest.mark.parametrize("scope", MC_SCOPES)
def test_trunk_then_stochastic_equals_forward_in_eval(scope):
    torch.manual_seed(0)
    net = build_network(TINY).eval()
    x = torch.rand(5, 1, 16, 16)
    z, maps = net.trunk(x, scope)
    with torch.no_grad():
        assert torch.allclose(net.stochastic(z, scope), net(x), atol=1e-6)
        full_maps = net.forward_with_features(x)[1]
        rest = net.rest_features(z, scope)
    assert len(maps) + len(rest) == len(full_maps)
    for got, want in zip(maps + rest, full_maps, strict=True):
        assert torch.allclose(got, want, atol=1e-6)


def test_unknown_scope_rejected():
    with pytest.raises(ValueError, match="scope"):
        build_network(TINY).trunk(torch.rand(1, 1, 16, 16), "middle")


@pytest.mark.parametrize("scope", MC_SCOPES)
def test_mc_predict_shapes_and_sampling(scope):
    torch.manual_seed(0)
    net = build_network(TINY)
    out = mc_predict(net, torch.rand(4, 1, 16, 16), samples=7, scope=scope, seed=1)
    assert out.probs.shape == (7, 4, 3)
    assert torch.allclose(out.probs.sum(-1), torch.ones(7, 4), atol=1e-5)
    assert not torch.allclose(out.probs[0], out.probs[1])  # dropout is on
    assert len(out.stage_maps) == 3
    assert out.trunk_seconds >= 0 and out.mc_seconds >= 0


def test_mc_predict_seed_is_reproducible_and_leaves_global_rng():
    net = build_network(TINY)
    x = torch.rand(2, 1, 16, 16)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = mc_predict(net, x, samples=5, seed=9).probs
    b = mc_predict(net, x, samples=5, seed=9).probs
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), state)
    # the seed means what torch's own seed means for the CPU generator, and seeds differ
    torch.manual_seed(9)
    assert torch.equal(mc_predict(net, x, samples=5).probs, a)
    assert not torch.equal(mc_predict(net, x, samples=5, seed=10).probs, a)


def test_head_scope_leaves_trunk_deterministic():
    # with head scope, the pooled features are the same for every sample: the MC mean of
    # the logits' pre-dropout input equals the deterministic one
    net = build_network(TINY.model_copy(update={"dropout": 0.0}))
    x = torch.rand(3, 1, 16, 16)
    out = mc_predict(net, x, samples=4, scope="head")
    assert torch.allclose(out.probs[0], out.probs[3])  # no dropout left anywhere in scope
    with torch.no_grad():
        assert torch.allclose(out.probs[0], torch.softmax(net.eval()(x), -1), atol=1e-6)


def test_mc_mode_uses_batchnorm_running_stats_and_restores_modes():
    net = build_network(TINY)
    net.train()
    running = net.stages[0].conv.unit0.adn.N.running_mean.clone()
    mc_predict(net, torch.rand(4, 1, 16, 16), samples=3, scope="full")
    assert torch.equal(net.stages[0].conv.unit0.adn.N.running_mean, running)  # BN in eval
    assert all(m.training for m in net.modules())


def test_mc_mode_restores_on_error():
    net = build_network(TINY)
    net.eval()
    net.fc.train()
    before = [m.training for m in net.modules()]
    with pytest.raises(RuntimeError), mc_dropout_mode(net, [net]):
        assert net.head_dropout.training and not net.stages[0].training
        raise RuntimeError("boom")
    assert [m.training for m in net.modules()] == before


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"samples": 0}, "samples"), ({"scope": "x"}, "scope")]
)
def test_mc_predict_rejects_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mc_predict(build_network(TINY), torch.rand(1, 1, 16, 16), **kwargs)


@pytest.mark.parametrize(
    ("strides", "sizes"),
    [(None, [8, 4, 2]), ((1, 2, 2), [16, 8, 4]), ((1, 1, 2), [16, 16, 8])],
)
def test_strides_set_where_the_network_downsamples(strides, sizes):
    settings = TINY.model_copy(update={"strides": strides})
    _, maps = build_network(settings).eval().forward_with_features(torch.rand(2, 1, 16, 16))
    assert [m.shape[-1] for m in maps] == sizes
    assert settings.stage_strides == (strides or (2, 2, 2))


@pytest.mark.parametrize(
    ("update", "match"),
    [({"strides": (1, 2)}, "one stride per stage"), ({"strides": (1, 3, 2)}, "1 or 2")],
)
def test_bad_strides_are_refused_with_the_key(update, match):
    with pytest.raises(ValueError, match=match):
        ModelSettings.model_validate({**TINY.model_dump(), **update})


def test_a_checkpoint_of_another_stride_is_refused(tmp_path):
    from triage.model.checkpoint import load_checkpoint, save_checkpoint
    from triage.model.lossnet import build_loss_predictor

    old = TINY  # saved before strides existed: every stage 2
    path = save_checkpoint(tmp_path / "m.pt", build_network(old), build_loss_predictor(old), old)
    assert load_checkpoint(path, old).settings.stage_strides == (2, 2, 2)
    with pytest.raises(ValueError, match="stage_strides"):
        load_checkpoint(path, old.model_copy(update={"strides": (1, 2, 2)}))
