"""Losses on tiny cases computed by hand, term by term: SpatialAttentionLoss, and DeepSupervisionLoss on a binary head."""

from __future__ import annotations

import math

import pytest
import torch

from mednets.errors import InvalidInputError, UnknownNameError
from mednets.losses import DeepSupervisionLoss, SpatialAttentionLoss

EPS = 1e-6
LN2 = math.log(2)
WEIGHTS = SpatialAttentionLoss.DEFAULT_WEIGHTS


def _bce(p: float, target: float) -> float:
    return -math.log(p) if target == 1 else -math.log(1 - p)


@pytest.fixture
def outputs() -> dict[str, torch.Tensor]:
    """One sample, two structures, two voxels each (`[1, 2, 1, 1, 2]`), values chosen to make the sums easy.

    segmentation probabilities: structure 0 -> (0.5, 0.5), structure 1 -> (0.75, 0.5);
    presence probabilities (softmax[..., 1]): 0.75 and 0.5 (both judged present at 0.5);
    attention maps: (0.5, 0.5) and (0.8, 0.2); confidence: 0.9 and 0.4.
    """
    logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]], dtype=torch.float64).view(1, 2, 1, 1, 2)
    absence_logits = torch.tensor([[[0.0, math.log(3)], [0.0, 0.0]]], dtype=torch.float64)
    return {
        "segmentation_logits": logits,
        "segmentation_probs": torch.sigmoid(logits),
        "absence_logits": absence_logits,
        "presence_probs": torch.softmax(absence_logits, -1)[..., 1],
        "attention_maps": torch.tensor([[0.5, 0.5], [0.8, 0.2]], dtype=torch.float64).view(1, 2, 1, 1, 2),
        "confidence_scores": torch.tensor([[0.9, 0.4]], dtype=torch.float64),
    }


def _masks(structure0: list[float], structure1: list[float]) -> torch.Tensor:
    return torch.tensor([structure0, structure1], dtype=torch.float64).view(1, 2, 1, 1, 2)


def _check(terms: dict[str, torch.Tensor], expected: dict[str, float]) -> None:
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, abs=1e-6), name
    total = sum(WEIGHTS[name] * value for name, value in expected.items())
    assert terms["total"].item() == pytest.approx(total, abs=1e-6)
    assert set(terms) == {*WEIGHTS, "total"}


def test_all_present_matches_hand_computation(outputs):
    # masks: structure 0 = (1, 0), structure 1 = (1, 1); presence derived from the masks: both present
    terms = SpatialAttentionLoss()(outputs, {"segmentation_targets": _masks([1, 0], [1, 1])})
    _check(
        terms,
        {
            "segmentation": (LN2 + (math.log(4 / 3) + LN2) / 2) / 2,
            "dice": ((1 - (1.0 + EPS) / (2.0 + EPS)) + (1 - (2.5 + EPS) / (3.25 + EPS))) / 2,
            "absence": (-math.log(0.75) - math.log(0.5)) / 2,
            "false_positive_suppression": 0.0,  # nothing absent: 0, not NaN
            "attention_supervision": (LN2 + (-math.log(0.8) - math.log(0.2)) / 2) / 2,
            "confidence": (-math.log(0.9) - math.log(0.4)) / 2,  # both decisions right
        },
    )


def test_all_absent_matches_hand_computation(outputs):
    terms = SpatialAttentionLoss()(outputs, {"segmentation_targets": _masks([0, 0], [0, 0])})
    _check(
        terms,
        {
            "segmentation": 0.0,  # nothing present: 0, not NaN
            "dice": 0.0,
            "absence": (-math.log(0.25) - math.log(0.5)) / 2,
            "false_positive_suppression": (0.5 + (0.75 + 0.5) / 2) / 2,
            "attention_supervision": 0.0,
            "confidence": (-math.log(1 - 0.9) - math.log(1 - 0.4)) / 2,  # both judged present: both wrong
        },
    )


def test_mixed_presence_counts_each_term_on_its_structures(outputs):
    # structure 0 present (mask (1, 0)), structure 1 absent
    terms = SpatialAttentionLoss()(outputs, {"segmentation_targets": _masks([1, 0], [0, 0])})
    _check(
        terms,
        {
            "segmentation": LN2,
            "dice": 1 - (1.0 + EPS) / (2.0 + EPS),
            "absence": (-math.log(0.75) - math.log(0.5)) / 2,
            "false_positive_suppression": (0.75 + 0.5) / 2,
            "attention_supervision": LN2,
            "confidence": (-math.log(0.9) - math.log(1 - 0.4)) / 2,
        },
    )


def test_absent_structure_gets_no_segmentation_loss(outputs):
    base = SpatialAttentionLoss()(outputs, {"segmentation_targets": _masks([1, 0], [0, 0])})
    worse = dict(outputs)
    worse["segmentation_logits"] = outputs["segmentation_logits"].clone()
    worse["segmentation_logits"][:, 1] = -50.0  # changes only the absent structure's logits
    terms = SpatialAttentionLoss()(worse, {"segmentation_targets": _masks([1, 0], [0, 0])})
    assert terms["segmentation"].item() == pytest.approx(base["segmentation"].item())


def test_explicit_presence_and_attention_targets_override_the_defaults(outputs):
    masks = _masks([1, 0], [1, 1])
    targets = {
        "segmentation_targets": masks,
        "presence_targets": torch.tensor([[1.0, 0.0]], dtype=torch.float64),  # structure 1 declared absent
        "attention_targets": _masks([0, 1], [0, 0]),
    }
    terms = SpatialAttentionLoss()(outputs, targets)
    assert terms["segmentation"].item() == pytest.approx(LN2)
    assert terms["false_positive_suppression"].item() == pytest.approx(0.625)
    assert terms["attention_supervision"].item() == pytest.approx(LN2)  # structure 0 attention 0.5 everywhere
    assert terms["confidence"].item() == pytest.approx((-math.log(0.9) - math.log(0.6)) / 2)


def test_decision_comes_from_the_model_present_output(outputs):
    outputs = {**outputs, "present": torch.tensor([[True, False]])}  # e.g. a per-structure threshold
    terms = SpatialAttentionLoss()(outputs, {"segmentation_targets": _masks([1, 0], [0, 0])})
    assert terms["confidence"].item() == pytest.approx((-math.log(0.9) - math.log(0.4)) / 2)  # both right


def test_focal_loss_replaces_bce_when_gamma_is_positive(outputs):
    loss = SpatialAttentionLoss(focal_alpha=0.25, focal_gamma=2.0)
    terms = loss(outputs, {"segmentation_targets": _masks([1, 0], [0, 0])})
    # both voxels p = 0.5: (1 - p_t)^2 = 0.25; alpha_t = 0.25 (foreground) and 0.75 (background)
    assert terms["segmentation"].item() == pytest.approx((0.25 * 0.25 + 0.75 * 0.25) / 2 * LN2)
    plain = SpatialAttentionLoss(focal_alpha=0.25)(outputs, {"segmentation_targets": _masks([1, 0], [0, 0])})
    assert plain["segmentation"].item() == pytest.approx(LN2)  # gamma 0: alpha unused, plain BCE


def test_partial_weights_override_only_their_keys(outputs):
    loss = SpatialAttentionLoss(weights={"absence": 0.0, "dice": 3.0})
    assert loss.weights == {**WEIGHTS, "absence": 0.0, "dice": 3.0}
    terms = loss(outputs, {"segmentation_targets": _masks([1, 0], [0, 0])})
    expected = sum(loss.weights[name] * terms[name].item() for name in WEIGHTS)
    assert terms["total"].item() == pytest.approx(expected)
    default = SpatialAttentionLoss()(outputs, {"segmentation_targets": _masks([1, 0], [0, 0])})
    assert terms["total"].item() == pytest.approx(
        default["total"].item() - 2.0 * default["absence"].item() + 2.0 * default["dice"].item()
    )


def test_unknown_weight_name_is_rejected():
    with pytest.raises(UnknownNameError, match="unknown loss term"):
        SpatialAttentionLoss(weights={"segmentaton": 1.0})


def test_bad_targets_are_rejected_with_clear_messages(outputs):
    with pytest.raises(InvalidInputError, match="segmentation_targets"):
        SpatialAttentionLoss()(outputs, {"presence_targets": torch.ones(1, 2)})
    with pytest.raises(InvalidInputError, match="does not match"):
        SpatialAttentionLoss()(outputs, {"segmentation_targets": torch.zeros(1, 3, 1, 1, 2)})
    with pytest.raises(InvalidInputError, match="number of structures"):
        SpatialAttentionLoss(structure_names=["liver"])(outputs, {"segmentation_targets": _masks([1, 0], [0, 0])})


def test_gradients_flow_to_every_output_used(outputs):
    leaves = {k: v.clone().requires_grad_(True) for k, v in outputs.items() if k != "presence_probs"}
    leaves["segmentation_probs"] = torch.sigmoid(leaves["segmentation_logits"])
    leaves["presence_probs"] = torch.softmax(leaves["absence_logits"], -1)[..., 1]
    terms = SpatialAttentionLoss()(leaves, {"segmentation_targets": _masks([1, 0], [0, 0])})
    terms["total"].backward()
    for name in ("segmentation_logits", "absence_logits", "attention_maps", "confidence_scores"):
        grad = leaves[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_absent_weight_weights_absent_pairs_in_the_absence_term(outputs):
    masks = torch.zeros(1, 2, 1, 1, 2, dtype=torch.float64)
    masks[0, 0] = 1.0  # structure 0 present, structure 1 absent
    targets = {"segmentation_targets": masks}
    # cross-entropy per pair: present with p=0.75 -> -ln 0.75; absent with p(absent)=0.5 -> ln 2
    weighted = SpatialAttentionLoss(absent_weight=3.0)(outputs, targets)["absence"]
    assert weighted.item() == pytest.approx((-math.log(0.75) + 3 * LN2) / 4)
    plain = SpatialAttentionLoss()(outputs, targets)["absence"]
    assert plain.item() == pytest.approx((-math.log(0.75) + LN2) / 2)


def test_balanced_attention_supervision_weighs_inside_and_outside_equally():
    """One structure of 4 voxels, 1 inside: the voxel mean is dominated by the 3 outside, the balanced one is not."""
    logits = torch.zeros(1, 1, 1, 1, 4, dtype=torch.float64)
    absence_logits = torch.zeros(1, 1, 2, dtype=torch.float64)
    outputs = {
        "segmentation_logits": logits,
        "segmentation_probs": torch.sigmoid(logits),
        "absence_logits": absence_logits,
        "presence_probs": torch.softmax(absence_logits, -1)[..., 1],
        "attention_maps": torch.tensor([0.1, 0.1, 0.1, 0.1], dtype=torch.float64).view(1, 1, 1, 1, 4),
        "confidence_scores": torch.full((1, 1), 0.5, dtype=torch.float64),
    }
    targets = {"segmentation_targets": torch.tensor([1.0, 0, 0, 0], dtype=torch.float64).view(1, 1, 1, 1, 4)}
    inside, outside = -math.log(0.1), -math.log(0.9)
    plain = SpatialAttentionLoss()(outputs, targets)["attention_supervision"]
    assert plain.item() == pytest.approx((inside + 3 * outside) / 4)
    balanced = SpatialAttentionLoss(attention_balanced=True)(outputs, targets)["attention_supervision"]
    assert balanced.item() == pytest.approx((inside + outside) / 2)
    # A structure filling its volume has no outside: the inside mean alone (not half of it).
    full = {"segmentation_targets": torch.ones(1, 1, 1, 1, 4, dtype=torch.float64)}
    assert SpatialAttentionLoss(attention_balanced=True)(outputs, full)[
        "attention_supervision"
    ].item() == pytest.approx(inside)


# ---- DeepSupervisionLoss on a binary head (one logit channel: sigmoid, BCE + Dice) ----------------


def _binary_reference(logits: torch.Tensor, labels: torch.Tensor, smooth: float) -> torch.Tensor:
    """BCE-with-logits (voxel mean) + the foreground's soft Dice loss, averaged over samples with foreground."""
    truth = labels.double()
    p = 1 / (1 + torch.exp(-logits.double()))
    bce = -(truth * torch.log(p) + (1 - truth) * torch.log(1 - p)).mean()
    dice = []
    for sample_p, sample_t in zip(p, truth, strict=True):
        if sample_t.sum() > 0:
            dice.append(1 - (2 * (sample_p * sample_t).sum() + smooth) / (sample_p.sum() + sample_t.sum() + smooth))
    return bce + sum(dice) / len(truth)  # a sample without foreground adds Dice 0


def test_binary_head_loss_is_bce_plus_foreground_dice():
    torch.manual_seed(1)
    logits = torch.randn(3, 1, 4, 5, dtype=torch.float64)
    labels = (torch.rand(3, 4, 5) > 0.6).long()
    labels[2] = 0  # a sample without foreground: Dice 0 there, BCE still counts it
    terms = DeepSupervisionLoss()(logits, labels)
    expected = _binary_reference(logits[:, 0], labels, smooth=1e-5)
    assert terms["main"].item() == pytest.approx(expected.item(), abs=1e-6)  # the loss computes in float32
    assert terms["total"].item() == pytest.approx(expected.item(), abs=1e-6)


def test_binary_head_loss_equals_torch_bce_when_there_is_no_foreground():
    logits = torch.randn(2, 1, 3, 3, 3)
    labels = torch.zeros(2, 3, 3, 3, dtype=torch.long)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits))
    assert DeepSupervisionLoss()(logits, labels)["total"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_binary_head_refuses_a_second_structure():
    labels = torch.tensor([0, 1, 2, 0]).view(1, 1, 4)
    with pytest.raises(InvalidInputError, match="binary head"):
        DeepSupervisionLoss()(torch.zeros(1, 1, 1, 4), labels)
