"""SADAAn (seed 000): 3D multi-organ segmentation that detects absent anatomy.

Data flow (the seed's map; `S` structures, grid `D x H x W`, `F` feature channels, 128 in the seed):

```
x [B, 1, D, H, W]
 -> Encoder (U-Net, 16..256 channels, 1x1x1 to F)        features [B, F, D, H, W]
 -> AnatomicalAttentionModule(features)                  attention_maps, feature_responses [B, S, D, H, W],
                                                         alignment_scores [B, S], position_priors [B, S, D, H, W]
 -> AbsenceDetectionHead(features, alignment_scores)     absence_logits [B, S, 2], presence_probs [B, S],
                                                         confidence_scores [B, S]
 -> SegmentationHead(features, attention_maps)           segmentation_logits, segmentation_probs [B, S, D, H, W]
 -> presence gating (eval mode)                          present [B, S]; structures judged absent get
                                                         probability exactly 0
```

Two facts shape the design:

- **The grid is absolute.** The learned position prior is one tensor of `S x D x H x W`, so the model
  sees a whole scan resampled to its grid; another input size is an error, and `resize_grid`
  interpolates the prior when the grid is changed on purpose (e.g. 64³ weights into a 96³ model).
  The seed's constructor argument `spatial_dims` is this grid `(D, H, W)`; it is stored as
  `grid_size`, because `spatial_dims` is the number of spatial axes (3) everywhere else in mednets.
- **The segmentation layer need not replicate the features.** The seed multiplies the refined
  features by each structure's attention map (`[B*S, C, D, H, W]`), runs a 1x1x1 convolution and
  keeps, for structure `s`, output channel `s`. Attention is a per-voxel scale, so
  `W_s . (a_s * f) + b_s = a_s * (W_s . f) + b_s`: one convolution without bias, the scale, then the
  bias gives the same logits at 1/S of the memory (`replicated=True` keeps the seed's formulation
  for comparison).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mednets.errors import ConfigError, InvalidInputError
from mednets.models.base import MednetsModel, check_input
from mednets.models.blocks import DoubleConv, conv, conv_transpose, max_pool, norm
from mednets.models.kernels import global_average_pool
from mednets.models.registry import register_model, register_variant

__all__ = [
    "Encoder",
    "AnatomicalAttentionModule",
    "AbsenceDetectionHead",
    "SegmentationHead",
    "SpatialAttentionMedicalSegmenter",
    "resize_grid",
    "ABSENT_LOGIT",
    "GRID_MULTIPLE",
    "OUTPUT_NAMES",
]

# Logit given to structures judged absent: finite (losses on gated outputs stay finite) and far
# enough below zero that sigmoid is exactly 0 in bf16, fp32 and fp64.
ABSENT_LOGIT = -1.0e4
# Four 2x poolings in the encoder: every grid side must be divisible by 16.
GRID_MULTIPLE = 16
# The keys of `SpatialAttentionMedicalSegmenter.forward`'s output, in order: the seed's nine, then `present`.
OUTPUT_NAMES = (
    "attention_maps",
    "feature_responses",
    "alignment_scores",
    "position_priors",
    "absence_logits",
    "presence_probs",
    "confidence_scores",
    "segmentation_logits",
    "segmentation_probs",
    "present",
)
# The seed's MLP widths (absence classifier 129 -> 64 -> 32 -> 2, confidence head F -> 64 -> S).
_CLASSIFIER_WIDTHS = (64, 32)
_CONFIDENCE_WIDTH = 64


def _check_grid(grid: Sequence[int], source: str) -> tuple[int, int, int]:
    """Validate a `(D, H, W)` grid: three positive sizes divisible by `GRID_MULTIPLE`."""
    grid = tuple(int(size) for size in grid)
    if len(grid) != 3 or any(size <= 0 or size % GRID_MULTIPLE for size in grid):
        raise ConfigError(
            "the grid must be three positive sizes divisible by 16 (the encoder halves it four times)",
            source=source,
            expected="(D, H, W), e.g. (64, 64, 64)",
            got=grid,
        )
    return grid


class Encoder(MednetsModel):
    """U-Net encoder-decoder: `[B, C_in, D, H, W] -> [B, feature_channels, D, H, W]`.

    Five levels (`base_channels * 2**k` channels, 16..256 in the seed), four decoder levels with
    transposed-convolution upsampling and skip concatenation, then a 1x1x1 convolution to
    `feature_channels`. Every convolution has a bias, as in the seed's parameter table.

    Args:
        in_channels: image channels.
        base_channels: width of the first level.
        feature_channels: width of the output features.
        norm_kind: normalisation of every conv layer (`mednets.models.blocks.norm`; seed: "batch").
    """

    spatial_dims = 3

    def __init__(
        self, in_channels: int = 1, base_channels: int = 16, feature_channels: int = 128, norm_kind: str = "batch"
    ) -> None:
        super().__init__()
        c = [base_channels * 2**k for k in range(5)]
        layers = dict(bias=True, norm_kind=norm_kind)
        self.enc1 = DoubleConv(3, in_channels, c[0], **layers)
        self.pool = max_pool(3, 2)
        self.enc2 = DoubleConv(3, c[0], c[1], **layers)
        self.enc3 = DoubleConv(3, c[1], c[2], **layers)
        self.enc4 = DoubleConv(3, c[2], c[3], **layers)
        self.enc5 = DoubleConv(3, c[3], c[4], **layers)
        self.up4 = conv_transpose(3, c[4], c[3])
        self.dec4 = DoubleConv(3, 2 * c[3], c[3], **layers)
        self.up3 = conv_transpose(3, c[3], c[2])
        self.dec3 = DoubleConv(3, 2 * c[2], c[2], **layers)
        self.up2 = conv_transpose(3, c[2], c[1])
        self.dec2 = DoubleConv(3, 2 * c[1], c[1], **layers)
        self.up1 = conv_transpose(3, c[1], c[0])
        self.dec1 = DoubleConv(3, 2 * c[0], c[0], **layers)
        self.final_conv = conv(3, c[0], feature_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.run_block(self.enc1, x)  # [B, c0, D, H, W]
        e2 = self.run_block(self.enc2, self.pool(e1))  # [B, c1, D/2, H/2, W/2]
        e3 = self.run_block(self.enc3, self.pool(e2))  # [B, c2, D/4, ...]
        e4 = self.run_block(self.enc4, self.pool(e3))  # [B, c3, D/8, ...]
        e5 = self.run_block(self.enc5, self.pool(e4))  # [B, c4, D/16, ...]
        d4 = self.run_block(self.dec4, torch.cat([self.up4(e5), e4], dim=1))  # [B, c3, D/8, ...]
        d3 = self.run_block(self.dec3, torch.cat([self.up3(d4), e3], dim=1))  # [B, c2, D/4, ...]
        d2 = self.run_block(self.dec2, torch.cat([self.up2(d3), e2], dim=1))  # [B, c1, D/2, ...]
        d1 = self.run_block(self.dec1, torch.cat([self.up1(d2), e1], dim=1))  # [B, c0, D, H, W]
        return self.final_conv(d1)  # [B, F, D, H, W]


class AnatomicalAttentionModule(MednetsModel):
    """Structure-specific spatial attention from the features and a learned absolute position prior.

    Args:
        in_channels: feature channels `F`.
        num_structures: number of structures `S`.
        spatial_dims: the grid `(D, H, W)` of the position prior (seed name; stored as `grid_size`).
        norm_kind: normalisation after the 3x3x3 convolutions (seed: "batch").
        normalise_alignment: divide each alignment score by the spatial mean of its structure's prior
            probability, so it reads as the share of the expected extent found (about 1 when present,
            0 when absent) instead of a tiny volume fraction (seed: False, the plain spatial mean).

    Attributes:
        position_prior: learned prior logits, `[1, S, D, H, W]` (a 5D tensor, so the module moves to
            `channels_last_3d` with the rest of the model); initialised as `0.1 * randn`.
    """

    spatial_dims = 3

    def __init__(
        self,
        in_channels: int,
        num_structures: int,
        spatial_dims: Sequence[int],
        norm_kind: str = "batch",
        normalise_alignment: bool = False,
    ) -> None:
        super().__init__()
        self.grid_size = _check_grid(spatial_dims, "AnatomicalAttentionModule(spatial_dims)")
        self.num_structures = num_structures
        self.normalise_alignment = normalise_alignment
        self.position_prior = nn.Parameter(0.1 * torch.randn(1, num_structures, *self.grid_size))
        self.attention_conv = nn.Sequential(
            conv(3, in_channels, in_channels // 2, 3),
            norm(norm_kind, 3, in_channels // 2),
            nn.ReLU(inplace=True),
            conv(3, in_channels // 2, num_structures, 1),
            nn.Sigmoid(),
        )
        self.feature_matcher = nn.Sequential(
            conv(3, in_channels, in_channels, 3),
            norm(norm_kind, 3, in_channels),
            nn.ReLU(inplace=True),
            conv(3, in_channels, num_structures, 1),
        )

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Attention maps, feature responses, alignment scores and the prior.

        Args:
            features: `[B, F, D, H, W]`.

        Returns:
            `attention_maps` `[B, S, D, H, W]` (attention x sigmoid(prior), in (0, 1)),
            `feature_responses` `[B, S, D, H, W]` (logits), `alignment_scores` `[B, S]` (spatial mean
            of attention x sigmoid(responses)), `position_priors` `[B, S, D, H, W]` (prior logits,
            an expanded view: no copy per sample).
        """
        batch = features.shape[0]
        attention = self.run_cheap_tail(self.attention_conv, features, tail_start=1)  # [B, S, D, H, W]
        position_priors = self.position_prior.expand(batch, -1, -1, -1, -1)  # [B, S, D, H, W]
        prior_probs = torch.sigmoid(self.position_prior)  # [1, S, D, H, W]
        attention_maps = attention * prior_probs  # [B, S, D, H, W]
        feature_responses = self.run_cheap_tail(self.feature_matcher, features, tail_start=1)  # [B, S, D, H, W]
        alignment_scores = (attention_maps * torch.sigmoid(feature_responses)).mean(dim=(2, 3, 4))  # [B, S]
        if self.normalise_alignment:  # the share of the prior's expected extent that is found: ~1 present, ~0 absent
            alignment_scores = alignment_scores / prior_probs.mean(dim=(2, 3, 4)).clamp_min(1e-6)
        return {
            "attention_maps": attention_maps,
            "feature_responses": feature_responses,
            "alignment_scores": alignment_scores,
            "position_priors": position_priors,
        }


class AbsenceDetectionHead(nn.Module):
    """Presence/absence of each structure from pooled features and its alignment score.

    One MLP per structure (`F + 1 -> 64 -> 32 -> 2`, the extra input being the alignment score) and a
    confidence head (`F -> 64 -> S`, sigmoid) that `SpatialAttentionLoss` trains to predict whether
    the presence decision is right.

    Args:
        num_structures: number of structures `S`.
        feature_dim: feature channels `F`.
        dropout: dropout after the first layer of each classifier (the seed's public code uses 0.2;
            default 0 keeps the forward pass deterministic in training mode).
        painted_evidence: add to each structure's "present" logit a logistic term in the segmentation's
            own evidence, `weight_s * (log(painted_s + eps) - log_threshold_s)`, `painted_s` being the
            structure's soft painted share of the grid (seed: False; 2 parameters per structure).

    Attributes:
        evidence_weight: `[S]`, starts at 1 (an organ painted at its threshold volume is 50/50, each
            factor e above it adds one unit of log-odds).
        evidence_log_threshold: `[S]` log of the painted share at which the term is 0; starts at
            `log(1e-4)`, `SpatialAttentionMedicalSegmenter.init_from_label_frequency` sets a quarter of
            each structure's mean share in the training data.
    """

    def __init__(
        self, num_structures: int, feature_dim: int = 128, dropout: float = 0.0, painted_evidence: bool = False
    ) -> None:
        super().__init__()
        self.num_structures = num_structures
        self.painted_evidence = painted_evidence
        if painted_evidence:
            self.evidence_weight = nn.Parameter(torch.ones(num_structures))
            self.evidence_log_threshold = nn.Parameter(torch.full((num_structures,), math.log(1e-4)))
        hidden, last = _CLASSIFIER_WIDTHS
        self.absence_classifiers = nn.ModuleList(
            nn.Sequential(
                nn.Linear(feature_dim + 1, hidden),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
                nn.Linear(hidden, last),
                nn.ReLU(inplace=True),
                nn.Linear(last, 2),
            )
            for _ in range(num_structures)
        )
        self.confidence_head = nn.Sequential(
            nn.Linear(feature_dim, _CONFIDENCE_WIDTH),
            nn.ReLU(inplace=True),
            nn.Linear(_CONFIDENCE_WIDTH, num_structures),
            nn.Sigmoid(),
        )

    def forward(
        self, features: torch.Tensor, alignment_scores: torch.Tensor, painted: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Absence logits, presence probabilities and confidence.

        Args:
            features: `[B, F, D, H, W]`.
            alignment_scores: `[B, S]`.
            painted: `[B, S]` each structure's soft painted share of the grid (needed with
                `painted_evidence`; gradients are not sent back through it).

        Returns:
            `absence_logits` `[B, S, 2]` (index 1 = present), `presence_probs` `[B, S]`
            (softmax[..., 1]), `confidence_scores` `[B, S]` in (0, 1).
        """
        pooled = global_average_pool(features)  # [B, F]
        scores = alignment_scores.to(pooled.dtype)[..., None]  # [B, S, 1]
        absence_logits = torch.stack(
            [
                classifier(torch.cat([pooled, scores[:, s]], dim=1))
                for s, classifier in enumerate(self.absence_classifiers)
            ],
            dim=1,
        )  # [B, S, 2]
        if self.painted_evidence:
            absence_logits = absence_logits.float() + self._evidence_logits(painted, grid_voxels=features[0, 0].numel())
        return {
            "absence_logits": absence_logits,
            "presence_probs": torch.softmax(absence_logits, dim=-1)[..., 1],
            "confidence_scores": self.confidence_head(pooled),
        }

    def _evidence_logits(self, painted: torch.Tensor | None, grid_voxels: int) -> torch.Tensor:
        """`[B, S, 2]`: 0 for "absent", the painted-volume log-odds for "present" (fp32, detached input)."""
        if painted is None or tuple(painted.shape[1:]) != (self.num_structures,):
            raise InvalidInputError("this head needs each structure's painted share", source="AbsenceDetectionHead",
                                    expected=f"painted [B, {self.num_structures}]",
                                    got=None if painted is None else tuple(painted.shape))  # fmt: skip
        eps = 0.5 / grid_voxels  # half a voxel: an empty structure stays finite
        log_odds = self.evidence_weight * (torch.log(painted.detach().float() + eps) - self.evidence_log_threshold)
        return torch.stack([torch.zeros_like(log_odds), log_odds], dim=-1)


class SegmentationHead(MednetsModel):
    """Attention-modulated segmentation logits: `[B, F, D, H, W]` -> `[B, S, D, H, W]`.

    Feature refinement (two 3x3x3 conv-BN-ReLU layers to `F/2` channels), then one 1x1x1 convolution
    whose output channel `s`, computed on the refined features scaled by attention map `s`, is the
    logit of structure `s`. Because the scale is per voxel, the efficient formulation applies the
    convolution once without bias, multiplies by the attention maps and adds the bias.

    Args:
        in_channels: feature channels `F`.
        num_structures: number of structures `S`.
        replicated: use the seed's formulation instead, which replicates the refined features once
            per structure (`[B*S, F/2, D, H, W]`) and discards all but one output channel of each
            copy. Same logits, S times the memory; kept only so the benchmark can compare.
        norm_kind: normalisation of the refinement layers (seed: "batch").
    """

    spatial_dims = 3

    def __init__(
        self, in_channels: int, num_structures: int, *, replicated: bool = False, norm_kind: str = "batch"
    ) -> None:
        super().__init__()
        self.num_structures = num_structures
        self.replicated = replicated
        refined = in_channels // 2
        # flat layers 0..5, as in the seed
        self.feature_refine = DoubleConv(3, in_channels, refined, bias=True, norm_kind=norm_kind)
        self.segmentation_layer = conv(3, refined, num_structures, 1)

    def forward(self, features: torch.Tensor, attention_maps: torch.Tensor) -> torch.Tensor:
        """Segmentation logits.

        Args:
            features: `[B, F, D, H, W]`.
            attention_maps: `[B, S, D, H, W]`.

        Returns:
            `[B, S, D, H, W]` logits.
        """
        if self.replicated:
            return self._replicated_logits(self.run_block(self.feature_refine, features), attention_maps)
        layer = self.segmentation_layer
        # the second norm-activation and W_s . f are recomputed in backward: the refined map is not stored
        unbiased = self.run_cheap_tail(
            self.feature_refine, features, tail_start=4, projection=layer, projection_bias=False
        )  # [B, S, D, H, W]: W_s . f
        return attention_maps * unbiased + layer.bias.view(1, -1, 1, 1, 1)  # a_s * (W_s . f) + b_s

    def _replicated_logits(self, refined: torch.Tensor, attention_maps: torch.Tensor) -> torch.Tensor:
        batch, channels, *grid = refined.shape
        structures = attention_maps.shape[1]
        attended = refined.unsqueeze(1) * attention_maps.unsqueeze(2)  # [B, S, F/2, D, H, W]
        every = self.segmentation_layer(attended.reshape(batch * structures, channels, *grid))  # [B*S, S, D, H, W]
        every = every.reshape(batch, structures, structures, *grid)  # [B, copy, channel, D, H, W]
        return torch.diagonal(every, dim1=1, dim2=2).movedim(-1, 1)  # copy s, channel s: [B, S, D, H, W]


class SpatialAttentionMedicalSegmenter(MednetsModel):
    """SADAAn: segmentation of `S` structures with presence detection and presence gating.

    At the defaults (5 structures, 64³ grid) the model has the seed's 8,019,230 parameters. The seed's
    signature: `num_structures` is what `create_model` calls `out_channels`.

    Args:
        in_channels: image channels.
        num_structures: number of structures `S` (`out_channels`).
        spatial_dims: the grid `(D, H, W)` the model sees (the seed's name; stored as `grid_size`,
            while the class attribute `spatial_dims` stays the number of axes, 3). Each side must be
            divisible by 16. Inputs must have exactly this size: the position prior is absolute.
        base_channels: width of the encoder's first level (seed: 16).
        feature_channels: width of the encoder's output features `F` (seed: 128).
        presence_threshold: default decision threshold on `presence_probs`, one value or one per
            structure; `forward` can override it per call.
        gating: in eval mode, suppress the segmentation of structures judged absent (default on).
        replicated_head: use the seed's memory-hungry segmentation layer (benchmark comparison only).
        classifier_dropout: dropout inside the absence classifiers.
        norm_kind: normalisation of every 3x3x3 conv layer: "batch" (seed) or "instance" (steadier at
            the small batches a whole-volume model trains with; same parameter count).
        normalise_alignment: see `AnatomicalAttentionModule` (seed: False).
        presence_evidence: add the segmentation's own evidence to each presence decision: a logistic
            term in the log of the structure's soft painted share of the grid (mean of
            `segmentation_probs` before gating, detached; see `AbsenceDetectionHead(painted_evidence)`).
            Globally pooled features barely change when one organ is missing, and the seed's head
            learns one constant per organ (seed: False; adds 2 parameters per structure).
    """

    spatial_dims = 3

    def __init__(
        self,
        in_channels: int = 1,
        num_structures: int = 5,
        spatial_dims: Sequence[int] = (64, 64, 64),
        *,
        base_channels: int = 16,
        feature_channels: int = 128,
        presence_threshold: float | Sequence[float] = 0.5,
        gating: bool = True,
        replicated_head: bool = False,
        classifier_dropout: float = 0.0,
        norm_kind: str = "batch",
        normalise_alignment: bool = False,
        presence_evidence: bool = False,
    ) -> None:
        super().__init__()
        if in_channels < 1 or num_structures < 1:
            raise ConfigError(
                "in_channels and num_structures must be positive",
                source="SpatialAttentionMedicalSegmenter",
                got=f"in_channels={in_channels}, num_structures={num_structures}",
            )
        self.in_channels = in_channels
        self.num_structures = num_structures
        self.grid_size = _check_grid(spatial_dims, "SpatialAttentionMedicalSegmenter(spatial_dims)")
        self.presence_threshold = presence_threshold
        self.gating = gating
        self.encoder = Encoder(in_channels, base_channels, feature_channels, norm_kind)
        self.attention_module = AnatomicalAttentionModule(
            feature_channels, num_structures, self.grid_size, norm_kind, normalise_alignment
        )
        self.presence_evidence = presence_evidence
        self.absence_detector = AbsenceDetectionHead(
            num_structures, feature_channels, classifier_dropout, painted_evidence=presence_evidence
        )
        self.segmentation_head = SegmentationHead(
            feature_channels, num_structures, replicated=replicated_head, norm_kind=norm_kind
        )

    @property
    def out_channels(self) -> int:
        """Alias of the seed's `num_structures`, the name `create_model` uses."""
        return self.num_structures

    def init_from_label_frequency(
        self, frequency: torch.Tensor, floor: float = 0.5, smallest_share: torch.Tensor | None = None
    ) -> None:
        """Start the position prior (and the segmentation bias) from the training data's anatomy.

        The seed starts the prior as noise (`0.1 * randn`: every voxel 50% likely), so the attention
        maps carry no position at first and must learn the atlas through a per-voxel parameter that
        moves about one learning rate per step. Starting from the voxel-wise label frequency of the
        training set (an atlas, `mednets.data.loaders.label_atlas`) gives the model its
        anatomy at step 0; training refines it. The segmentation bias starts at the logit of each
        structure's mean frequency, so the first steps do not spend themselves learning that most
        voxels are background. (A floor of 0.01 on that frequency, RetinaNet's prior, trained worse.)
        With `presence_evidence`, the painted share at which the evidence is neutral starts at a
        quarter of each structure's smallest share in training (the rule of `mednets predict`'s volume
        floor, so a fragment cut by the field of view that the floor keeps is not gated either), or of
        its mean share when the smallest is not given.

        Args:
            frequency: `[S, D, H, W]` share of training cases with structure `s` at each voxel, on
                this model's grid.
            floor: prior probability where the structure was never seen; the prior probability is
                `floor + (1 - floor) * frequency`. A soft prior (0.5) only favours the usual place, so
                anatomy shifted by a truncated field of view is still found; a hard one (0.01) all but
                rules out voxels outside the atlas.
            smallest_share: `[S]` the smallest share of the grid each structure fills in a training case
                where it is present (`mednets.data.loaders.LabelAtlas.smallest_share`); 0 = never seen.
        """
        expected = (self.num_structures, *self.grid_size)
        if tuple(frequency.shape) != expected:
            raise InvalidInputError(
                "label frequency does not match the model's structures and grid",
                source="frequency",
                expected=expected,
                got=tuple(frequency.shape),
            )
        if not 0 < floor < 1:
            raise ConfigError("the prior floor must lie in (0, 1)", source="floor", got=floor)
        if smallest_share is not None and tuple(smallest_share.shape) != (self.num_structures,):
            raise InvalidInputError("one smallest share per structure", source="smallest_share",
                                    expected=(self.num_structures,), got=tuple(smallest_share.shape))  # fmt: skip
        frequency = frequency.detach().float().clamp(0, 1)
        prior_probs = (floor + (1 - floor) * frequency).clamp(max=1 - 1e-3)
        with torch.no_grad():
            prior = self.attention_module.position_prior
            prior.copy_(torch.logit(prior_probs).unsqueeze(0).to(prior))
            mean_share = frequency.flatten(1).mean(1)  # [S]
            bias = self.segmentation_head.segmentation_layer.bias
            bias.copy_(torch.logit(mean_share.clamp(1e-4, 0.5)).to(bias))
            if self.presence_evidence:
                share = mean_share if smallest_share is None else smallest_share.detach().float()
                threshold = self.absence_detector.evidence_log_threshold
                threshold.copy_(torch.log(0.25 * share.clamp_min(1e-6)).to(threshold))

    def set_gradient_checkpointing(self, enabled: bool = True) -> SpatialAttentionMedicalSegmenter:
        """Turn checkpointing on or off here and in every component that checkpoints its stages."""
        for module in self.modules():
            if isinstance(module, MednetsModel):
                module.gradient_checkpointing = bool(enabled)
        return self

    def forward(
        self,
        x: torch.Tensor,
        presence_threshold: float | Sequence[float] | torch.Tensor | None = None,
        gating: bool | None = None,
    ) -> dict[str, torch.Tensor]:
        """Segment, detect presence, and gate absent structures in eval mode.

        Args:
            x: `[B, C_in, D, H, W]` with `(D, H, W) == grid_size`.
            presence_threshold: decision threshold for this call, one value or `[S]` values
                (default: the model's `presence_threshold`).
            gating: override the model's `gating` for this call.

        Returns:
            The seed's nine keys (`attention_maps`, `feature_responses`, `position_priors`,
            `segmentation_logits`, `segmentation_probs` `[B, S, D, H, W]`; `alignment_scores`,
            `presence_probs`, `confidence_scores` `[B, S]`; `absence_logits` `[B, S, 2]`) plus
            `present` (bool `[B, S]`, `presence_probs >= threshold`). In eval mode with gating, a
            structure judged absent has `segmentation_probs` exactly 0 and logits `ABSENT_LOGIT`.
        """
        self._check_grid_input(x)
        features = self.encoder(x)  # [B, F, D, H, W]
        attention = self.attention_module(features)  # attention_maps [B, S, D, H, W], alignment_scores [B, S]
        logits = self.segmentation_head(features, attention["attention_maps"])  # [B, S, D, H, W]
        probs = torch.sigmoid(logits)  # [B, S, D, H, W]
        painted = probs.detach().float().mean(dim=(2, 3, 4)) if self.presence_evidence else None  # [B, S]
        absence = self.absence_detector(features, attention["alignment_scores"], painted)  # presence_probs [B, S]

        threshold = self._threshold(presence_threshold, absence["presence_probs"])
        present = absence["presence_probs"] >= threshold  # [B, S]
        if not self.training and (self.gating if gating is None else gating):
            keep = present[:, :, None, None, None]  # [B, S, 1, 1, 1]
            logits = torch.where(keep, logits, torch.full_like(logits, ABSENT_LOGIT))
            probs = torch.where(keep, probs, torch.zeros_like(probs))
        return {
            **attention,
            **absence,
            "segmentation_logits": logits,
            "segmentation_probs": probs,
            "present": present,
        }

    def _check_grid_input(self, x: torch.Tensor) -> None:
        check_input(x, channels=self.in_channels, spatial_dims=3)
        if tuple(x.shape[2:]) != self.grid_size:
            raise InvalidInputError(
                "spatial size differs from the model's grid: SADAAn's position prior is absolute, so "
                "resample the whole scan to the grid, or change the grid on purpose with resize_grid()",
                source="input",
                expected=f"[B, {self.in_channels}, {', '.join(map(str, self.grid_size))}]",
                got=tuple(x.shape),
            )

    def _threshold(
        self, override: float | Sequence[float] | torch.Tensor | None, presence_probs: torch.Tensor
    ) -> torch.Tensor:
        """The threshold as a tensor broadcastable to `[B, S]`, validated."""
        value = self.presence_threshold if override is None else override
        threshold = torch.as_tensor(value, dtype=torch.float32, device="cpu")  # checked here, also for meta tensors
        if threshold.ndim > 1 or threshold.numel() not in (1, self.num_structures):
            raise ConfigError(
                "presence_threshold must be one value or one per structure",
                source="presence_threshold",
                expected=f"a float or {self.num_structures} floats",
                got=tuple(threshold.shape),
            )
        if bool(((threshold < 0) | (threshold > 1)).any()):
            raise ConfigError("presence_threshold must lie in [0, 1]", source="presence_threshold", got=value)
        return threshold.to(device=presence_probs.device, dtype=presence_probs.dtype)


def resize_grid(model: SpatialAttentionMedicalSegmenter, new_dims: Sequence[int]) -> SpatialAttentionMedicalSegmenter:
    """Change a model's grid on purpose, interpolating its learned position prior (trilinear).

    E.g. load 64³ weights, then `resize_grid(model, (96, 96, 96))`. Every other weight is
    convolutional and independent of the grid. The prior is replaced by a new parameter, so build
    the optimizer after resizing.

    Args:
        model: the model to change in place.
        new_dims: the new grid `(D, H, W)`, each side divisible by 16.

    Returns:
        The same model, now expecting inputs of size `new_dims`.
    """
    grid = _check_grid(new_dims, "resize_grid(new_dims)")
    attention = model.attention_module
    with torch.no_grad():
        prior = attention.position_prior
        resized = F.interpolate(prior.float(), size=grid, mode="trilinear", align_corners=False).to(prior.dtype)
    attention.position_prior = nn.Parameter(resized.contiguous(), requires_grad=prior.requires_grad)
    attention.grid_size = grid
    model.grid_size = grid
    return model


@register_model(
    "sadaan",
    task="absence_segmentation",
    spatial_dims=3,
    in_channels=1,
    out_channels=5,
    input_size=(64, 64, 64),
    output_names=OUTPUT_NAMES,
    size_multiple=GRID_MULTIPLE,
    whole_image=True,
    description="SADAAn (seed 000): 5 structures on a 64³ grid, 16-256 channel encoder, 128 features",
    param_count=8_019_230,
    tiny_overrides={"grid_size": (16, 16, 16), "base_channels": 4, "feature_channels": 8},
    tiny_input_size=(16, 16, 16),
)
def sadaan(
    in_channels: int = 1,
    out_channels: int = 5,
    grid_size: Sequence[int] = (64, 64, 64),
    base_channels: int = 16,
    feature_channels: int = 128,
    presence_threshold: float | Sequence[float] = 0.5,
    gating: bool = True,
    replicated_head: bool = False,
    norm_kind: str = "batch",
    normalise_alignment: bool = False,
    presence_evidence: bool = False,
) -> nn.Module:
    """The seed configuration: `out_channels` is the seed's `num_structures`, `grid_size` its `spatial_dims`."""
    return SpatialAttentionMedicalSegmenter(
        in_channels,
        out_channels,
        grid_size,
        base_channels=base_channels,
        feature_channels=feature_channels,
        presence_threshold=presence_threshold,
        gating=gating,
        replicated_head=replicated_head,
        norm_kind=norm_kind,
        normalise_alignment=normalise_alignment,
        presence_evidence=presence_evidence,
    )


# CPU preset for the 13 organs of BTCV: the seed's architecture at half the encoder width, a quarter of
# the feature width and a 48³ grid, sized so that a bf16 channels_last_3d training step fits a CPU budget
# (`benchmarks/bench_sadaan.py`). 1,437,696 of its parameters are the position prior.
register_variant(
    "sadaan_fast",
    "sadaan",
    description="SADAAn CPU preset: 13 organs, 48³ grid, 8-128 channel encoder, 32 features",
    param_count=2_973_678,
    out_channels=13,
    grid_size=(48, 48, 48),
    base_channels=8,
    feature_channels=32,
)
