"""Metric conventions on hand-made masks, and distances on a known geometric case."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mednets.errors import InvalidInputError
from mednets.metrics import (
    expected_calibration_error,
    mean_defined,
    presence_metrics,
    psnr,
    score_structures,
    ssim,
)

LABELS = {"liver": 1, "spleen": 2}


def sphere(shape: tuple[int, int, int], center: tuple[float, float, float], radius: float) -> np.ndarray:
    grid = np.indices(shape).astype(float)
    distance = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, center, strict=True)))
    return distance <= radius


def test_perfect_prediction_scores_one_and_zero_distance() -> None:
    truth = np.zeros((20, 20, 20), np.uint8)
    truth[5:15, 5:15, 5:15] = 1
    score = score_structures(truth, truth, {"liver": 1}, (1.0, 1.0, 1.0))["liver"]
    assert score.dice == 1.0 and score.hd95_mm == 0.0 and score.nsd == 1.0 and score.false_positive_ml == 0.0


def test_empty_truth_and_prediction_is_no_dice_and_no_false_positive() -> None:
    empty = np.zeros((8, 8, 8), np.uint8)
    score = score_structures(empty, empty, LABELS, (1.0, 1.0, 1.0))["spleen"]
    assert not score.present_in_truth and not score.present_in_prediction
    assert score.dice is None and score.hd95_mm is None and score.false_positive_ml == 0.0


def test_hallucinated_organ_counts_false_positive_millilitres_not_dice() -> None:
    truth = np.zeros((10, 10, 10), np.uint8)
    prediction = truth.copy()
    prediction[:5, :4, :2] = 2  # 40 voxels of 2 x 2 x 2.5 mm = 10 mm^3 each
    score = score_structures(prediction, truth, LABELS, (2.0, 2.0, 2.5))["spleen"]
    assert score.dice is None
    assert score.false_positive_ml == pytest.approx(40 * 10 / 1000)


def test_missed_organ_gets_zero_dice_and_worst_distance() -> None:
    truth = np.zeros((10, 12, 14), np.uint8)
    truth[2:5, 2:5, 2:5] = 1
    score = score_structures(np.zeros_like(truth), truth, LABELS, (1.0, 2.0, 3.0))["liver"]
    assert score.dice == 0.0 and score.nsd == 0.0
    assert score.hd95_mm == pytest.approx(np.sqrt(10**2 + 24**2 + 42**2))


def test_mean_over_present_organs_only_never_nan() -> None:
    truth = np.zeros((10, 10, 10), np.uint8)
    truth[2:6, 2:6, 2:6] = 1
    scores = score_structures(truth, truth, LABELS, (1.0, 1.0, 1.0))
    assert mean_defined(s.dice for s in scores.values()) == 1.0  # the absent spleen does not count
    assert mean_defined([None, float("nan")]) is None


def test_hd95_and_nsd_of_two_offset_spheres() -> None:
    # Identical spheres offset by d: a surface point at angle t to the offset axis lies about d*|cos t| from
    # the other surface, and |cos t| is uniform on a sphere, so HD95 ~ 0.95 d and NSD(tau) ~ tau / d.
    shape, spacing = (48, 48, 48), (2.0, 2.0, 2.0)
    a = sphere(shape, (24, 24, 21), 12)
    b = sphere(shape, (24, 24, 27), 12)  # offset 6 voxels = 12 mm
    prediction, truth = a.astype(np.uint8), b.astype(np.uint8)
    score = score_structures(prediction, truth, {"organ": 1}, spacing, nsd_tolerance_mm=6.0)["organ"]
    assert score.hd95_mm == pytest.approx(0.95 * 12.0, abs=1.0)
    assert score.nsd == pytest.approx(6.0 / 12.0, abs=0.08)


def test_presence_metrics_on_a_known_case() -> None:
    probabilities = [0.9, 0.8, 0.3, 0.6, 0.1]
    targets = [True, True, True, False, False]
    metrics = presence_metrics(probabilities, targets)
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    assert metrics["f1"] == pytest.approx(2 * (2 / 3) * (2 / 3) / (4 / 3))
    assert metrics["auroc"] == pytest.approx(5 / 6)  # 5 of the 6 (positive, negative) pairs are ranked right


def test_presence_metrics_score_given_decisions_and_rank_probabilities() -> None:
    probabilities = [0.9, 0.8, 0.3, 0.6, 0.1]
    targets = [True, True, True, False, False]
    metrics = presence_metrics(probabilities, targets, decisions=[True, True, True, False, False])
    assert metrics["accuracy"] == pytest.approx(1.0) and metrics["f1"] == pytest.approx(1.0)
    assert metrics["auroc"] == pytest.approx(5 / 6)  # still from the probabilities
    with pytest.raises(InvalidInputError, match="differ in length"):
        presence_metrics(probabilities, targets, decisions=[True])


def test_auroc_is_none_with_one_class_and_ece_is_zero_when_calibrated() -> None:
    assert presence_metrics([0.9, 0.8], [True, True])["auroc"] is None
    # 10 predictions at 0.8 of which 8 are right: perfectly calibrated.
    assert expected_calibration_error([0.8] * 10, [True] * 8 + [False] * 2) == pytest.approx(0.0)
    assert expected_calibration_error([1.0] * 4, [False] * 4) == pytest.approx(1.0)


def test_psnr_and_ssim_on_known_images() -> None:
    clean = torch.rand(2, 3, 32, 32)
    noisy = (clean + 0.1).clamp(0, 1)
    mse = (noisy - clean).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(psnr(noisy, clean), 10 * torch.log10(1 / mse))
    assert torch.allclose(ssim(clean, clean), torch.ones(2), atol=1e-5)
    assert (ssim(noisy, clean) < 1).all()


def test_auroc_and_psnr_equal_the_rank_statistic_and_the_plain_formula() -> None:
    """The MONAI implementations mednets uses give the textbook values, ties counted half."""
    rng = np.random.default_rng(0)
    probabilities = rng.choice([0.1, 0.3, 0.5, 0.7, 0.9], size=200)  # many ties
    targets = rng.random(200) < probabilities
    positives, negatives = probabilities[targets], probabilities[~targets]
    rank_statistic = ((positives[:, None] > negatives[None, :]).sum()
                      + 0.5 * (positives[:, None] == negatives[None, :]).sum()) / (positives.size * negatives.size)  # fmt: skip
    assert presence_metrics(probabilities, targets)["auroc"] == pytest.approx(rank_statistic, abs=1e-12)
    torch.manual_seed(0)
    target = torch.rand(3, 3, 16, 16)
    prediction = (target + 0.05 * torch.randn_like(target)).clamp(0, 1)
    plain = 10 * torch.log10(1.0 / (prediction - target).pow(2).flatten(1).mean(1))
    torch.testing.assert_close(psnr(prediction, target), plain, rtol=1e-5, atol=1e-4)
    assert torch.isfinite(psnr(target, target)).all()
