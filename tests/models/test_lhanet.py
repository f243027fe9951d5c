"""LHA-Net (seed 003): the seed's ten tests at small sizes, plus what the public version got wrong.

The registry-wide contract (shapes, checkpointing, bf16, channels-last) lives in test_contract.py;
here: backbones, PMSA, hierarchy, routing, deep supervision, size bounds, gradient flow, and that
every decoder level (the finest included) reaches the prediction.
"""

from __future__ import annotations

import pytest
import torch

from mednets.errors import ConfigError, InvalidInputError, UnknownNameError
from mednets.losses import DeepSupervisionLoss
from mednets.models import create_model, get_model_spec
from mednets.models.lhanet import (
    PMSA,
    SCALES,
    HierarchicalPMSA,
    LHANet,
    LightweightBackbone,
    OrganSizeAwareDecoder,
    OrganSizePaths,
    ResNet3D18Backbone,
)
from mednets.reports.measure import run_measured

SMALL = (32, 64, 64)  # the issue's small test size
NUM_CLASSES = 14


def tiny(name: str, **overrides: object) -> LHANet:
    spec = get_model_spec(name)
    return create_model(name, **{**spec.tiny_overrides, **overrides})


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---- 1-2: backbones ------------------------------------------------------------------------------


def test_lightweight_backbone_gives_five_maps_with_its_channels_and_strides() -> None:
    backbone = LightweightBackbone(3, 1, (16, 32, 64, 128, 256)).eval()
    with torch.no_grad():
        features = backbone(torch.randn(1, 1, *SMALL))
    assert len(features) == 5
    for feature, channels, stride in zip(features, (16, 32, 64, 128, 256), (1, 2, 4, 8, 16), strict=True):
        assert tuple(feature.shape) == (1, channels, *(n // stride for n in SMALL))


def test_resnet3d18_backbone_gives_five_hierarchical_maps_and_resnet18_size() -> None:
    backbone = ResNet3D18Backbone(3, 1).eval()
    with torch.no_grad():
        features = backbone(torch.randn(1, 1, *SMALL))
    assert [f.shape[1] for f in features] == [64, 64, 128, 256, 512]
    assert [tuple(f.shape[2:]) for f in features] == [tuple(n // s for n in SMALL) for s in (2, 4, 8, 16, 32)]
    assert n_params(backbone) == 33_160_000  # the seed's ResNet3D-18 backbone figure


# ---- 3-4: PMSA and its hierarchy -------------------------------------------------------------------


def test_pmsa_uses_five_scales_coarse_to_fine_and_keeps_the_shape() -> None:
    pmsa = PMSA(3, 32, 8).eval()
    assert pmsa.scales == SCALES == (0.5, 0.75, 1.0, 1.25, 1.5)
    seen: list[tuple[int, ...]] = []
    pmsa.scale_conv.register_forward_hook(lambda module, args, out: seen.append(tuple(out.shape[2:])))
    x = torch.randn(2, 32, 8, 16, 12)
    with torch.no_grad():
        out = pmsa(x)
    assert out.shape == x.shape
    # One pass of the shared scale convolution per scale, in order 0.5 ... 1.5 (progressive, coarse to fine).
    assert seen == [(4, 8, 6), (6, 12, 9), (8, 16, 12), (10, 20, 15), (12, 24, 18)]


def test_pmsa_scale_gates_are_per_sample_and_sum_to_one() -> None:
    pmsa = PMSA(3, 32, 8)
    x = torch.randn(3, 32, 4, 8, 8)
    x[1] *= 5  # a different sample must get different weights: the gate is dynamic
    weights = pmsa.scale_gate(x)
    assert weights.shape == (3, 5)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(3))
    assert not torch.allclose(weights[0], weights[1])


def test_pmsa_progressive_fusion_carries_coarse_scales_into_finer_ones() -> None:
    """With the gate on the finest scale alone, the coarsest scale's input still changes the output."""
    torch.manual_seed(0)
    pmsa = PMSA(3, 16, 8).double().eval()
    finest_only = torch.zeros(1, 5, dtype=torch.float64)
    finest_only[0, -1] = 1
    pmsa.scale_gate.forward = lambda x: finest_only  # type: ignore[method-assign]
    x = torch.randn(1, 16, 8, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        before = pmsa(x)
        pmsa.progressive[0][0].weight.add_(0.5)  # the fusion of scale 0.5 into scale 0.75
        after = pmsa(x)
    assert (after - before).abs().max() > 1e-6


def test_organ_size_paths_mix_is_the_gated_sum_of_the_paths_in_fp64_and_close_in_bf16() -> None:
    torch.manual_seed(0)
    paths = OrganSizePaths(3, 8).double()
    x = torch.randn(2, 8, 16, 16, 16, dtype=torch.float64)
    mixed, gates = paths(x)
    reference = sum(gates[:, p : p + 1] * path(x) for p, path in enumerate(paths.paths))
    assert torch.allclose(mixed, reference, atol=1e-12)
    fast = paths.float().to(memory_format=torch.channels_last_3d)
    features = x.float().contiguous(memory_format=torch.channels_last_3d)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, _ = fast(features)
    assert low.dtype == torch.bfloat16
    assert (low.double() - reference).abs().max() < 0.05 * reference.abs().max()


def test_hierarchical_pmsa_runs_four_levels_with_cross_level_flow() -> None:
    channels = (32, 64, 128, 256)
    hierarchy = HierarchicalPMSA(3, channels, 64).eval()
    features = [torch.randn(1, c, 16 // 2**k, 32 // 2**k, 32 // 2**k) for k, c in enumerate(channels)]
    with torch.no_grad():
        attended = hierarchy(features)
        assert [a.shape for a in attended] == [f.shape for f in features]
        # Cross-level flow: changing only the coarsest feature map changes the finest attended map.
        features[3] = features[3] + 1.0
        changed = hierarchy(features)
    assert (changed[0] - attended[0]).abs().max() > 1e-4
    assert hierarchy.levels[3].top_down is None and all(level.top_down is not None for level in hierarchy.levels[:3])


# ---- 5: the organ-size-aware decoder -------------------------------------------------------------


def test_decoder_routing_gates_sum_to_one_per_voxel_at_every_level() -> None:
    decoder = OrganSizeAwareDecoder(3, 64, (32, 16, 8, 4), (32, 16, 8, 8)).eval()
    bottleneck = torch.randn(2, 64, 2, 4, 4)
    skips = [torch.randn(2, c, 2 ** (k + 2), 2 ** (k + 3), 2 ** (k + 3)) for k, c in enumerate((32, 16, 8, 4))]
    with torch.no_grad():
        outputs, gates = decoder(bottleneck, skips)
    assert len(outputs) == len(gates) == 4
    for out, gate, skip in zip(outputs, gates, skips, strict=True):
        assert out.shape[2:] == skip.shape[2:]
        assert gate.shape == (2, 3, *skip.shape[2:])  # small / medium / large paths
        torch.testing.assert_close(gate.sum(dim=1), torch.ones_like(gate[:, 0]))
        assert gate.min() >= 0


# ---- 6-8: full models ----------------------------------------------------------------------------


def test_lightweight_forward_gives_logits_in_eval_and_four_aux_outputs_in_training() -> None:
    model = create_model("lhanet_lightweight")
    x = torch.randn(1, 1, *SMALL)
    with torch.no_grad():
        logits = model.eval()(x)
        outputs = model.train()(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (1, NUM_CLASSES, *SMALL)
    assert set(outputs) == {"logits", "aux_logits"} and outputs["logits"].shape == (1, NUM_CLASSES, *SMALL)
    assert [tuple(a.shape[2:]) for a in outputs["aux_logits"]] == [tuple(n // s for n in SMALL) for s in (2, 4, 8, 16)]
    assert all(a.shape[:2] == (1, NUM_CLASSES) for a in outputs["aux_logits"])


def test_standard_forward_uses_the_resnet_backbone_and_returns_input_size() -> None:
    model = create_model("lhanet_standard").eval()
    assert isinstance(model.backbone, ResNet3D18Backbone)
    with torch.no_grad():
        logits = model(torch.randn(1, 1, *SMALL))
    assert logits.shape == (1, NUM_CLASSES, *SMALL)
    assert torch.isfinite(logits).all()


def test_training_mode_with_deep_supervision_loss_backpropagates_and_learns() -> None:
    torch.manual_seed(0)
    model = tiny("lhanet_lightweight").train()
    x = torch.randn(2, 1, 32, 32, 32)
    labels = (x > 0.5).long() + (x > 1.5).long()  # a learnable 3-class target
    loss_fn = DeepSupervisionLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        terms = loss_fn(model(x), labels)
        terms["total"].backward()
        optimizer.step()
        losses.append(terms["total"].item())
    assert set(terms) == {"main", "aux_0", "aux_1", "aux_2", "aux_3", "total"}
    assert losses[-1] < losses[0]


def test_deep_supervision_off_returns_logits_in_training_and_has_no_aux_heads() -> None:
    model = tiny("lhanet_lightweight", deep_supervision=False).train()
    assert model.aux_heads is None
    out = model(torch.randn(1, 1, 32, 32, 32))
    assert isinstance(out, torch.Tensor) and out.shape == (1, NUM_CLASSES, 32, 32, 32)


# ---- 9: parameter and memory accounting ----------------------------------------------------------


@pytest.mark.parametrize(("name", "bound"), [("lhanet_lightweight", 6_000_000), ("lhanet_standard", 40_000_000)])
def test_parameter_bounds_and_breakdown_adds_up(name: str, bound: int) -> None:
    model = create_model(name)
    total = n_params(model)
    breakdown = model.parameter_breakdown()
    assert total <= bound
    assert sum(breakdown.values()) == total == get_model_spec(name).param_count
    # The seed put 280M parameters in PMSA; here it is a small part of the model.
    assert breakdown["pmsa"] < 0.2 * total


def _small_inference_peak(name: str) -> int:
    model = create_model(name).eval()
    with torch.no_grad():
        model(torch.randn(1, 1, *SMALL))
    return n_params(model)


def test_inference_memory_is_measured_and_small_at_the_test_size() -> None:
    measured = run_measured(_small_inference_peak, "lhanet_lightweight")
    assert measured.value == get_model_spec("lhanet_lightweight").param_count
    assert 0 < measured.peak_mb < 600  # weights ~22 MB; activations at 32x64x64 are ~100-200 MB


# ---- 10: gradient flow ---------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "size"), [("lhanet_lightweight", (32, 32, 32)), ("lhanet_standard", (64, 64, 64))])
def test_every_parameter_gets_a_finite_nonzero_gradient(name: str, size: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = tiny(name).double().train()
    x = torch.randn(2, 1, *size, dtype=torch.float64)
    labels = torch.randint(0, NUM_CLASSES, (2, 1, *size))
    DeepSupervisionLoss()(model(x), labels)["total"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"unused parameters: {missing}"
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad}"
    zero = [n for n, p in model.named_parameters() if p.grad.abs().max() == 0]
    assert not zero, f"parameters with an all-zero gradient: {zero}"


# ---- what the public version got wrong: every level reaches the prediction -----------------------


def _eval_change(model: LHANet, parameter: torch.nn.Parameter, x: torch.Tensor) -> float:
    with torch.no_grad():
        before = model(x)
        parameter.add_(0.5 * torch.randn_like(parameter))
        after = model(x)
    return (after - before).abs().max().item()


@pytest.mark.parametrize("path", [0, 1, 2])
def test_finest_decoder_paths_change_the_eval_output(path: int) -> None:
    torch.manual_seed(0)
    model = tiny("lhanet_lightweight").double().eval()
    x = torch.randn(1, 1, 32, 32, 32, dtype=torch.float64)
    finest = model.decoder.levels[-1].size_paths.paths[path].conv.weight
    assert _eval_change(model, finest, x) > 1e-6


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_every_decoder_level_and_pmsa_level_reaches_the_prediction(level: int) -> None:
    torch.manual_seed(0)
    model = tiny("lhanet_standard").double().eval()
    x = torch.randn(1, 1, 40, 33, 36, dtype=torch.float64)
    assert _eval_change(model, model.decoder.levels[level].size_paths.paths[0].conv.weight, x) > 1e-6
    assert _eval_change(model, model.pmsa.levels[level].pmsa.expand.weight, x) > 1e-6


# ---- configuration and input errors --------------------------------------------------------------


def test_unknown_backbone_and_bad_widths_are_config_errors() -> None:
    with pytest.raises(UnknownNameError, match="backbone"):
        LHANet(backbone="vit")
    with pytest.raises(ConfigError, match="decoder_channels"):
        LHANet(decoder_channels=(32, 16))


def test_wrong_channels_are_rejected() -> None:
    with pytest.raises(InvalidInputError, match="expected 1 channels"):
        tiny("lhanet_lightweight")(torch.randn(1, 2, 32, 32, 32))


def test_odd_sizes_and_2d_work() -> None:
    model = tiny("lhanet_lightweight").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 35, 37, 41)).shape == (1, NUM_CLASSES, 35, 37, 41)
        flat = LHANet(num_classes=3, spatial_dims=2, **get_model_spec("lhanet_lightweight").tiny_overrides).eval()
        assert flat(torch.randn(1, 1, 64, 48)).shape == (1, 3, 64, 48)


# ---- DeepSupervisionLoss -------------------------------------------------------------------------


def test_deep_supervision_weights_halve_per_level_and_sum_to_one() -> None:
    weights = DeepSupervisionLoss().level_weights(4)
    assert sum(weights) == pytest.approx(1.0)
    assert [w / weights[0] for w in weights] == pytest.approx([1, 0.5, 0.25, 0.125, 0.0625])


def test_deep_supervision_total_is_the_weighted_sum_of_levels_with_nearest_targets() -> None:
    torch.manual_seed(0)
    labels = torch.randint(0, 4, (2, 1, 8, 8, 8))
    outputs = {"logits": torch.randn(2, 4, 8, 8, 8), "aux_logits": [torch.randn(2, 4, 4, 4, 4)]}
    loss = DeepSupervisionLoss(aux_weights=[1.0])
    terms = loss(outputs, labels)
    assert terms["total"] == pytest.approx(0.5 * terms["main"].item() + 0.5 * terms["aux_0"].item())
    # The aux target is the label map resized by nearest neighbour: equal to scoring it against labels[..., 1::2].
    reference = DeepSupervisionLoss()(outputs["aux_logits"][0], labels[:, :, 1::2, 1::2, 1::2])
    assert terms["aux_0"] == pytest.approx(reference["main"].item())


def test_deep_supervision_perfect_prediction_scores_near_zero_and_absent_classes_give_no_nan() -> None:
    labels = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    labels[..., 2:5, 2:5, 2:5] = 1  # classes 2 and 3 are absent
    logits = 50.0 * torch.nn.functional.one_hot(labels[:, 0], 4).movedim(-1, 1).float()
    terms = DeepSupervisionLoss()(logits, labels)
    assert torch.isfinite(terms["total"]) and terms["total"] < 1e-3
    empty = DeepSupervisionLoss()(torch.randn(1, 4, 8, 8, 8), torch.zeros(1, 8, 8, 8, dtype=torch.long))
    assert torch.isfinite(empty["total"])


def test_deep_supervision_rejects_mismatched_targets_and_weights() -> None:
    outputs = {"logits": torch.randn(1, 3, 8, 8, 8), "aux_logits": [torch.randn(1, 3, 4, 4, 4)]}
    with pytest.raises(InvalidInputError, match="does not match"):
        DeepSupervisionLoss()(outputs, torch.zeros(1, 1, 4, 8, 8, dtype=torch.long))
    with pytest.raises(InvalidInputError, match="outside"):
        DeepSupervisionLoss()(outputs, torch.full((1, 1, 8, 8, 8), 3))
    with pytest.raises(InvalidInputError, match="auxiliary"):
        DeepSupervisionLoss(aux_weights=[0.5, 0.25])(outputs, torch.zeros(1, 1, 8, 8, 8, dtype=torch.long))


# ---- the issue's memory limits at full size (minutes on 2 cores: run with -m slow) -----------------


def _inference(name: str, size: tuple[int, ...]) -> tuple[int, ...]:
    model = create_model(name).eval()
    with torch.no_grad():
        return tuple(model(torch.randn(1, 1, *size)).shape)


def _checkpointed_training_step(name: str, size: tuple[int, ...]) -> float:
    model = create_model(name).train().set_gradient_checkpointing(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(1, 1, *size)
    labels = torch.randint(0, NUM_CLASSES, (1, 1, *size))
    loss = DeepSupervisionLoss()(model(x), labels)["total"]
    loss.backward()
    optimizer.step()
    return loss.item()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lhanet_lightweight", "lhanet_standard"])
def test_issue_memory_limits(name: str) -> None:
    inference = run_measured(_inference, name, (64, 128, 128))
    assert inference.peak_mb <= 1500
    assert run_measured(_inference, name, (96, 192, 192)).value == (1, NUM_CLASSES, 96, 192, 192)
    training = run_measured(_checkpointed_training_step, name, (64, 128, 128))
    assert training.peak_mb < 6000
