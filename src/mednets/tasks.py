"""Tasks: how a model's outputs become losses, predictions and validation metrics.

The trainer knows no model: it hands a task the model's outputs and the batch. A batch is a dict:

- `image`: `[B, C, *S]` float input;
- `label`: `[B, *S]` integer label map (segmentation tasks; 0 = background, 1..K = structures);
- `presence`: `[B, K]` bool presence targets (absence-aware segmentation; from the dataset, which
  applies `dataset.json` overrides);
- `target`: `[B, C, H, W]` clean image in [0, 1] (denoising).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from mednets.data.transforms import claimed_labels, smallest_claim_first
from mednets.errors import ConfigError, UnknownNameError
from mednets.losses import DeepSupervisionLoss, DenoisingLoss, SpatialAttentionLoss
from mednets.metrics import psnr, ssim

__all__ = ["Task", "SegmentationTask", "AbsenceSegmentationTask", "DenoisingTask", "create_task"]

Batch = Mapping[str, Any]


class Task:
    """Interface of every task; subclasses implement the three methods."""

    name = "task"

    def loss(self, outputs: Any, batch: Batch) -> dict[str, torch.Tensor]:
        """Named loss terms and `total` (a scalar to minimise)."""
        raise NotImplementedError

    def predict(self, outputs: Any) -> dict[str, torch.Tensor]:
        """Predictions from eval-mode outputs (`labels` `[B, *S]`, `presence_probs` `[B, K]`, or `image`)."""
        raise NotImplementedError

    def batch_metrics(self, outputs: Any, batch: Batch) -> dict[str, torch.Tensor]:
        """Validation metrics of a batch, each a `[B]` tensor of per-sample values (NaN = undefined)."""
        raise NotImplementedError


def _dice_per_class(labels: torch.Tensor, truth: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Dice per sample and foreground class of two label maps `[B, *S]`; NaN where the truth lacks the class."""
    dims = tuple(range(1, labels.ndim))
    scores = []
    for c in range(1, num_classes):
        predicted, reference = labels == c, truth == c
        overlap = (predicted & reference).sum(dims).float()
        total = (predicted.sum(dims) + reference.sum(dims)).float()
        dice = 2 * overlap / total.clamp_min(1)
        scores.append(torch.where(reference.any(dim=dims), dice, torch.full_like(dice, float("nan"))))
    return torch.stack(scores, 1)  # [B, K]


def _voxels_per_class(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Voxels of each foreground class per sample of a label map `[B, *S]`: `[B, K]`."""
    return torch.stack([(labels == c).flatten(1).sum(1) for c in range(1, num_classes)], 1)


def _nanmean_rows(values: torch.Tensor) -> torch.Tensor:
    """Mean over axis 1 ignoring NaN; NaN where a row has no value."""
    return values.nanmean(1)


class SegmentationTask(Task):
    """Multi-class segmentation with softmax logits `[B, K+1, *S]` (Dice + cross-entropy).

    Models that return `{"logits", "aux_logits"}` in training get deep supervision; a plain logits
    tensor gets the main term only (`DeepSupervisionLoss` covers both).

    Args:
        num_classes: classes including background.
        deep_supervision_weights: weights of the auxiliary levels, finest first (see `DeepSupervisionLoss`).
    """

    name = "segmentation"

    def __init__(self, num_classes: int, deep_supervision_weights: tuple[float, ...] | None = None) -> None:
        self.num_classes = num_classes
        self.criterion = DeepSupervisionLoss(aux_weights=deep_supervision_weights)

    def loss(self, outputs: Any, batch: Batch) -> dict[str, torch.Tensor]:
        return self.criterion(outputs, batch["label"])

    def predict(self, outputs: Any) -> dict[str, torch.Tensor]:
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs
        labels = logits.argmax(1)
        present = _voxels_per_class(labels, self.num_classes) > 0
        return {"labels": labels, "presence_probs": present.float()}

    def batch_metrics(self, outputs: Any, batch: Batch) -> dict[str, torch.Tensor]:
        predicted = self.predict(outputs)
        truth = batch["label"]
        dice = _dice_per_class(predicted["labels"], truth, self.num_classes)
        metrics = {"dice": _nanmean_rows(dice)}
        if "presence" in batch:
            metrics["presence_accuracy"] = (
                (predicted["presence_probs"].bool() == batch["presence"].bool()).float().mean(1)
            )
            absent = ~batch["presence"].bool()
            painted = _voxels_per_class(predicted["labels"], self.num_classes).float()
            metrics["absent_painted_voxels"] = (painted * absent).sum(1)
        return metrics


class AbsenceSegmentationTask(Task):
    """SADAAn: per-structure sigmoid segmentation plus presence detection (`SpatialAttentionLoss`).

    Label maps are turned into per-structure masks `[B, K, *S]`; presence targets come from the batch.
    A structure claims the voxels where its probability exceeds 0.5; where several do, the one claiming
    the fewest voxels in the scan wins (`mednets.data.transforms.smallest_claim_first`), else background.

    Args:
        num_classes: classes including background (structures = num_classes - 1).
        **loss_options: `SpatialAttentionLoss` options (`weights`, `focal_alpha`, `focal_gamma`).
    """

    name = "absence_segmentation"

    def __init__(self, num_classes: int, **loss_options: Any) -> None:
        self.num_classes = num_classes
        self.criterion = SpatialAttentionLoss(**loss_options)

    def _targets(self, batch: Batch) -> dict[str, torch.Tensor]:
        label = batch["label"].long()
        masks = F.one_hot(label, self.num_classes).movedim(-1, 1)[:, 1:].float()  # [B, K, *S]
        targets = {"segmentation_targets": masks}
        if "presence" in batch:
            targets["presence_targets"] = batch["presence"].float()
        return targets

    def loss(self, outputs: Any, batch: Batch) -> dict[str, torch.Tensor]:
        return self.criterion(outputs, self._targets(batch))

    def predict(self, outputs: Any) -> dict[str, torch.Tensor]:
        claims = outputs["segmentation_probs"].float() > 0.5  # [B, S, *S]; gated in eval mode: absent = no claim
        labels = claimed_labels(claims, smallest_claim_first(claims, claims.ndim - 2))
        return {"labels": labels, "presence_probs": outputs["presence_probs"].float(), "present": outputs["present"]}

    def batch_metrics(self, outputs: Any, batch: Batch) -> dict[str, torch.Tensor]:
        predicted = self.predict(outputs)
        truth = batch["label"]
        presence = batch.get("presence", self._targets(batch)["segmentation_targets"].flatten(2).any(-1)).bool()
        dice = _dice_per_class(predicted["labels"], truth, self.num_classes)
        painted = _voxels_per_class(predicted["labels"], self.num_classes)
        return {
            "dice": _nanmean_rows(dice),
            "presence_accuracy": (predicted["present"].bool() == presence).float().mean(1),
            "absent_painted_voxels": (painted.float() * (~presence)).sum(1),
        }


class DenoisingTask(Task):
    """Image denoising: output and target are images in [0, 1] (`DenoisingLoss`, PSNR/SSIM).

    Args:
        **loss_options: `DenoisingLoss` weights (`mse`, `l1`, `gradient`).
    """

    name = "denoising"

    def __init__(self, **loss_options: Any) -> None:
        self.criterion = DenoisingLoss(**loss_options)

    def loss(self, outputs: Any, batch: Batch) -> dict[str, torch.Tensor]:
        return self.criterion(outputs, batch["target"])

    def predict(self, outputs: Any) -> dict[str, torch.Tensor]:
        return {"image": outputs.clamp(0, 1)}

    def batch_metrics(self, outputs: Any, batch: Batch) -> dict[str, torch.Tensor]:
        restored = outputs.float().clamp(0, 1)
        return {"psnr": psnr(restored, batch["target"]), "ssim": ssim(restored, batch["target"])}


_TASKS: dict[str, Callable[..., Task]] = {
    "segmentation": SegmentationTask,
    "absence_segmentation": AbsenceSegmentationTask,
    "denoising": DenoisingTask,
}


def create_task(name: str, *, num_classes: int | None = None, **options: Any) -> Task:
    """Build the task `name` (a registry entry's `task`); `options` go to its loss.

    Raises:
        UnknownNameError: unknown task or loss option.
    """
    if name not in _TASKS:
        raise UnknownNameError("unknown task", source="task", expected=f"one of {list(_TASKS)}", got=name)
    try:
        if name == "denoising":
            return _TASKS[name](**options)
        if num_classes is None:
            raise ConfigError("segmentation tasks need the number of classes", source="task", expected="num_classes")
        return _TASKS[name](num_classes, **options)
    except TypeError as error:
        raise UnknownNameError(f"invalid loss option ({error})", source="loss", got=sorted(options)) from error
