"""Metrics of every task, with one written convention for absent organs.

Segmentation (per case and structure): Dice, HD95 and NSD through MONAI, in millimetres using the
voxel spacing. The convention, used by losses, metrics and tests alike:

- A structure present in the truth is scored by Dice, HD95 and NSD. If the prediction misses it
  entirely, Dice and NSD are 0 and HD95 is the image diagonal in mm (the worst possible distance),
  so a miss is penalised and never becomes NaN.
- A structure absent from the truth has no Dice (there is nothing to overlap); it is scored by the
  false-positive volume in mL that the prediction paints there (0 when nothing is painted).
- Means are taken over the values that exist (Dice over present structures only); a mean over
  nothing is `None`, never NaN.

Presence detection: accuracy, F1 (of "present"), AUROC and expected calibration error from
presence probabilities. Denoising: PSNR and SSIM on images in [0, 1].
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance, compute_surface_dice

from mednets import anatomy
from mednets.errors import InvalidInputError

__all__ = [
    "StructureScore",
    "dice_per_class",
    "score_structures",
    "mean_defined",
    "presence_metrics",
    "expected_calibration_error",
    "psnr",
    "ssim",
]


@dataclass(frozen=True)
class StructureScore:
    """Scores of one structure in one case (see the module docstring for the convention)."""

    present_in_truth: bool
    present_in_prediction: bool
    dice: float | None
    hd95_mm: float | None
    nsd: float | None
    false_positive_ml: float
    predicted_volume_ml: float

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def dice_per_class(labels: torch.Tensor, truth: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Dice per sample and foreground class of label maps `[B, *S]`: `[B, K]`, NaN where the truth lacks the class.

    The one Dice of mednets: `score_structures` and the tasks' validation metrics both use it.
    """
    dims = tuple(range(1, labels.ndim))
    scores = []
    for c in range(1, num_classes):
        predicted, reference = labels == c, truth == c
        overlap = (predicted & reference).sum(dims).float()
        total = (predicted.sum(dims) + reference.sum(dims)).float()
        dice = 2 * overlap / total.clamp_min(1)
        scores.append(torch.where(reference.any(dim=dims), dice, torch.full_like(dice, float("nan"))))
    return torch.stack(scores, 1)


def _binary(mask: np.ndarray | torch.Tensor) -> torch.Tensor:
    tensor = torch.as_tensor(mask)
    return (tensor > 0).to(torch.uint8)[None, None]  # [1, 1, *S] for MONAI


def _surface_distances(
    predicted: np.ndarray, reference: np.ndarray, spacing_mm: Sequence[float], tolerance_mm: float
) -> tuple[float, float]:
    """HD95 (mm) and NSD at `tolerance_mm` of two non-empty binary masks, through MONAI."""
    with warnings.catch_warnings():  # MONAI warns about its own deprecated internals here
        warnings.simplefilter("ignore", FutureWarning)
        pair = (_binary(predicted), _binary(reference))
        spacing = list(spacing_mm)
        hd95 = compute_hausdorff_distance(*pair, include_background=True, percentile=95, spacing=spacing)
        nsd = compute_surface_dice(*pair, [tolerance_mm], include_background=True, spacing=spacing)
    return float(hd95.item()), float(nsd.item())


def score_structures(
    prediction: np.ndarray | torch.Tensor,
    truth: np.ndarray | torch.Tensor,
    labels: Mapping[str, int],
    spacing_mm: Sequence[float],
    *,
    nsd_tolerance_mm: float = 2.0,
    min_voxels: int = anatomy.MIN_VOXELS,
) -> dict[str, StructureScore]:
    """Score every structure of a label map against the truth.

    Args:
        prediction: predicted label map `[*S]` (integer ids).
        truth: reference label map `[*S]`.
        labels: structure name -> label id (background excluded).
        spacing_mm: voxel size along each axis of the label maps.
        nsd_tolerance_mm: boundary tolerance of the normalised surface distance.
        min_voxels: a structure with fewer truth voxels counts as absent.

    Returns:
        Structure name -> `StructureScore`.
    """
    prediction, truth = np.asarray(prediction), np.asarray(truth)
    if prediction.shape != truth.shape:
        raise InvalidInputError(
            "prediction and truth differ in shape", source="prediction", expected=truth.shape, got=prediction.shape
        )
    if len(spacing_mm) != truth.ndim:
        raise InvalidInputError(
            "spacing has the wrong length", source="spacing_mm", expected=truth.ndim, got=spacing_mm
        )
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    diagonal_mm = float(np.sqrt(sum((n * s) ** 2 for n, s in zip(truth.shape, spacing_mm, strict=True))))
    scores = {}
    for name, label in labels.items():
        predicted, reference = prediction == label, truth == label
        n_predicted, n_reference = int(predicted.sum()), int(reference.sum())
        in_truth, in_prediction = n_reference >= min_voxels, n_predicted > 0
        dice = hd95 = nsd = None
        if in_truth and in_prediction:
            pair = torch.stack([torch.from_numpy(predicted), torch.from_numpy(reference)]).to(torch.uint8)
            dice = float(dice_per_class(pair[:1], pair[1:], 2)[0, 0])
            hd95, nsd = _surface_distances(predicted, reference, spacing_mm, nsd_tolerance_mm)
        elif in_truth:
            dice, hd95, nsd = 0.0, diagonal_mm, 0.0
        scores[name] = StructureScore(
            present_in_truth=in_truth,
            present_in_prediction=in_prediction,
            dice=dice,
            hd95_mm=hd95,
            nsd=nsd,
            false_positive_ml=0.0 if in_truth else n_predicted * voxel_ml,
            predicted_volume_ml=n_predicted * voxel_ml,
        )
    return scores


def mean_defined(values: Iterable[float | None]) -> float | None:
    """Mean of the values that are not None (and not NaN); None when there are none."""
    defined = [v for v in values if v is not None and not math.isnan(v)]
    return sum(defined) / len(defined) if defined else None


def expected_calibration_error(probabilities: Sequence[float], targets: Sequence[bool], bins: int = 10) -> float:
    """ECE of binary probabilities: the bin-weighted gap between confidence and accuracy.

    Confidence is the probability of the predicted class (`max(p, 1 - p)`), binned uniformly over [0.5, 1].
    """
    p = np.asarray(probabilities, dtype=float)
    y = np.asarray(targets, dtype=bool)
    if p.size == 0:
        return 0.0
    predicted = p >= 0.5
    confidence = np.where(predicted, p, 1 - p)
    correct = predicted == y
    edges = np.linspace(0.5, 1.0, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            error += members.mean() * abs(confidence[members].mean() - correct[members].mean())
    return float(error)


def _auroc(probabilities: np.ndarray, targets: np.ndarray) -> float | None:
    """Area under the ROC curve (MONAI's `compute_roc_auc`; ties count half); None without both classes."""
    from monai.metrics import compute_roc_auc

    if targets.all() or not targets.any():
        return None
    return float(compute_roc_auc(torch.as_tensor(probabilities, dtype=torch.float64), torch.as_tensor(targets)))


def presence_metrics(
    probabilities: Sequence[float],
    targets: Sequence[bool],
    threshold: float = 0.5,
    decisions: Sequence[bool] | None = None,
) -> dict[str, float | None]:
    """Accuracy, precision, recall and F1 of "present", AUROC and ECE of presence probabilities.

    The decisions are `probabilities >= threshold` unless given: a predictor's own calls (its
    per-structure thresholds, a structure emptied for being too small) are what accuracy must score.
    Values that are undefined for the data (F1 with no positives at all, AUROC with one class) are None.
    """
    p = np.asarray(probabilities, dtype=float)
    y = np.asarray(targets, dtype=bool)
    predicted = p >= threshold if decisions is None else np.asarray(decisions, dtype=bool)
    if p.shape != y.shape or predicted.shape != y.shape:
        raise InvalidInputError("probabilities, decisions and targets differ in length", source="presence",
                                got=(p.shape, predicted.shape, y.shape))  # fmt: skip
    true_positive = int((predicted & y).sum())
    precision = true_positive / predicted.sum() if predicted.sum() else None
    recall = true_positive / y.sum() if y.sum() else None
    f1 = None
    if precision is not None and recall is not None:
        f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return {
        "accuracy": float((predicted == y).mean()) if p.size else None,
        "precision": None if precision is None else float(precision),
        "recall": None if recall is None else float(recall),
        "f1": None if f1 is None else float(f1),
        "auroc": _auroc(p, y),
        "ece": expected_calibration_error(p, y),
    }


def psnr(prediction: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image of a `[B, C, H, W]` batch (MONAI's `PSNRMetric`); `[B]`.

    Identical images give a finite value (the squared error is floored at 1e-12), not infinity.
    """
    from monai.metrics import PSNRMetric

    # MONAI's PSNR of identical images is infinite; nudging them by sqrt(1e-12) keeps ours finite and equal.
    difference = prediction.float() - target.float()
    floor = (difference.pow(2).flatten(1).mean(1) < 1e-12).view(-1, *[1] * (difference.ndim - 1))
    nudged = torch.where(floor, target.float() + 1e-6, prediction.float())
    return PSNRMetric(max_val=data_range, reduction="none")(nudged, target.float()).flatten()


def ssim(prediction: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Structural similarity per image of a `[B, C, H, W]` batch (MONAI, 11x11 gaussian window); `[B]`."""
    from monai.metrics import SSIMMetric

    metric = SSIMMetric(spatial_dims=2, data_range=data_range, reduction="none")
    return metric(prediction.float(), target.float()).flatten()
