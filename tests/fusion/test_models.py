"""Contract tests for every registered model, plus the masking and fusion arithmetic."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F

from features.errors import ConfigError
from fusion.encoders import SequenceEncoder
from fusion.losses import training_loss
from fusion.models import (
    FusionModel,
    create_model,
    get_model,
    list_models,
    register_model,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GROUPS = ["image", "audio", "video"]
NUM_CLASSES = 8  # three bit groups


def model_groups(name: str) -> list[str]:
    return GROUPS[1:2] if name == "unimodal" else GROUPS  # unimodal on a sequence group


@pytest.fixture(scope="module")
def loader(fake_loader_factory):
    factory = fake_loader_factory(groups=tuple(GROUPS), sizes={"train": 48}, batch_size=12, missing=0.0)
    return factory("train", GROUPS, False)


@pytest.fixture
def batch(loader):
    b = next(iter(loader))
    assert all(not m.all() for m in b["mask"].values()), "the test batch must contain padding"
    return b


def build(name: str, loader, seed: int = 0, **kwargs) -> FusionModel:
    torch.manual_seed(seed)
    model = create_model(
        name,
        loader.field_specs,
        loader.field_groups,
        model_groups(name),
        loader.num_classes,
        hidden=16,
        **kwargs,
    )
    return model.eval()


def drop_group(batch: dict, group: str, rows: list[int]) -> dict:
    """What the loader gives for samples missing ``group``: present False, zero features, length 0."""
    batch = copy.deepcopy(batch)
    batch["present"][group][rows] = False
    for f, x in batch["features"].items():
        if f.startswith(group + "."):
            x[rows] = 0.0
            if f in batch["mask"]:
                batch["mask"][f][rows] = False
                batch["lengths"][f][rows] = 0
    return batch


def test_registry_lists_the_models():
    assert {
        "early_fusion",
        "late_fusion",
        "gated",
        "cross_attention",
        "lmf",
        "autoencoder",
        "multitask",
        "tcn",
        "unimodal",
    } <= set(list_models())


def test_unknown_model_lists_valid_names():
    with pytest.raises(ConfigError, match=r"unknown model 'transformer'.*late_fusion.*unimodal"):
        get_model("transformer")


def test_duplicate_registration_raises():
    class Again(FusionModel):
        name = "late_fusion"

    with pytest.raises(ValueError, match="already registered"):
        register_model(Again)
    assert get_model("late_fusion").__name__ == "LateFusion"


def test_unimodal_needs_exactly_one_group(loader):
    with pytest.raises(ConfigError, match=r"exactly one group.*'image', 'audio'"):
        create_model("unimodal", loader.field_specs, loader.field_groups, ["image", "audio"], NUM_CLASSES)


def test_group_without_fields_is_an_error(loader):
    with pytest.raises(ConfigError, match=r"no fields for group\(s\) \['text'\]"):
        create_model("late_fusion", loader.field_specs, loader.field_groups, ["image", "text"], NUM_CLASSES)


def test_unknown_option_is_a_config_error(loader):
    with pytest.raises(ConfigError, match="combine"):
        create_model(
            "late_fusion", loader.field_specs, loader.field_groups, GROUPS, NUM_CLASSES, combine="max"
        )
    with pytest.raises(ConfigError, match="unimodal.*combine"):
        create_model(
            "unimodal", loader.field_specs, loader.field_groups, ["image"], NUM_CLASSES, combine="mean"
        )


# -- contract: the same tests for every registered model ------------------------------------------


@pytest.mark.parametrize("name", list_models())
def test_forward_shape_and_finite_with_missing_groups(name, loader, batch):
    model = build(name, loader)
    b = batch["label"].shape[0]
    logits = model(batch)["logits"]
    assert logits.shape == (b, NUM_CLASSES)
    assert torch.isfinite(logits).all()

    missing = batch
    for group in model_groups(name):
        missing = drop_group(missing, group, [0, 1])  # rows 0 and 1: no group at all
    missing = drop_group(missing, model_groups(name)[-1], [2, 3, 4])
    logits = model(missing)["logits"]
    assert logits.shape == (b, NUM_CLASSES)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", list_models())
def test_backward_gives_finite_gradients_to_every_parameter(name, loader, batch):
    model = build(name, loader).train()
    batch = drop_group(batch, model_groups(name)[0], [0])
    loss, parts = training_loss(model, model(batch), batch)
    assert torch.isfinite(loss) and "ce" in parts
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), pname
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("name", list_models())
def test_deterministic_under_seed(name, loader, batch):
    a, b, other = build(name, loader, seed=0), build(name, loader, seed=0), build(name, loader, seed=1)
    torch.testing.assert_close(a(batch)["logits"], b(batch)["logits"], rtol=0, atol=0)
    assert not torch.allclose(a(batch)["logits"], other(batch)["logits"])


@pytest.mark.parametrize("name", list_models())
def test_state_dict_round_trip(name, loader, batch):
    source, target = build(name, loader, seed=0), build(name, loader, seed=1)
    assert not torch.allclose(source(batch)["logits"], target(batch)["logits"])
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    target.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(target(batch)["logits"], source(batch)["logits"], rtol=0, atol=0)


@pytest.mark.parametrize("name", list_models())
def test_padded_positions_do_not_change_the_output(name, loader, batch):
    model = build(name, loader)
    noisy = copy.deepcopy(batch)
    gen = torch.Generator().manual_seed(7)
    for f, mask in noisy["mask"].items():
        x = noisy["features"][f]
        junk = 1e3 * torch.randn(x.shape, generator=gen)
        pad = ~mask.view(*mask.shape, *[1] * (x.dim() - 2)).expand_as(x)
        x[pad] = junk[pad]
    torch.testing.assert_close(model(noisy)["logits"], model(batch)["logits"])


@pytest.mark.parametrize("name", list_models())
def test_padded_batch_equals_each_sample_alone(name, loader, batch):
    # Independent computation: every sample on its own, trimmed to its length, with no padding.
    model = build(name, loader)
    batch = drop_group(batch, "audio", [3])  # includes an empty sequence
    logits = model(batch)["logits"]
    for i in range(batch["label"].shape[0]):
        one = {"label": batch["label"][i : i + 1], "features": {}, "mask": {}, "lengths": {}, "present": {}}
        for g, p in batch["present"].items():
            one["present"][g] = p[i : i + 1]
        for f, x in batch["features"].items():
            if f in batch["mask"]:
                n = int(batch["lengths"][f][i])
                one["features"][f] = x[i : i + 1, :n]
                one["mask"][f] = torch.ones(1, n, dtype=torch.bool)
                one["lengths"][f] = batch["lengths"][f][i : i + 1]
            else:
                one["features"][f] = x[i : i + 1]
        torch.testing.assert_close(model(one)["logits"][0], logits[i], rtol=1e-5, atol=1e-5)


# -- late fusion arithmetic --------------------------------------------------------------------------


@pytest.mark.parametrize("combine", ["mean", "learned"])
def test_late_fusion_is_a_masked_weighted_mean_of_group_logits(combine, loader, batch):
    model = build("late_fusion", loader, combine=combine)
    if combine == "learned":
        with torch.no_grad():
            model.group_scores.copy_(torch.tensor([0.5, -1.0, 2.0]))
    batch = drop_group(drop_group(batch, "image", [0, 1, 4]), "audio", [1, 4, 6])
    for g in GROUPS:
        batch = drop_group(batch, g, [4])  # row 4: nothing present
    out = model(batch)
    group_logits = out["group_logits"]  # (batch, groups, classes)
    scores = {"image": 0.5, "audio": -1.0, "video": 2.0}
    for i in range(batch["label"].shape[0]):
        here = [g for g in GROUPS if batch["present"][g][i]]
        raw = {
            g: (torch.tensor(scores[g]).exp() if combine == "learned" else torch.tensor(1.0)) for g in here
        }
        expected = torch.zeros(NUM_CLASSES)
        for g in here:
            expected += raw[g] / sum(raw.values()) * group_logits[i, GROUPS.index(g)]
        torch.testing.assert_close(out["logits"][i], expected)
    assert torch.equal(out["logits"][4], torch.zeros(NUM_CLASSES))


def test_sequence_encoder_handles_a_batch_of_empty_sequences():
    torch.manual_seed(0)
    enc = SequenceEncoder((6,), hidden=8, dropout=0.0)
    empty = enc(torch.zeros(3, 0, 6), torch.zeros(3, 0, dtype=torch.bool))
    masked = enc(torch.randn(3, 4, 6), torch.zeros(3, 4, dtype=torch.bool))
    assert empty.shape == (3, 8)
    torch.testing.assert_close(empty, masked)


FUSION_MODELS = [m for m in list_models() if m != "unimodal"]


@pytest.mark.parametrize(
    ("name", "options"),
    [(m, {}) for m in FUSION_MODELS] + [("late_fusion", {"combine": "learned"})],
    ids=[*FUSION_MODELS, "late_fusion-learned"],
)
def test_an_absent_group_never_reaches_the_output(name, options, loader, batch):
    # Whatever an absent group's features and mask claim, present=False must win.
    model = build(name, loader, **options)
    absent = drop_group(batch, "audio", [0, 2, 5])
    changed = copy.deepcopy(absent)
    changed["features"]["audio.mfcc"][[0, 2, 5]] = 500.0 * torch.randn(
        3, *absent["features"]["audio.mfcc"].shape[1:]
    )
    changed["mask"]["audio.mfcc"][[0, 2, 5]] = True
    torch.testing.assert_close(model(changed)["logits"], model(absent)["logits"])


def test_gated_fusion_gives_a_missing_group_weight_zero(loader, batch):
    model = build("gated", loader)
    batch = drop_group(drop_group(batch, "image", [0, 1]), "video", [1, 3])
    weights = model(batch)["weights"]  # (batch, groups)
    assert weights.shape == (batch["label"].shape[0], len(GROUPS))
    assert torch.equal(weights[[0, 1], 0], torch.zeros(2))
    assert torch.equal(weights[[1, 3], 2], torch.zeros(2))
    torch.testing.assert_close(weights.sum(1), torch.ones(weights.shape[0]))
    assert (weights[4:] > 0).all()


def test_autoencoder_reconstructs_a_missing_group_and_skips_it_in_the_loss(loader, batch):
    model = build("autoencoder", loader)
    missing = drop_group(batch, "video", [0, 1, 2])
    recon = model.reconstruct(missing)
    assert set(recon) == set(GROUPS)
    assert recon["video"].shape == (batch["label"].shape[0], 2 * 3 * 3)  # mean video.grid frame
    assert recon["image"].shape == (batch["label"].shape[0], 12 + 6)  # image.embedding + image.patch
    assert all(torch.isfinite(r).all() for r in recon.values())
    # the reconstruction loss of a missing group ignores what its (zeroed) features would say
    out = model(missing)
    changed = copy.deepcopy(missing)
    changed["features"]["video.grid"][[0, 1, 2]] = 7.0
    torch.testing.assert_close(model.pretrain_loss(out, changed), model.pretrain_loss(out, missing))
    assert model.pretrain_loss(out, missing) > 0


def test_multitask_losses_match_a_direct_computation(loader, batch):
    model = build("multitask", loader, aux_weight=0.5, mse_weight=2.0)
    batch = drop_group(batch, "image", [0, 1, 2])
    out = model(batch)
    loss, parts = training_loss(model, out, batch)
    labels = batch["label"]
    aux = []
    for i, g in enumerate(GROUPS):
        rows = batch["present"][g]
        aux.append(F.cross_entropy(out["group_logits"][rows, i], labels[rows]))
    mse = ((out["value"] - labels.float() / (NUM_CLASSES - 1)) ** 2).mean()
    expected = F.cross_entropy(out["logits"], labels) + 0.5 * sum(aux) / 3 + 2.0 * mse
    torch.testing.assert_close(loss, expected)
    assert set(parts) == {"ce", "aux_ce", "mse"}


def test_resample_matches_an_independent_area_average():
    import numpy as np

    from fusion.encoders import resample

    gen = torch.Generator().manual_seed(0)
    h = torch.randn(3, 10, 2, generator=gen)
    lengths = [10, 3, 0]
    mask = torch.arange(10)[None, :] < torch.tensor(lengths)[:, None]
    out = resample(h, mask, 4)
    for b, n in enumerate(lengths):
        for t in range(4):
            if n == 0:
                expected = np.zeros(2)
            else:  # a piecewise-constant signal of duration 1, averaged over [t/4, (t+1)/4)
                grid = np.linspace(t / 4, (t + 1) / 4, 4001)[:-1] + 1 / 8000
                idx = np.minimum((grid * n).astype(int), n - 1)
                expected = h[b, idx].numpy().mean(0)
            np.testing.assert_allclose(out[b, t].numpy(), expected, atol=2e-3)


def test_tcn_is_causal():
    from fusion.encoders import TCN

    torch.manual_seed(0)
    tcn = TCN(3, 8, levels=3, dropout=0.0).eval()
    x = torch.randn(2, 12, 3)
    mask = torch.ones(2, 12, dtype=torch.bool)
    later = x.clone()
    later[:, 7:] = 100.0  # changing frames >= 7 must leave frames < 7 unchanged
    a, b = tcn(x, mask), tcn(later, mask)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])
    # receptive field: 1 + 2 * (3 - 1) * (1 + 2 + 4) = 29 frames, so frame 11 sees frame 0
    first = x.clone()
    first[:, 0] += 1.0
    assert not torch.allclose(tcn(first, mask)[:, 11], a[:, 11])


def test_model_options_and_bad_values(loader):
    from fusion.models import model_options

    assert model_options("cross_attention") == ["heads", "steps"]
    assert model_options("lmf") == ["rank"]
    with pytest.raises(ConfigError, match=r"hidden \(16\) must be divisible by heads \(3\)"):
        build("cross_attention", loader, heads=3)
    with pytest.raises(ConfigError, match="needs at least 2 groups"):
        create_model("cross_attention", loader.field_specs, loader.field_groups, ["audio"], NUM_CLASSES)
    with pytest.raises(ConfigError, match="sequence encoder must be one of"):
        build("gated", loader, encoder="lstm")


@pytest.mark.parametrize("name", ["late_fusion", "gated"])
def test_tcn_encoder_option_forward_and_padding(name, loader, batch):
    model = build(name, loader, encoder="tcn")
    noisy = copy.deepcopy(batch)
    for f, mask in noisy["mask"].items():
        x = noisy["features"][f]
        pad = ~mask.view(*mask.shape, *[1] * (x.dim() - 2)).expand_as(x)
        x[pad] = 1e3
    torch.testing.assert_close(model(noisy)["logits"], model(batch)["logits"])
