"""Losses of every task: each turns a model's outputs and the training targets into named terms and a total.

`SpatialAttentionLoss` is SADAAn's six-term loss (seed 000) for absence-aware segmentation.
`DeepSupervisionLoss` is LHA-Net's Dice + cross-entropy on the main and auxiliary outputs (seed 003).

Conventions shared by the losses here (and by `mednets.metrics`): segmentation and Dice terms count
present structures only, absent structures are penalised by their predicted foreground, and a term
with nothing to count is 0, never NaN. Losses are computed in float32 whatever the model's precision
(bf16 autocast included), so the same loss code serves every precision.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mednets.errors import InvalidInputError, UnknownNameError

__all__ = ["SpatialAttentionLoss", "DeepSupervisionLoss", "DenoisingLoss"]


class SpatialAttentionLoss(nn.Module):
    """SADAAn's loss: six weighted terms for segmentation with absent structures.

    Terms (each averaged over the (sample, structure) pairs it counts, 0 when there are none):

    - `segmentation`: voxel-mean BCE of `segmentation_logits` against the masks, present pairs only.
      With `focal_gamma > 0` it becomes the focal loss
      `alpha_t * (1 - p_t)**gamma * BCE`, with `alpha_t = focal_alpha` on foreground voxels and
      `1 - focal_alpha` on background (`focal_alpha=None`: no class weighting).
    - `dice`: soft Dice loss `1 - (2 |P.T| + eps) / (|P| + |T| + eps)` of `segmentation_probs`,
      present pairs only.
    - `absence`: cross-entropy of `absence_logits` against the presence targets, all pairs (equal to
      the seed's BCE on `presence_probs`, computed from logits for stability). Absent pairs weigh
      `absent_weight` (seed: 1): absences are rare (a few percent of pairs), and unweighted the
      head learns to call everything present.
    - `false_positive_suppression`: voxel-mean of `segmentation_probs`, absent pairs only.
    - `attention_supervision`: voxel-mean BCE of `attention_maps` against the attention targets
      (binarised at 0.5), present pairs only. With `attention_balanced` it is the mean of the BCE
      over the target's voxels and over the rest, each side weighing 1/2: the voxel mean lets a
      structure of a few dozen voxels (an adrenal in 64³) drive its attention map to zero everywhere,
      and as the segmentation logit is scaled by the attention, the structure is then never segmented.
    - `confidence`: BCE of `confidence_scores` against "the presence decision is right"
      (`present == presence_targets`, using the model's `present` output, else `presence_probs >= 0.5`),
      all pairs: the confidence head learns to predict when the absence head is wrong.

    Args:
        structure_names: names of the structures, in channel order; when given, outputs with another
            number of structures are rejected.
        weights: weights of the terms; a partial dict overrides only its keys (defaults:
            `DEFAULT_WEIGHTS`, the seed's).
        focal_alpha: foreground weight of the focal loss, used only when `focal_gamma > 0`.
        focal_gamma: focusing exponent; 0 (default) keeps plain BCE.
        dice_eps: smoothing of the Dice ratio.
        absent_weight: weight of absent pairs in the `absence` term (a weighted mean over pairs).
        attention_balanced: class-balanced attention supervision (seed: False, the voxel mean).
    """

    DEFAULT_WEIGHTS: Mapping[str, float] = {
        "segmentation": 1.0,
        "absence": 2.0,
        "attention_supervision": 0.3,
        "confidence": 0.1,
        "dice": 1.0,
        "false_positive_suppression": 0.5,
    }

    def __init__(
        self,
        structure_names: Sequence[str] | None = None,
        weights: Mapping[str, float] | None = None,
        focal_alpha: float | None = 0.25,
        focal_gamma: float = 0.0,
        dice_eps: float = 1e-6,
        absent_weight: float = 1.0,
        attention_balanced: bool = False,
    ) -> None:
        super().__init__()
        unknown = sorted(set(weights or {}) - set(self.DEFAULT_WEIGHTS))
        if unknown:
            raise UnknownNameError(
                "unknown loss term",
                source="SpatialAttentionLoss(weights)",
                expected=list(self.DEFAULT_WEIGHTS),
                got=unknown,
            )
        self.structure_names = list(structure_names) if structure_names is not None else None
        self.weights = {**self.DEFAULT_WEIGHTS, **{name: float(w) for name, w in (weights or {}).items()}}
        self.focal_alpha = focal_alpha
        self.focal_gamma = float(focal_gamma)
        self.dice_eps = dice_eps
        self.absent_weight = float(absent_weight)
        self.attention_balanced = bool(attention_balanced)

    def forward(
        self, outputs: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Every term and the weighted `total`.

        Args:
            outputs: the model's dict; uses `segmentation_logits`, `segmentation_probs`,
                `attention_maps` `[B, S, D, H, W]`, `absence_logits` `[B, S, 2]`,
                `confidence_scores` `[B, S]` and, if present, `present` `[B, S]`.
            targets: `segmentation_targets` `[B, S, D, H, W]` (binary masks); optional
                `presence_targets` `[B, S]` (default: the mask has a foreground voxel) and
                `attention_targets` `[B, S, D, H, W]` (default: the masks).

        Returns:
            Unweighted scalar terms keyed by name, plus `total` (the weighted sum).
        """
        logits = outputs["segmentation_logits"].float()
        probs = outputs["segmentation_probs"].float()
        masks, presence, attention_targets = self._targets(targets, logits.shape)
        present = presence > 0.5  # [B, S]
        absent = ~present

        terms = {
            "segmentation": _masked_mean(self._voxel_bce(logits, masks), present),
            "dice": _masked_mean(self._dice_loss(probs, masks), present),
            "false_positive_suppression": _masked_mean(probs.flatten(2).mean(-1), absent),
            "absence": self._absence_loss(outputs["absence_logits"].float(), present),
            "attention_supervision": _masked_mean(
                self._attention_bce(outputs["attention_maps"].float(), attention_targets), present
            ),
            "confidence": self._confidence_loss(outputs, present),
        }
        terms["total"] = sum(self.weights[name] * value for name, value in terms.items())
        return terms

    def _targets(
        self, targets: Mapping[str, torch.Tensor], shape: torch.Size
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masks, presence targets and attention targets as float tensors, validated against `shape`."""
        if "segmentation_targets" not in targets:
            raise InvalidInputError(
                "missing segmentation targets",
                source="targets",
                expected="key 'segmentation_targets'",
                got=sorted(targets),
            )
        if self.structure_names is not None and shape[1] != len(self.structure_names):
            raise InvalidInputError(
                "the model's outputs have another number of structures than the loss was built for",
                source="outputs",
                expected=f"{len(self.structure_names)} structures {self.structure_names}",
                got=shape[1],
            )
        masks = targets["segmentation_targets"].float()
        _check_shape(masks, shape, "segmentation_targets")
        presence = targets.get("presence_targets")
        if presence is None:
            presence = (masks > 0.5).flatten(2).any(-1)
        presence = presence.float()
        _check_shape(presence, shape[:2], "presence_targets")
        attention = targets.get("attention_targets")
        attention = masks if attention is None else attention.float()
        _check_shape(attention, shape, "attention_targets")
        return masks, presence, (attention > 0.5).float()

    def _attention_bce(self, attention: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """BCE per pair, `[B, S, *spatial]` -> `[B, S]`: the voxel mean, or balanced between inside and outside."""
        bce = F.binary_cross_entropy(attention, targets, reduction="none")
        if not self.attention_balanced:
            return _voxel_mean(bce)
        inside = targets.flatten(2)
        bce = bce.flatten(2)
        outside = 1 - inside
        mean_inside = (bce * inside).sum(-1) / inside.sum(-1).clamp(min=1)
        mean_outside = (bce * outside).sum(-1) / outside.sum(-1).clamp(min=1)
        parts = (inside.sum(-1) > 0).to(bce.dtype) + (outside.sum(-1) > 0).to(bce.dtype)  # 1 when one side is empty
        return (mean_inside + mean_outside) / parts.clamp(min=1)

    def _voxel_bce(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Voxel-mean BCE (or focal loss) per pair: `[B, S, D, H, W]` -> `[B, S]`."""
        bce = F.binary_cross_entropy_with_logits(logits, masks, reduction="none")
        if self.focal_gamma > 0:
            probs = torch.sigmoid(logits)
            p_true = probs * masks + (1 - probs) * (1 - masks)  # probability given to the right label
            bce = bce * (1 - p_true) ** self.focal_gamma
            if self.focal_alpha is not None:
                bce = bce * (self.focal_alpha * masks + (1 - self.focal_alpha) * (1 - masks))
        return _voxel_mean(bce)

    def _dice_loss(self, probs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Soft Dice loss per pair: `[B, S, D, H, W]` -> `[B, S]`."""
        intersection = (probs * masks).flatten(2).sum(-1)
        total = probs.flatten(2).sum(-1) + masks.flatten(2).sum(-1)
        return 1 - (2 * intersection + self.dice_eps) / (total + self.dice_eps)

    def _absence_loss(self, absence_logits: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Cross-entropy `[B, S, 2]` vs `[B, S]`, absent pairs weighted by `absent_weight` (weighted mean)."""
        per_pair = F.cross_entropy(absence_logits.flatten(0, 1), present.flatten().long(), reduction="none")
        weights = torch.where(present.flatten(), 1.0, self.absent_weight)
        return (per_pair * weights).sum() / weights.sum()

    @staticmethod
    def _confidence_loss(outputs: Mapping[str, torch.Tensor], present: torch.Tensor) -> torch.Tensor:
        """BCE of the confidence scores against the correctness of the presence decision."""
        decision = outputs.get("present")
        if decision is None:
            decision = outputs["presence_probs"] >= 0.5
        correct = (decision.bool() == present).float()  # [B, S]; no gradient flows into the decision
        return F.binary_cross_entropy(outputs["confidence_scores"].float(), correct)


def _voxel_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over the spatial axes: `[B, S, *spatial]` -> `[B, S]`."""
    return values.flatten(2).mean(-1)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` `[B, S]` over the pairs where `mask` is true; 0 (still in the graph) when none."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def _check_shape(tensor: torch.Tensor, shape: Sequence[int], name: str) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise InvalidInputError(
            "shape does not match the model's outputs", source=name, expected=tuple(shape), got=tuple(tensor.shape)
        )


class DeepSupervisionLoss(nn.Module):
    """Dice + cross-entropy on the main logits and on every auxiliary output (deep supervision).

    Level weights: the main logits weigh 1 and auxiliary output k (0 = finest) weighs `0.5**(k + 1)`,
    halving per level as in nnU-Net; the weights are normalised to sum to 1. For LHA-Net's four
    auxiliary outputs: 1, 0.5, 0.25, 0.125, 0.0625, i.e. 0.516, 0.258, 0.129, 0.065, 0.032.

    Targets are label maps of class indices; each auxiliary output gets the target resized to its
    own size by nearest neighbour (`nearest-exact`, centred like the model's downsampling), so
    labels stay labels. Per level the loss is `ce_weight * CE + dice_weight * Dice`, where CE is the
    voxel-mean cross-entropy over all classes and Dice is `1 - (2|P.T| + smooth) / (|P| + |T| + smooth)`
    per sample and class (summed over the voxels), averaged over the classes present in that
    sample's target (background excluded unless `include_background`), then over the samples.
    Classes absent from the target are penalised through CE only, and a sample with no foreground
    has Dice 0, never NaN (the shared convention for absent organs). Being a mean of per-sample
    terms, the loss is the same whether a batch runs in one process or is split across DDP ranks.

    Logits of one channel are a binary head (one structure, labels 0 and 1; MONAI's `out_channels=1`
    with `sigmoid=True`): CE becomes the voxel-mean BCE-with-logits against `label == 1`, and Dice is
    taken on the sigmoid as the two-class probabilities `(1 - p, p)`, so the same counting rules apply
    (background excluded: the foreground's soft Dice, in samples that have foreground).

    Args:
        aux_weights: weights of the auxiliary outputs, finest first (default: `0.5**(k + 1)`); their
            number must match the model's auxiliary outputs.
        ce_weight: weight of the cross-entropy within a level.
        dice_weight: weight of the Dice loss within a level.
        include_background: count class 0 in the Dice average.
        smooth: smoothing of the Dice ratio.
    """

    def __init__(
        self,
        aux_weights: Sequence[float] | None = None,
        *,
        ce_weight: float = 1.0,
        dice_weight: float = 1.0,
        include_background: bool = False,
        smooth: float = 1e-5,
    ) -> None:
        super().__init__()
        self.aux_weights = None if aux_weights is None else [float(w) for w in aux_weights]
        self.ce_weight = float(ce_weight)
        self.dice_weight = float(dice_weight)
        self.include_background = include_background
        self.smooth = smooth

    def level_weights(self, num_aux: int) -> list[float]:
        """Normalised weights of the main output and `num_aux` auxiliary outputs (finest first)."""
        aux = [0.5 ** (k + 1) for k in range(num_aux)] if self.aux_weights is None else self.aux_weights
        if len(aux) != num_aux:
            raise InvalidInputError(
                "the number of auxiliary weights does not match the model's auxiliary outputs",
                source="DeepSupervisionLoss(aux_weights)",
                expected=num_aux,
                got=len(aux),
            )
        weights = [1.0, *aux]
        return [w / sum(weights) for w in weights]

    def forward(self, outputs: torch.Tensor | Mapping[str, object], target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-level terms and the weighted `total`.

        Args:
            outputs: `{"logits": [B, C, *S], "aux_logits": [[B, C, *S_k], ...]}` (train mode) or the
                logits tensor alone (eval mode, or deep supervision off: only the main term); `C = 1`
                is a binary head (sigmoid).
            target: class indices `[B, 1, *S]` or `[B, *S]` (integer, or float holding integers).

        Returns:
            `main`, `aux_0` (finest) ... `aux_{n-1}` (unweighted), and `total` (the weighted sum).
        """
        if isinstance(outputs, torch.Tensor):
            logits, aux_logits = outputs, []
        else:
            logits, aux_logits = outputs["logits"], list(outputs.get("aux_logits") or [])
        labels = self._labels(target, logits)  # [B, 1, *S] int64
        terms = {"main": self._level_loss(logits, labels)}
        for k, aux in enumerate(aux_logits):
            resized = F.interpolate(labels.float(), size=aux.shape[2:], mode="nearest-exact").long()
            terms[f"aux_{k}"] = self._level_loss(aux, resized)
        weights = self.level_weights(len(aux_logits))
        terms["total"] = sum(w * term for w, term in zip(weights, terms.values(), strict=True))
        return terms

    def _labels(self, target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The target as `[B, 1, *S]` int64, validated against the logits `[B, C, *S]`."""
        labels = target if target.ndim == logits.ndim else target.unsqueeze(1)
        if labels.shape[0] != logits.shape[0] or labels.shape[1] != 1 or labels.shape[2:] != logits.shape[2:]:
            raise InvalidInputError(
                "target does not match the logits",
                source="target",
                expected=f"[B, 1, *S] or [B, *S] with B, S of the logits {tuple(logits.shape)}",
                got=tuple(target.shape),
            )
        if labels.is_floating_point() and not torch.equal(labels, labels.round()):
            raise InvalidInputError("target must hold class indices", source="target", got="non-integer values")
        labels = labels.long()
        classes = max(2, logits.shape[1])  # a one-channel (binary) head has classes 0 and 1
        if labels.numel() and (labels.min() < 0 or labels.max() >= classes):
            raise InvalidInputError(
                "target has a class index outside the logits' classes"
                + (" (one logit channel is a binary head: labels 0 and 1)" if logits.shape[1] == 1 else ""),
                source="target",
                expected=f"0 .. {classes - 1}",
                got=f"{int(labels.min())} .. {int(labels.max())}",
            )
        return labels

    def _level_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Dice + CE of one level: logits `[B, C, *S]`, labels `[B, 1, *S]` -> scalar."""
        logits = logits.float()
        if logits.shape[1] == 1:  # binary head: sigmoid of the foreground, background is its complement
            ce = F.binary_cross_entropy_with_logits(logits, (labels == 1).float())
            foreground = torch.sigmoid(logits)
            probs = torch.cat([1 - foreground, foreground], dim=1)
        else:
            ce = F.cross_entropy(logits, labels[:, 0])
            probs = torch.softmax(logits, dim=1)
        onehot = torch.zeros_like(probs).scatter_(1, labels, 1.0)
        axes = tuple(range(2, probs.ndim))  # voxels: one Dice per sample and class
        intersection = (probs * onehot).sum(axes)
        truth = onehot.sum(axes)
        dice = 1 - (2 * intersection + self.smooth) / (probs.sum(axes) + truth + self.smooth)  # [B, C]
        counted = truth > 0
        if not self.include_background:
            counted[:, 0] = False
        # Mean over each sample's present classes, then over samples: a mean of per-sample terms, so
        # DDP (each rank a share of the batch) computes the same loss as one process with the whole batch.
        per_sample = (dice * counted).sum(1) / counted.sum(1).clamp(min=1)
        dice_loss = per_sample.mean()
        return self.ce_weight * ce + self.dice_weight * dice_loss


class DenoisingLoss(nn.Module):
    """The histology autoencoders' loss: `mse * MSE + l1 * L1 + gradient * image-gradient L1`.

    The image-gradient term compares horizontal and vertical finite differences of output and
    target, so edges (nuclei boundaries) are restored rather than blurred. Output and target are
    both images in [0, 1] (the models end in a sigmoid).

    Args:
        mse: weight of the mean squared error (seed: 0.7).
        l1: weight of the mean absolute error (seed: 0.3).
        gradient: weight of the image-gradient loss (seed: 0.1).
    """

    def __init__(self, mse: float = 0.7, l1: float = 0.3, gradient: float = 0.1) -> None:
        super().__init__()
        self.weights = {"mse": float(mse), "l1": float(l1), "gradient": float(gradient)}

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Terms `mse`, `l1`, `gradient` and the weighted `total` for `[B, C, H, W]` images."""
        _check_shape(target, output.shape, "target")
        output, target = output.float(), target.float()
        terms = {
            "mse": F.mse_loss(output, target),
            "l1": F.l1_loss(output, target),
            "gradient": sum(F.l1_loss(output.diff(dim=axis), target.diff(dim=axis)) for axis in range(2, output.ndim)),
        }
        terms["total"] = sum(self.weights[name] * value for name, value in terms.items())
        return terms
