"""The audit's measurements on hand-made networks and maps: an x_t-blind network is reported as ignoring x_t, one
that copies x_t as using it; the scores of hand-made maps; the knock-outs reach both paths of a layer and undo
themselves; the rough outline; the occlusion helpers; the means over cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from factories import BRATS2021, tiny_label
from medseg_diff.audit.cases import AuditCase, head_of, rough_outline
from medseg_diff.audit.maps import most_attended, occluded, random_head_voxels
from medseg_diff.audit.probe import XT_VERSIONS, xt_use
from medseg_diff.audit.report import mean_over_cases
from medseg_diff.audit.scores import dilated, enrichment, normalised_entropy, pointing_game
from medseg_diff.audit.verdicts import xt_row
from medseg_diff.audit.windows import Windowing, conditioning_prior, residual_zeroed
from medseg_diff.diffusion.schedules import build_scheduler
from medseg_diff.models import Conditioning, DenoiserOutput, DiffusionSegUNet, LinearAttention3d, MaskPriorCrossAttention

SIZE = (24, 24, 24)  # the map and outline helpers
SMALL = (16, 16, 16)  # what goes through a network: one window of WINDOWS
WINDOWS = Windowing(roi=(16, 16, 16), overlap=0.25, sw_batch_size=2, mode="gaussian", amp=False)


def tiny_net(prior_source: str = "head") -> DiffusionSegUNet:
    torch.manual_seed(0)
    net = DiffusionSegUNet(channels=(8, 16, 32), heads=2, dim_head=8, norm_groups=4, patch_size=2,
                           prior_source=prior_source).eval()
    with torch.no_grad():  # layers initialised at zero (the output head) would hide every change
        for p in net.parameters():
            if not p.any():
                p.normal_(0.0, 0.2)
    return net


def tiny_case(seed: int = 0, size: tuple[int, int, int] = SMALL) -> AuditCase:
    """A case of ``size``: a head sphere with a tumour (every label), modalities brighter in the tumour."""
    label = tiny_label(size, BRATS2021, seed)
    regions = BRATS2021.to_regions(label)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in size], indexing="ij"))
    centre = (np.array(size)[:, None, None, None] - 1) / 2
    head = np.sqrt(((grid - centre) ** 2).sum(0)) < min(size) / 2
    rng = np.random.default_rng(seed)
    image = np.stack([head * (1.0 + 0.5 * c + regions[1] * (c + 1) + rng.normal(0, 0.1, size)) for c in range(4)])
    image = torch.as_tensor(image, dtype=torch.float32)[None]
    return AuditCase(f"case{seed}", image, regions, head_of(image[0]))


class XtBlind(nn.Module):
    """A diffusion U-Net that never sees x_t: it is replaced by zeros before the network."""

    def __init__(self, net: DiffusionSegUNet):
        super().__init__()
        self.net = net

    def encode(self, image: Tensor, external_prior: Tensor | None = None) -> Conditioning:
        return self.net.encode(image, external_prior)

    def forward(self, x_t: Tensor, t, cond: Conditioning, self_cond: Tensor | None = None) -> Tensor:
        return self.net(torch.zeros_like(x_t), t, cond)


class XtCopier(nn.Module):
    """Outputs the x0 logits ``20 x_t``: it takes x_t at its word, whatever the image."""

    prior_source = "none"

    def encode(self, image: Tensor, external_prior: Tensor | None = None) -> Conditioning:
        return Conditioning(features=[image])

    def forward(self, x_t: Tensor, t, cond: Conditioning, self_cond: Tensor | None = None) -> Tensor:
        return 20.0 * x_t

    def forward_with_attention(self, x_t: Tensor, t, cond: Conditioning, self_cond=None) -> DenoiserOutput:
        return DenoiserOutput(self(x_t, t, cond))


def _mean_xt(nets_result: list[dict]) -> dict:
    return mean_over_cases(nets_result)


# -- question 1 ------------------------------------------------------------------------------------------------
def test_an_xt_blind_network_is_reported_as_ignoring_xt():
    scheduler = build_scheduler(1000, "linear_beta", "sample")
    result = xt_use(XtBlind(tiny_net()), scheduler, tiny_case(), WINDOWS, seed=0, threshold=0.5)
    dice = result["dice"]
    # it cannot tell the true mask from its inverse, the empty mask or noise: one Dice for all at every t
    for label in result["timesteps"]:
        assert len({dice[v][label] for v in XT_VERSIONS}) == 1, label
    row = xt_row(_mean_xt([result]))
    assert row["verdict"].startswith("ignores x_t") and row["met"] is False


def test_a_network_that_copies_xt_is_reported_as_using_it():
    scheduler = build_scheduler(1000, "linear_beta", "sample")
    result = xt_use(XtCopier(), scheduler, tiny_case(), WINDOWS, seed=0, threshold=0.5)
    steps = result["timesteps"]
    assert abs(result["alpha_bar"]["abar0.9"] - 0.9) < 0.01 and steps["T-1"] == 999
    assert steps["abar0.9"] < steps["abar0.5"] < steps["abar0.1"] < steps["T-1"]
    assert result["dice"]["true"]["abar0.9"] >= 0.95
    assert result["dice"]["inverted"]["abar0.9"] < 0.1
    row = xt_row(_mean_xt([result]))
    assert row["verdict"].startswith("uses x_t") and row["met"] is True


def test_the_x_t_question_reads_every_window():
    """With several windows per volume, x_t travels with the image: the copier gives back the true mask at ᾱ ≈ 0.9
    in every corner of the volume, not only in one window."""
    scheduler = build_scheduler(1000, "linear_beta", "sample")
    case = tiny_case(3, SIZE)
    result = xt_use(XtCopier(), scheduler, case, Windowing((8, 8, 8), 0.0, 4, "constant", False), 0, 0.5)
    assert result["dice"]["true"]["abar0.9"] >= 0.95


# -- knock-outs --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer_type", [MaskPriorCrossAttention, LinearAttention3d])
def test_a_zeroed_residual_returns_its_input_on_both_paths_and_is_undone(layer_type):
    net, case = tiny_net(), tiny_case()
    image = case.image[..., :16, :16, :16]
    cond = net.encode(image)
    x_t = torch.randn(1, 3, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = net(x_t, 500, cond)
        with residual_zeroed(net, layer_type) as layers:
            assert layers >= 1
            knocked, knocked_maps = net(x_t, 500, cond), net.forward_with_attention(x_t, 500, cond)
            layer = next(m for m in net.modules() if isinstance(m, layer_type))
            x = torch.randn(1, layer.norm.num_channels, 4, 4, 4)
            args = (cond.tokens,) if layer_type is MaskPriorCrossAttention else ()
            assert layer(x, *args) is x and layer.forward_with_attention(x, *args).out is x
        after = net(x_t, 500, cond)
    assert not torch.allclose(before, knocked)
    torch.testing.assert_close(knocked_maps.pred, knocked)  # the last sampling step's path is knocked out too
    torch.testing.assert_close(after, before)
    assert all("forward" not in vars(m) for m in net.modules())


def test_a_prior_put_into_the_conditioning_replaces_the_prior_and_rebuilds_the_tokens():
    net, case = tiny_net("head"), tiny_case()
    image = case.image[..., :16, :16, :16]
    prior = torch.as_tensor(case.regions[:, :16, :16, :16], dtype=torch.float32)[None]
    with torch.no_grad():
        own = net.encode(image)
        changes: list[float] = []
        with conditioning_prior(net, prior, changes):
            given = net.encode(image)
        zeros = torch.zeros_like(prior)
        with conditioning_prior(net, zeros):
            empty = net.encode(image)
        again = net.encode(image)
    grid = own.token_grid
    torch.testing.assert_close(given.prior, torch.nn.functional.interpolate(prior, size=grid, mode="area"))
    assert float(empty.prior.abs().max()) == 0.0
    assert not torch.allclose(given.tokens, own.tokens) and not torch.allclose(given.tokens, empty.tokens)
    torch.testing.assert_close(given.features[0], own.features[0])  # the image features are untouched
    torch.testing.assert_close(again.tokens, own.tokens)  # undone
    assert len(changes) == 1 and changes[0] > 0


# -- scores and helpers ------------------------------------------------------------------------------------------
def test_scores_of_hand_made_maps():
    head = np.zeros((10, 10, 10), bool)
    head[1:9, 1:9, 1:9] = True
    region = np.zeros_like(head)
    region[2:4, 2:4, 2:4] = True  # 8 of the head's 512 voxels
    attention = np.ones(head.shape)
    attention[region] = 3.0 * 504 / (512 - 3 * 8)  # mean inside = 3 x the head's mean
    assert enrichment(attention, region, head) == pytest.approx(3.0)
    assert enrichment(np.ones(head.shape), region, head) == pytest.approx(1.0)
    assert pointing_game(attention, region, head) is True
    away = np.ones(head.shape)
    away[7, 7, 7] = 5.0
    assert pointing_game(away, region, head) is False
    uniform, one_hot = np.full((2, 5, 16), 1 / 16), np.eye(16)[np.zeros((2, 5), int)]
    assert normalised_entropy(uniform) == pytest.approx(1.0)
    assert normalised_entropy(one_hot) == pytest.approx(0.0, abs=1e-6)


def test_the_rough_outline_is_the_dilated_blurred_whole_tumour_in_three_channels():
    case = tiny_case(0, SIZE)
    outline = rough_outline(case.regions)
    assert outline.shape == (3, *SIZE) and outline.dtype == np.float32
    assert (outline[0] == outline[1]).all() and (outline[1] == outline[2]).all()
    assert 0.0 <= outline.min() and outline.max() <= 1.0
    assert outline[1][case.regions[1]].min() > 0.9  # inside the tumour: about 1
    assert outline[1][~dilated(case.regions[1], 4)].max() < 0.01  # 2 voxels of dilation + a σ = 1 blur
    assert outline[1][~dilated(case.regions[1], 6)].max() == 0.0  # scipy cuts the Gaussian at 4 σ
    assert (outline[1][dilated(case.regions[1], 2) & ~case.regions[1]] > 0.4).all()


def test_occlusion_sets_the_chosen_voxels_to_the_head_median_and_nothing_else():
    case = tiny_case(0, SIZE)
    attention = np.random.default_rng(0).random(SIZE)
    count = int(round(0.1 * case.head.sum()))
    top = most_attended(attention, case.head, count)
    assert len(top) == count and case.head.reshape(-1)[top].all()
    assert attention.reshape(-1)[top].min() >= attention[case.head].max() - 1e-12 or \
        attention.reshape(-1)[top].min() >= np.sort(attention[case.head])[-count]
    chosen = random_head_voxels(case.head, count, seed=0, case_id=case.case_id)
    assert len(set(chosen.tolist())) == count and case.head.reshape(-1)[chosen].all()
    np.testing.assert_array_equal(chosen, random_head_voxels(case.head, count, 0, case.case_id))
    out = occluded(case.image, case.head, top)
    flat_in, flat_out = case.image[0].reshape(4, -1), out[0].reshape(4, -1)
    others = np.setdiff1d(np.arange(flat_in.shape[1]), top)
    torch.testing.assert_close(flat_out[:, others], flat_in[:, others])
    for c in range(4):
        median = flat_in[c, np.flatnonzero(case.head)].median()
        assert torch.all(flat_out[c, top] == median)


def test_means_over_cases_average_numbers_count_booleans_and_skip_nan():
    mean = mean_over_cases([{"a": 1.0, "b": {"c": True, "d": float("nan")}, "how": "input"},
                            {"a": 3.0, "b": {"c": False, "d": 2.0}, "how": "input"}])
    assert mean == {"a": 2.0, "b": {"c": 0.5, "d": 2.0}, "how": "input"}


# -- question 5: where the prior goes, per prior source -----------------------------------------------------------
def _loaded(prior_source: str):
    """An untrained tiny diffusion model of ``prior_source`` as ``load_model`` would hand it over (K = 1, N = 1)."""
    from factories import tiny_config
    from medseg_diff.kinds import build_kind as build_adapter
    from medseg_diff.inference.loading import LoadedModel

    cfg = tiny_config("unused.json", "unused", "diffusion", diffusion={"sample_steps": 1, "ensemble": 1},
                      model={"kind": "diffusion", "denoiser": {"channels": [8, 16, 32], "patch_size": 2, "heads": 2,
                                                               "dim_head": 8, "norm_groups": 4,
                                                               "prior_source": prior_source}})
    adapter = build_adapter(cfg)
    return LoadedModel(adapter, adapter.net.eval(), cfg, checkpoint=None, run_id=None, epoch=0)


@pytest.mark.parametrize("prior_source, how, none_given", [
    ("optional", "input", None),  # works without a prior: "none" is no prior at all
    ("external", "input", 0.0),  # needs one: "none" is an all-zero prior
])
def test_a_prior_the_network_takes_as_input_is_knocked_out_at_its_input(prior_source, how, none_given, monkeypatch):
    from medseg_diff.audit.probe import DiffusionProbe

    model = _loaded(prior_source)
    given: list = []
    own = model.net.encode
    monkeypatch.setattr(model.net, "encode", lambda image, external_prior=None: (
        given.append(None if external_prior is None else float(external_prior.max())), own(image, external_prior))[1])
    probe = DiffusionProbe(model, WINDOWS, seed=0)
    result = probe.prior_knockouts(tiny_case(0), tiny_case(1))
    assert result["applicable"] and result["how"] == how
    assert set(result["dice"]) == {"none", "other", "outline", "truth"}
    assert set(result["delta"]) == {"other", "outline", "truth"}
    windows = len(given) // 4  # the same windows for each of the 4 priors, in order
    assert given[:windows] == [none_given] * windows
    assert all(v is not None and v > 0.5 for v in given[windows:])  # another case's outline, the outline, the truth


def test_a_model_without_a_prior_has_no_prior_question():
    from medseg_diff.audit.probe import DiffusionProbe

    result = DiffusionProbe(_loaded("none"), WINDOWS, seed=0).prior_knockouts(tiny_case(), None)
    assert result == {"applicable": False, "how": "no prior (prior_source none)"}


def test_with_a_skip_from_x_t_the_skip_alone_is_reported_beside_the_network():
    """A scheduler whose x0 logits add x_t's own log-odds makes even an x_t-blind network "use" x_t: the audit
    says so by giving the skip's Dice alone next to the denoiser's."""
    scheduler = build_scheduler(1000, "linear_beta", "sample", x_skip=True)
    result = xt_use(XtBlind(tiny_net()), scheduler, tiny_case(), WINDOWS, seed=0, threshold=0.5)
    assert result["skip_only"]["abar0.9"] >= 0.95 and result["skip_only"]["T-1"] < 0.95
    assert result["dice"]["true"]["abar0.9"] >= 0.9  # the skip dominates the untrained network's logits
    assert "the skip from x_t alone" in xt_row(mean_over_cases([result]))["measured"]
