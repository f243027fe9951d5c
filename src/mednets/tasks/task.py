"""Tasks: how a model's outputs become losses, predictions and validation metrics.

The trainer knows no model: it hands a task the model's outputs and the batch. A batch is a dict:

- `image`: `[B, C, *S]` float input;
- `label`: `[B, *S]` integer label map (segmentation tasks; 0 = background, 1..K = structures);
- `presence`: `[B, K]` bool presence targets (absence-aware segmentation; from the dataset, which
  applies `dataset.json` overrides);
- `target`: `[B, C, H, W]` clean image in [0, 1] (denoising).

At prediction the engine hands the task the model's outputs over a whole image; the task turns them
into probabilities (`probabilities`, averaged over test-time flips by the engine), decides labels
and presence (`decode`) and writes each structure's sidecar entry (`sidecar_entries`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mednets.errors import ConfigError, UnknownNameError
from mednets.losses import DeepSupervisionLoss, DenoisingLoss, SpatialAttentionLoss
from mednets.metrics import dice_per_class, psnr, ssim
from mednets.tasks.calibration import PresenceCalibration
from mednets.tasks.decoding import claimed_labels, smallest_claim_first

__all__ = [
    "Decoded",
    "Task",
    "SegmentationTask",
    "AbsenceSegmentationTask",
    "DenoisingTask",
    "create_task",
    "task_type",
]

Batch = Mapping[str, Any]


@dataclass
class Decoded:
    """A prediction on the model's grid, ready to go back to the input's grid.

    Attributes:
        scores: `[K+1, *S]` float, background first: the label of a voxel is the largest score, or,
            with `priority`, the claimant of highest priority among the structures beating background.
        priority: `[K]` priority of the structures (`claimed_labels`), or None.
        presence_probs: `[K]` presence probabilities from a presence head, or None.
        confidence: `[K]` confidence of the presence decisions, or None.
        present: `[K]` bool presence decisions, or None (then presence is read from the mask).
        presence_logits: `[K]` the uncalibrated presence log-odds, or None (what calibration is fitted to).
    """

    scores: torch.Tensor
    priority: torch.Tensor | None = None
    presence_probs: torch.Tensor | None = None
    confidence: torch.Tensor | None = None
    present: torch.Tensor | None = None
    presence_logits: torch.Tensor | None = None


class Task:
    """Interface of every task: training (`loss`, `batch_metrics`) and prediction (`probabilities`, `decode`)."""

    name = "task"
    uses_labels = True  # learns from label maps (a dataset folder) rather than from images alone
    out_channels: int | None = None  # model outputs for the dataset's labels; None keeps the model's own
    call_options: Mapping[str, Any] = {}  # keyword arguments of the model's forward at prediction and export
    export_outputs: tuple[str, ...] | None = None  # outputs an exported graph carries; None: all the model's
    calibration: PresenceCalibration | None = None  # fitted on validation after training (`engine.calibration`)

    def loss(self, outputs: Any, batch: Batch) -> dict[str, torch.Tensor]:
        """Named loss terms and `total` (a scalar to minimise)."""
        raise NotImplementedError

    def predict(self, outputs: Any) -> dict[str, torch.Tensor]:
        """Predictions from eval-mode outputs (`labels` `[B, *S]`, `presence_probs` `[B, K]`, or `image`)."""
        raise NotImplementedError

    def batch_metrics(self, outputs: Any, batch: Batch) -> dict[str, torch.Tensor]:
        """Validation metrics of a batch, each a `[B]` tensor of per-sample values (NaN = undefined)."""
        raise NotImplementedError

    def probabilities(self, outputs: Any) -> dict[str, torch.Tensor]:
        """The float outputs to average over test-time flips; spatial ones are `[B, C, *S]`."""
        raise NotImplementedError

    def decode(self, probabilities: Mapping[str, torch.Tensor], *, model: Any, gating: bool) -> Decoded:
        """The decision of one image (batch of one) from its averaged `probabilities`."""
        raise NotImplementedError

    def check_head(self, out_channels: int) -> None:
        """Refuse a model whose `out_channels` outputs do not fit the labels (before any training step).

        Raises:
            ConfigError: naming `model.overrides.out_channels`, with the sizes that fit.
        """
        if self.out_channels is not None and out_channels not in self.head_sizes():
            raise ConfigError("the model's outputs do not fit the dataset's labels", source="model.overrides.out_channels",
                              expected=f"one of {self.head_sizes()} ({self.head_meaning()})", got=out_channels)  # fmt: skip

    def head_sizes(self) -> list[int]:
        """The output channel counts that fit the labels; the first is the default (`out_channels`)."""
        return [] if self.out_channels is None else [self.out_channels]

    def head_meaning(self) -> str:
        """What the accepted head sizes mean, for error messages."""
        return "one output per structure"

    def sidecar_entries(
        self, decoded: Decoded, structures: Mapping[str, int], volumes_ml: Mapping[str, float], *, gating: bool
    ) -> dict[str, dict[str, Any]]:
        """Per structure: presence decision, probability, confidence, volume (mL) and why it is empty."""
        entries = {}
        for index, name in enumerate(structures):
            volume_ml = volumes_ml[name]
            if decoded.presence_probs is None:
                entries[name] = {"present": volume_ml > 0, "probability": float(volume_ml > 0), "confidence": 1.0,
                                 "volume_ml": volume_ml, "presence_source": "mask"}  # fmt: skip
                continue
            entry = {"present": bool(decoded.present[index]), "probability": float(decoded.presence_probs[index]),
                     "confidence": float(decoded.confidence[index]), "volume_ml": volume_ml}  # fmt: skip
            if gating and not entry["present"]:
                entry["why_empty"] = f"presence probability {entry['probability']:.3f} below the threshold"
            entries[name] = entry
        return entries


def presence_decisions(
    logits: torch.Tensor, calibration: PresenceCalibration | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Presence probabilities and decisions `[..., K]` of presence logits: calibrated if a calibration is given."""
    if calibration is None:
        probabilities = torch.sigmoid(logits.float())
        return probabilities, probabilities >= 0.5
    probabilities = calibration.probabilities(logits)
    return probabilities, probabilities >= calibration.threshold


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

    Binary segmentation: with one structure (labels background 0 and one structure 1), a model built
    with `out_channels: 1` (`model.overrides`) has a binary head, logits `[B, 1, *S]`: it trains with
    sigmoid BCE + Dice, and a voxel is the structure where its sigmoid exceeds 0.5 (logit > 0). The
    head's size decides it (the trained weights carry it), so training, validation and prediction
    agree without another switch; for prediction the sigmoid becomes the two scores `(1 - p, p)`.

    A model with a presence head (`create_model(name, presence_head=True)`) adds `presence_logits`
    `[B, K]`: the loss gains the `presence` term (BCE against "the structure has voxels in this
    input", absent pairs weighing `absent_weight`), and prediction calls a structure absent when its
    calibrated presence probability is below the threshold (`calibration`, else 0.5), emptying it
    with gating.

    Args:
        num_classes: classes including background.
        deep_supervision_weights: weights of the auxiliary levels, finest first (see `DeepSupervisionLoss`).
        presence_weight: weight of the presence term (models with a presence head).
        absent_weight: weight of absent pairs in the presence term: absences are a few percent of pairs.
    """

    name = "segmentation"

    def __init__(self, num_classes: int, deep_supervision_weights: tuple[float, ...] | None = None,
                 presence_weight: float = 1.0, absent_weight: float = 3.0) -> None:  # fmt: skip
        self.num_classes = num_classes
        self.out_channels = num_classes
        self.criterion = DeepSupervisionLoss(aux_weights=deep_supervision_weights)
        self.presence_weight = float(presence_weight)
        self.absent_weight = float(absent_weight)

    def head_sizes(self) -> list[int]:
        return [self.num_classes, 1] if self.num_classes == 2 else [self.num_classes]

    def head_meaning(self) -> str:
        binary = "; 1 is a sigmoid head for a dataset of one structure" if self.num_classes == 2 else ""
        return f"one softmax output per label, background included{binary}"

    def probabilities(self, outputs: Any) -> dict[str, torch.Tensor]:
        """`scores` `[B, K+1, *S]`: the softmax, or `(1 - p, p)` of a binary head's sigmoid `p`; and
        `presence_logits` `[B, K]` from a presence head."""
        logits = (outputs["logits"] if isinstance(outputs, Mapping) else outputs).float()
        if logits.shape[1] == 1:
            foreground = torch.sigmoid(logits)
            return {"scores": torch.cat([1 - foreground, foreground], 1)}
        probabilities = {"scores": torch.softmax(logits, 1)}
        if isinstance(outputs, Mapping) and "presence_logits" in outputs:
            probabilities["presence_logits"] = outputs["presence_logits"].float()
        return probabilities

    def decode(self, probabilities: Mapping[str, torch.Tensor], *, model: Any, gating: bool) -> Decoded:
        scores = probabilities["scores"][0]
        if "presence_logits" not in probabilities:
            return Decoded(scores=scores)
        presence, present = presence_decisions(probabilities["presence_logits"][0].cpu(), self.calibration)
        if gating:  # an absent structure scores 0: it never wins a voxel
            scores = scores * torch.cat([torch.ones(1, dtype=torch.bool), present]).to(scores.device).view(
                -1, *[1] * (scores.ndim - 1))  # fmt: skip
        confidence = torch.maximum(presence, 1 - presence)  # the calibrated chance that the decision is right
        return Decoded(scores=scores, presence_probs=presence, confidence=confidence, present=present,
                       presence_logits=probabilities["presence_logits"][0].float().cpu())  # fmt: skip

    def loss(self, outputs: Any, batch: Batch) -> dict[str, torch.Tensor]:
        terms = self.criterion(outputs, batch["label"])
        if isinstance(outputs, Mapping) and "presence_logits" in outputs:
            in_input = _voxels_per_class(batch["label"].long().flatten(1), self.num_classes) > 0  # [B, K]
            logits = outputs["presence_logits"].float()
            weights = torch.where(in_input, 1.0, self.absent_weight)
            bce = F.binary_cross_entropy_with_logits(logits, in_input.float(), reduction="none")
            terms["presence"] = (bce * weights).sum() / weights.sum()
            terms["total"] = terms["total"] + self.presence_weight * terms["presence"]
        return terms

    def predict(self, outputs: Any) -> dict[str, torch.Tensor]:
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs
        if isinstance(outputs, Mapping) and "presence_logits" in outputs:
            presence, present = presence_decisions(outputs["presence_logits"], self.calibration)
            gate = torch.cat([torch.ones_like(present[:, :1]), present], 1)  # [B, K+1], background kept
            logits = logits.float().masked_fill(~gate.view(*gate.shape, *[1] * (logits.ndim - 2)), float("-inf"))
            return {"labels": logits.argmax(1), "presence_probs": presence, "present": present}
        # A binary head paints where its sigmoid exceeds 0.5 (logit > 0), as the argmax of (1 - p, p) in `decode`.
        labels = (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)
        present = _voxels_per_class(labels, self.num_classes) > 0
        return {"labels": labels, "presence_probs": present.float(), "present": present}

    def batch_metrics(self, outputs: Any, batch: Batch) -> dict[str, torch.Tensor]:
        predicted = self.predict(outputs)
        truth = batch["label"]
        dice = dice_per_class(predicted["labels"], truth, self.num_classes)
        metrics = {"dice": _nanmean_rows(dice)}
        if "presence" in batch:
            metrics["presence_accuracy"] = (predicted["present"] == batch["presence"].bool()).float().mean(1)
            absent = ~batch["presence"].bool()
            painted = _voxels_per_class(predicted["labels"], self.num_classes).float()
            metrics["absent_painted_voxels"] = (painted * absent).sum(1)
        return metrics


class AbsenceSegmentationTask(Task):
    """SADAAn: per-structure sigmoid segmentation plus presence detection (`SpatialAttentionLoss`).

    Label maps are turned into per-structure masks `[B, K, *S]`; presence targets come from the batch.
    A structure claims the voxels where its probability exceeds 0.5; where several do, the one claiming
    the fewest voxels in the scan wins (`mednets.tasks.decoding.smallest_claim_first`), else background.

    Args:
        num_classes: classes including background (structures = num_classes - 1).
        **loss_options: `SpatialAttentionLoss` options (`weights`, `focal_alpha`, `focal_gamma`).
    """

    name = "absence_segmentation"

    call_options: Mapping[str, Any] = {
        "gating": False
    }  # gating is decided in `decode`, on the flip-averaged probabilities
    export_outputs: tuple[str, ...] | None = (
        "segmentation_logits",
        "segmentation_probs",
        "presence_probs",
        "confidence_scores",
    )

    def __init__(self, num_classes: int, **loss_options: Any) -> None:
        self.num_classes = num_classes
        self.out_channels = num_classes - 1
        self.criterion = SpatialAttentionLoss(**loss_options)

    def probabilities(self, outputs: Any) -> dict[str, torch.Tensor]:
        keys = ("segmentation_probs", "presence_probs", "confidence_scores")
        absence = outputs["absence_logits"].float()
        return {**{key: outputs[key] for key in keys}, "presence_logits": absence[..., 1] - absence[..., 0]}

    def decode(self, probabilities: Mapping[str, torch.Tensor], *, model: Any, gating: bool) -> Decoded:
        if self.calibration is None:  # the model's own probabilities and threshold
            presence = probabilities["presence_probs"][0].float().cpu()  # [S]
            present = presence >= torch.as_tensor(model.presence_threshold, dtype=torch.float32)
        else:
            presence, present = presence_decisions(probabilities["presence_logits"][0].cpu(), self.calibration)
        probs = probabilities["segmentation_probs"][0].float().cpu()  # [S, *grid]
        if gating:
            probs = probs * present.view(-1, *[1] * (probs.ndim - 1))
        # Background scores 0.5: a structure claims the voxels where it is above one half, and where
        # several do, the one claiming the fewest voxels on the grid wins.
        priority = smallest_claim_first(probs > 0.5, spatial_dims=probs.ndim - 1)
        scores = torch.cat([torch.full_like(probs[:1], 0.5), probs])
        confidence = probabilities["confidence_scores"][0].float().cpu()
        return Decoded(scores=scores, priority=priority, presence_probs=presence, confidence=confidence,
                       present=present, presence_logits=probabilities["presence_logits"][0].float().cpu())  # fmt: skip

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
        dice = dice_per_class(predicted["labels"], truth, self.num_classes)
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
    uses_labels = False

    def __init__(self, **loss_options: Any) -> None:
        self.criterion = DenoisingLoss(**loss_options)

    def loss(self, outputs: Any, batch: Batch) -> dict[str, torch.Tensor]:
        return self.criterion(outputs, batch["target"])

    def predict(self, outputs: Any) -> dict[str, torch.Tensor]:
        return {"image": outputs.clamp(0, 1)}

    def batch_metrics(self, outputs: Any, batch: Batch) -> dict[str, torch.Tensor]:
        restored = outputs.float().clamp(0, 1)
        return {"psnr": psnr(restored, batch["target"]), "ssim": ssim(restored, batch["target"])}


_TASKS: dict[str, type[Task]] = {
    "segmentation": SegmentationTask,
    "absence_segmentation": AbsenceSegmentationTask,
    "denoising": DenoisingTask,
}


def task_type(name: str) -> type[Task]:
    """The class of the task `name` (its class attributes say what it needs without building it)."""
    if name not in _TASKS:
        raise UnknownNameError("unknown task", source="task", expected=f"one of {list(_TASKS)}", got=name)
    return _TASKS[name]


def create_task(name: str, *, num_classes: int | None = None, **options: Any) -> Task:
    """Build the task `name` (a registry entry's `task`); `options` go to its loss.

    Raises:
        UnknownNameError: unknown task or loss option.
    """
    cls = task_type(name)
    try:
        if not cls.uses_labels:
            return cls(**options)
        if num_classes is None:
            raise ConfigError("segmentation tasks need the number of classes", source="task", expected="num_classes")
        return cls(num_classes, **options)
    except TypeError as error:
        raise UnknownNameError(f"invalid loss option ({error})", source="loss", got=sorted(options)) from error
