"""What is special about SADAAn: the seed's parameter count and outputs, the efficient segmentation head,
presence gating, the absolute grid, and gradients for every parameter under the six-term loss.

The registry-wide contract tests (tests/models/test_contract.py) cover forward/backward, checkpointing
and bf16 at the tiny configuration; the tests here use tiny widths too, except where the seed's
figures need the seed's configuration.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mednets.errors import ConfigError, InvalidInputError
from mednets.losses import SpatialAttentionLoss
from mednets.models import create_model, get_model_spec
from mednets.models.kernels import InstanceNorm
from mednets.models.sadaan import (
    ABSENT_LOGIT,
    AbsenceDetectionHead,
    SegmentationHead,
    SpatialAttentionMedicalSegmenter,
    resize_grid,
)

SEED_KEYS = {
    "attention_maps",
    "feature_responses",
    "alignment_scores",
    "position_priors",
    "absence_logits",
    "presence_probs",
    "confidence_scores",
    "segmentation_logits",
    "segmentation_probs",
}
TINY = dict(base_channels=4, feature_channels=8)
GRID = (16, 16, 16)


def _tiny(num_structures: int = 3, grid: tuple[int, int, int] = GRID, **kwargs) -> SpatialAttentionMedicalSegmenter:
    torch.manual_seed(0)
    return SpatialAttentionMedicalSegmenter(1, num_structures, grid, **TINY, **kwargs)


def _seed_style_logits(head: SegmentationHead, features: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """The seed's formulation, written independently: structure s = channel s of conv(refined * attention_s)."""
    refined = head.feature_refine(features)
    batch, channels, *grid = refined.shape
    structures = attention.shape[1]
    replicated = (refined[:, None] * attention[:, :, None]).reshape(batch * structures, channels, *grid)
    every = F.conv3d(replicated, head.segmentation_layer.weight, head.segmentation_layer.bias)
    every = every.reshape(batch, structures, structures, *grid)
    return torch.stack([every[:, s, s] for s in range(structures)], dim=1)


def test_seed_configuration_has_the_seed_parameter_count():
    model = create_model("sadaan")
    assert sum(p.numel() for p in model.parameters()) == 8_019_230 == get_model_spec("sadaan").param_count
    assert model.attention_module.position_prior.numel() == 5 * 64**3  # the absolute prior: 1,310,720
    assert sum(p.numel() for p in model.absence_detector.absence_classifiers[0].parameters()) == 10_466
    assert model.grid_size == (64, 64, 64) and model.spatial_dims == 3


def test_fast_preset_is_registered_with_its_parameter_count():
    spec = get_model_spec("sadaan_fast")
    model = create_model("sadaan_fast")
    assert model.num_structures == 13 == spec.out_channels
    assert sum(p.numel() for p in model.parameters()) == spec.param_count
    assert model.grid_size == spec.input_size


@pytest.mark.parametrize("training", [True, False])
def test_outputs_have_the_seed_keys_and_shapes_at_64(training):
    # the seed's shapes depend on batch, structures and grid, not on the width: a narrow build keeps this fast
    model = create_model("sadaan", **TINY).train(training)
    with torch.no_grad():
        out = model(torch.randn(2, 1, 64, 64, 64))
    assert set(out) == SEED_KEYS | {"present"}
    volume, per_structure = (2, 5, 64, 64, 64), (2, 5)
    for key in ("attention_maps", "feature_responses", "position_priors", "segmentation_logits", "segmentation_probs"):
        assert out[key].shape == volume, key
    for key in ("alignment_scores", "presence_probs", "confidence_scores"):
        assert out[key].shape == per_structure, key
    assert out["absence_logits"].shape == (2, 5, 2)
    assert out["present"].dtype == torch.bool and out["present"].shape == per_structure
    assert torch.allclose(out["presence_probs"], torch.softmax(out["absence_logits"], -1)[..., 1])


@pytest.mark.slow
def test_seed_configuration_runs_at_64_in_bf16():
    model = create_model("sadaan").eval().to_channels_last()
    x = torch.randn(2, 1, 64, 64, 64).to(memory_format=torch.channels_last_3d)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        out = model(x)
    assert out["segmentation_probs"].shape == (2, 5, 64, 64, 64)
    assert torch.isfinite(out["segmentation_logits"].float()).all()


def test_efficient_head_equals_the_seed_replicated_head():
    torch.manual_seed(1)
    head = SegmentationHead(8, 5).double().eval()
    nn.init.normal_(head.segmentation_layer.bias)  # a non-zero bias: the part that is not scaled
    features = torch.randn(2, 8, 8, 12, 16, dtype=torch.float64)
    attention = torch.rand(2, 5, 8, 12, 16, dtype=torch.float64)
    with torch.no_grad():
        expected = _seed_style_logits(head, features, attention)
        efficient = head(features, attention)
        head.replicated = True  # the benchmark's seed-style option gives the same logits too
        replicated = head(features, attention)
    assert efficient.shape == (2, 5, 8, 12, 16)
    assert (efficient - expected).abs().max() < 1e-5
    assert (replicated - expected).abs().max() < 1e-5


def test_replicated_head_model_option_matches_the_efficient_model():
    efficient = _tiny().double().eval()
    seed_style = _tiny(replicated_head=True).double().eval()
    seed_style.load_state_dict(efficient.state_dict())
    x = torch.randn(2, 1, *GRID, dtype=torch.float64)
    with torch.no_grad():
        a, b = efficient(x, gating=False), seed_style(x, gating=False)
    assert (a["segmentation_logits"] - b["segmentation_logits"]).abs().max() < 1e-5


def _force_absent(model: SpatialAttentionMedicalSegmenter, structure: int) -> None:
    """Make the absence classifier of `structure` say "absent" with near certainty."""
    with torch.no_grad():
        model.absence_detector.absence_classifiers[structure][-1].bias.copy_(torch.tensor([20.0, -20.0]))


def test_gating_zeroes_absent_structures_in_eval_and_not_when_off():
    model = _tiny().eval()
    _force_absent(model, 1)
    x = torch.randn(1, 1, *GRID)
    with torch.no_grad():
        gated = model(x)
        ungated = model(x, gating=False)
    assert not gated["present"][0, 1]
    assert torch.equal(gated["segmentation_probs"][:, 1], torch.zeros_like(gated["segmentation_probs"][:, 1]))
    assert (gated["segmentation_logits"][:, 1] == ABSENT_LOGIT).all()
    # gating off: the absent structure is painted as the head computed it
    assert ungated["segmentation_probs"][:, 1].gt(0).all()
    assert torch.equal(ungated["segmentation_probs"], torch.sigmoid(ungated["segmentation_logits"]))
    # structures judged present are untouched by gating
    for s in torch.nonzero(gated["present"][0]).flatten().tolist():
        assert torch.equal(gated["segmentation_probs"][:, s], ungated["segmentation_probs"][:, s])


def test_gating_is_off_in_training_mode_and_settable_on_the_model():
    model = _tiny().train()
    _force_absent(model, 0)
    x = torch.randn(2, 1, *GRID)
    assert model(x)["segmentation_probs"][:, 0].gt(0).all()  # training: the loss needs the raw maps
    model.eval().gating = False
    with torch.no_grad():
        assert model(x)["segmentation_probs"][:, 0].gt(0).all()


def test_presence_threshold_is_per_call_and_per_structure():
    model = _tiny().eval()
    x = torch.randn(1, 1, *GRID)
    with torch.no_grad():
        out = model(x, presence_threshold=[0.0, 1.0, 0.0])  # softmax never reaches 1: structure 1 absent
    assert out["present"].tolist() == [[True, False, True]]
    assert torch.equal(out["segmentation_probs"][:, 1], torch.zeros_like(out["segmentation_probs"][:, 1]))
    assert out["segmentation_probs"][:, 0].gt(0).all()
    model.presence_threshold = 0.0
    with torch.no_grad():
        assert model(x)["present"].all()
    with pytest.raises(ConfigError, match="one per structure"):
        model(x, presence_threshold=[0.5, 0.5])
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        model(x, presence_threshold=1.5)


def _pre_norm_biases(model: nn.Module) -> set[str]:
    """Biases of convolutions directly followed by batch norm: batch norm removes them, so their gradient is 0."""
    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, nn.Sequential):
            for i, (layer, nxt) in enumerate(zip(module, list(module)[1:], strict=False)):
                if isinstance(layer, nn.Conv3d) and isinstance(nxt, nn.BatchNorm3d) and layer.bias is not None:
                    names.add(f"{prefix}.{i}.bias")
    return names


def test_every_parameter_gets_a_finite_nonzero_gradient_with_mixed_presence():
    model = _tiny().double().train()
    torch.manual_seed(2)
    x = torch.randn(2, 1, *GRID, dtype=torch.float64)
    masks = torch.zeros(2, 3, *GRID, dtype=torch.float64)
    masks[0, 0, 4:10, 4:10, 4:10] = 1  # sample 0: structures 0 and 2 present, 1 absent
    masks[0, 2, 8:12, 2:6, 6:14] = 1
    masks[1, 1, 2:8, 6:12, 3:9] = 1  # sample 1: only structure 1 present
    terms = SpatialAttentionLoss()(model(x), {"segmentation_targets": masks})
    assert all(torch.isfinite(value) and value > 0 for name, value in terms.items()), terms
    terms["total"].backward()

    redundant = _pre_norm_biases(model)
    assert redundant  # the seed's convolutions keep a bias before batch norm (they count in 8,019,230)
    for name, parameter in model.named_parameters():
        grad = parameter.grad
        assert grad is not None, name
        assert torch.isfinite(grad).all(), name
        if name in redundant:
            assert grad.abs().max() < 1e-9, name  # mathematically zero: batch norm subtracts the mean
        else:
            assert grad.abs().max() > 0, name


def test_wrong_grid_is_rejected_with_a_clear_message():
    model = _tiny()
    with pytest.raises(InvalidInputError, match="differs from the model's grid") as error:
        model(torch.randn(1, 1, 32, 32, 32))
    assert "resize_grid" in str(error.value) and "16, 16, 16" in str(error.value)


def test_wrong_channel_count_is_rejected_with_a_clear_message():
    with pytest.raises(InvalidInputError, match="wrong number of channels"):
        _tiny()(torch.randn(1, 2, *GRID))


@pytest.mark.parametrize("grid", [(24, 16, 16), (16, 16), (0, 16, 16)])
def test_grid_must_be_three_sizes_divisible_by_16(grid):
    with pytest.raises(ConfigError, match="divisible by 16"):
        _tiny(grid=grid)


def test_resize_grid_interpolates_the_prior_on_purpose():
    model = _tiny()
    with torch.no_grad():
        model.attention_module.position_prior.fill_(0.3)
        model.attention_module.position_prior[:, 1, :8] = -0.7  # a step along the depth axis
    resize_grid(model, (32, 32, 48))
    prior = model.attention_module.position_prior
    assert isinstance(prior, nn.Parameter) and prior.shape == (1, 3, 32, 32, 48)
    assert model.grid_size == (32, 32, 48)
    assert torch.allclose(prior[:, 0], torch.full_like(prior[:, 0], 0.3))  # constant stays constant
    assert prior[0, 1, 0].max().item() == pytest.approx(-0.7) and prior[0, 1, -1].min().item() == pytest.approx(0.3)
    out = model(torch.randn(1, 1, 32, 32, 48))
    assert out["segmentation_logits"].shape == (1, 3, 32, 32, 48)
    with pytest.raises(InvalidInputError, match="grid"):
        model(torch.randn(1, 1, *GRID))
    with pytest.raises(ConfigError, match="divisible by 16"):
        resize_grid(model, (40, 32, 32))


def test_checkpointing_switch_reaches_every_component_and_keeps_gradients():
    x = torch.randn(2, 1, *GRID, dtype=torch.float64)
    grads = []
    for enabled in (False, True):
        model = _tiny().double().train().set_gradient_checkpointing(enabled)
        assert model.encoder.gradient_checkpointing is enabled
        assert model.attention_module.gradient_checkpointing is enabled
        assert model.segmentation_head.gradient_checkpointing is enabled
        out = model(x)
        (out["segmentation_logits"].sum() + out["absence_logits"].sum() + out["confidence_scores"].sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], rtol=1e-9, atol=1e-12), name


def test_bf16_channels_last_is_within_bf16_tolerance_of_fp32():
    model = _tiny().train()
    x = torch.randn(2, 1, *GRID)
    reference = model(x)
    model.to_channels_last()
    with torch.autocast("cpu", torch.bfloat16):
        fast = model(x.to(memory_format=torch.channels_last_3d))
    for key in ("segmentation_logits", "presence_probs", "attention_maps", "alignment_scores"):
        error = (fast[key].float() - reference[key]).abs().max()
        scale = reference[key].abs().max().clamp(min=1)
        assert error / scale < 0.05, key


def test_instance_norm_option_keeps_the_parameter_count_and_drops_batch_norm():
    seed = create_model("sadaan")
    instance = create_model("sadaan", norm_kind="instance")
    assert sum(p.numel() for p in instance.parameters()) == sum(p.numel() for p in seed.parameters()) == 8_019_230
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in instance.modules())
    assert any(isinstance(m, InstanceNorm) for m in instance.modules())


def test_normalised_alignment_is_the_plain_score_divided_by_the_prior_mean():
    plain = _tiny().eval()
    normalised = _tiny(normalise_alignment=True).eval()
    normalised.load_state_dict(plain.state_dict())
    x = torch.randn(1, 1, *GRID)
    prior_mean = torch.sigmoid(plain.attention_module.position_prior).mean(dim=(2, 3, 4))
    expected = plain(x)["alignment_scores"] / prior_mean
    torch.testing.assert_close(normalised(x)["alignment_scores"], expected, rtol=1e-5, atol=1e-7)


def test_prior_starts_from_the_label_frequency_with_a_floor():
    model = _tiny()
    frequency = torch.zeros(3, *GRID)
    frequency[0, 4:8, 4:8, 4:8] = 1.0
    frequency[1, :, :, :8] = 0.5
    model.init_from_label_frequency(frequency, floor=0.2)
    prior_probs = torch.sigmoid(model.attention_module.position_prior[0])
    torch.testing.assert_close(prior_probs[0, 0, 0, 0], torch.tensor(0.2))  # never seen: the floor
    torch.testing.assert_close(prior_probs[1, 0, 0, 0], torch.tensor(0.6))  # 0.2 + 0.8 * 0.5
    assert prior_probs[0, 5, 5, 5] > 0.99  # always there
    bias = model.segmentation_head.segmentation_layer.bias
    torch.testing.assert_close(torch.sigmoid(bias[0]), frequency[0].mean(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.sigmoid(bias[2]), torch.tensor(1e-4))  # never seen: the lower clamp


def test_prior_initialisation_rejects_a_frequency_of_another_grid():
    with pytest.raises(InvalidInputError, match="grid"):
        _tiny().init_from_label_frequency(torch.zeros(3, 8, 8, 8))
    with pytest.raises(ConfigError, match="floor"):
        _tiny().init_from_label_frequency(torch.zeros(3, *GRID), floor=1.0)


def test_presence_evidence_adds_the_painted_volume_log_odds():
    plain, evidence = _tiny(), _tiny(presence_evidence=True)
    extra = sum(p.numel() for p in evidence.parameters()) - sum(p.numel() for p in plain.parameters())
    assert extra == 2 * 3  # a weight and a log-threshold per structure
    x = torch.randn(2, 1, *GRID)
    out = evidence.train()(x)
    assert out["presence_probs"].shape == (2, 3)
    out["presence_probs"].sum().backward()
    head = evidence.absence_detector
    assert head.evidence_weight.grad.abs().sum() > 0 and head.evidence_log_threshold.grad.abs().sum() > 0
    assert evidence.segmentation_head.segmentation_layer.weight.grad is None  # the painted share is detached
    with pytest.raises(InvalidInputError, match="painted share"):
        head(torch.randn(2, 8, 4, 4, 4), torch.rand(2, 3))


def test_presence_evidence_is_the_log_ratio_to_the_threshold():
    """Painted at the threshold: the term is 0; e times more: +1 log-odds per unit weight; empty: far below."""
    head = AbsenceDetectionHead(2, feature_dim=4, painted_evidence=True)
    with torch.no_grad():
        head.evidence_log_threshold.copy_(torch.log(torch.tensor([1e-2, 1e-3])))
        head.evidence_weight.copy_(torch.tensor([1.0, 2.0]))
    features, scores = torch.zeros(1, 4, 10, 10, 10), torch.zeros(1, 2)
    base = AbsenceDetectionHead(2, feature_dim=4)
    base.load_state_dict({k: v for k, v in head.state_dict().items() if not k.startswith("evidence")})
    mlp = base(features, scores)["absence_logits"]
    shift = head(features, scores, torch.tensor([[1e-2 * math.e, 0.0]]))["absence_logits"] - mlp
    eps = 0.5 / 1000
    expected = torch.tensor([1.0 + math.log(1 + eps / (1e-2 * math.e)), 2.0 * math.log(eps / 1e-3)])
    torch.testing.assert_close(shift[0, :, 1], expected)
    torch.testing.assert_close(shift[0, :, 0], torch.zeros(2))


def test_prior_initialisation_sets_the_evidence_threshold_to_a_quarter_of_the_smallest_share():
    model = _tiny(presence_evidence=True)
    frequency = torch.zeros(3, *GRID)
    frequency[0, :4] = 1.0  # a quarter of the grid
    model.init_from_label_frequency(frequency)  # no smallest share: a quarter of the mean share
    threshold = model.absence_detector.evidence_log_threshold
    torch.testing.assert_close(threshold.exp(), torch.tensor([0.25 * 0.25, 0.25 * 1e-6, 0.25 * 1e-6]))
    model.init_from_label_frequency(frequency, smallest_share=torch.tensor([0.1, 0.02, 0.0]))
    torch.testing.assert_close(threshold.exp(), torch.tensor([0.25 * 0.1, 0.25 * 0.02, 0.25 * 1e-6]))
    with pytest.raises(InvalidInputError, match="smallest share"):
        model.init_from_label_frequency(frequency, smallest_share=torch.zeros(2))
