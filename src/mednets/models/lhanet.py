"""LHA-Net (seed 003): a hierarchical-attention 3D segmenter that is actually lightweight.

Data flow (lightweight backbone; input `[B, 1, D, H, W]`, `S = (D, H, W)`)::

    x [B, 1, S]
      -> backbone          f0 [B, c0, S], f1 [B, c1, S/2], f2 [B, c2, S/4], f3 [B, c3, S/8], f4 [B, c4, S/16]
      -> hierarchical PMSA on f1..f4, coarse to fine with top-down flow:
             p4 = PMSA(f4), p3 = PMSA(f3 + up(p4)), p2 = PMSA(f2 + up(p3)), p1 = PMSA(f1 + up(p2))
      -> organ-size-aware decoder, 4 levels coarse to fine (skips p3, p2, p1, f0); each level merges its
             skip, runs three organ-size paths (small/medium/large receptive field) and mixes them with a
             per-voxel softmax router; every level feeds the next, the finest feeds the head
      -> head on the finest level                                  logits [B, num_classes, S]
      -> (training) auxiliary heads on the 3 coarser decoder levels and p4: aux_logits, finest first

The `resnet18_3d` backbone (the "standard" configuration) is one stride coarser (f0 at S/2 ... f4 at
S/32); its logits come from S/2 and are upsampled trilinearly to S.

Three softmax gates, each documented where it lives:
    * PMSA scale gate: per sample, over the 5 scales, `[B, 5]`, sums to 1 per sample.
    * PMSA organ contexts: per voxel, over small/medium/large receptive fields, sums to 1 per voxel.
    * Decoder router: per voxel, over the three size paths, `[B, 3, *S_level]`, sums to 1 per voxel.

What differs from the public version (see `seeds/README.md`): its prediction was a 1x1 convolution
on the coarsest features, so the routed decoder paths and the PMSA levels never reached it; here
every routed level lies on the path to the prediction. Its PMSA ran 7^3 convolutions on 512
channels (280M parameters); here PMSA works on a quarter of each level's width (at most
`pmsa_channels`) and takes large receptive fields from pooling, not from kernel size, so the
lightweight build has about 5.5M parameters in all and the standard one about 37M (33.2M of them
the ResNet3D-18 backbone).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mednets.errors import ConfigError, UnknownNameError
from mednets.models.base import MednetsModel, check_input
from mednets.models.blocks import (
    ConvNormAct,
    DoubleConv,
    Down,
    ResidualBlock,
    activation,
    conv,
    max_pool,
    norm,
)
from mednets.models.kernels import average_pool, global_average_pool
from mednets.models.registry import register_model, register_variant

__all__ = [
    "SCALES",
    "BACKBONES",
    "Backbone",
    "LightweightBackbone",
    "ResNet3D18Backbone",
    "ScaleGate",
    "ReceptiveFieldBranch",
    "OrganSizePaths",
    "PMSA",
    "CrossLevelPMSA",
    "HierarchicalPMSA",
    "SizeAwareDecoderLevel",
    "OrganSizeAwareDecoder",
    "LHANet",
    "resize",
    "scaled_size",
]

SCALES = (0.5, 0.75, 1.0, 1.25, 1.5)
SIZE_RATES = (1, 2, 4)  # pooling rates of the small/medium/large paths: receptive fields ~3, 6, 12 voxels
PMSA_REDUCTION = 4  # PMSA width is channels // 4 (capped by pmsa_channels): narrow where maps are large

BlockRunner = Callable[..., Any]


def _call(block: Callable[..., Any], *inputs: Any) -> Any:
    """The plain block runner; `LHANet` passes its checkpointing `run_block` instead."""
    return block(*inputs)


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resample the spatial axes of `x` `[B, C, *S]` to `size` (linear interpolation); no-op when equal.

    On CPU a bf16/fp16 map is interpolated in float32 and rounded back once: the float32 kernel is
    faster than the bf16 one and rounds once instead of per term.
    """
    size = tuple(int(n) for n in size)
    if tuple(x.shape[2:]) == size:
        return x
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[x.ndim - 2]
    if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
        return F.interpolate(x.float(), size=size, mode=mode, align_corners=False).to(x.dtype)
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


def scaled_size(size: Sequence[int], scale: float) -> tuple[int, ...]:
    """`size` times `scale`, rounded, at least one voxel per axis (sizes traced as 0-d tensors become ints)."""
    return tuple(max(1, round(int(n) * scale)) for n in size)


# --------------------------------------------------------------------------------------------------
# Backbones: five feature maps, finest first
# --------------------------------------------------------------------------------------------------


class Backbone(nn.Module):
    """Five stages run in sequence; each stage's output is one feature map.

    Subclasses fill `stages` (5 modules), `out_channels` and `strides` (one per stage).
    """

    stages: nn.ModuleList
    out_channels: tuple[int, ...]
    strides: tuple[int, ...]

    def forward(self, x: torch.Tensor, run_block: BlockRunner = _call) -> list[torch.Tensor]:
        """`[B, C_in, *S]` -> five maps `[B, out_channels[k], *S / strides[k]]`, finest first."""
        features = []
        for stage in self.stages:
            x = run_block(stage, x)
            features.append(x)
        return features


class LightweightBackbone(Backbone):
    """A narrow UNet-style encoder: DoubleConv at full resolution, then four max-pool + DoubleConv stages.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        channels: widths of the five stages (strides 1, 2, 4, 8, 16).
        norm_kind: see `blocks.norm`.
        act: see `blocks.activation`.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        *,
        norm_kind: str = "instance",
        act: str = "leaky_relu",
    ) -> None:
        super().__init__()
        c = tuple(channels)
        layers = dict(norm_kind=norm_kind, act=act)
        self.stages = nn.ModuleList(
            [DoubleConv(spatial_dims, in_channels, c[0], **layers)]
            + [Down(spatial_dims, c[k - 1], c[k], **layers) for k in range(1, 5)]
        )
        self.out_channels = c
        self.strides = (1, 2, 4, 8, 16)


class ResNet3D18Backbone(Backbone):
    """ResNet-18 with 3D kernels: 7^3 stem at stride 2, max-pool, four stages of two basic blocks.

    Features are the stem (S/2) and the four stages (S/4, S/8, S/16, S/32). The max-pool has
    kernel 2 (ResNet's is 3 with padding 1): the same stride, no overlap.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        channels: widths of stem and stages (ResNet-18: 64, 64, 128, 256, 512).
        norm_kind: see `blocks.norm`.
        act: see `blocks.activation`.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        channels: Sequence[int] = (64, 64, 128, 256, 512),
        *,
        norm_kind: str = "instance",
        act: str = "leaky_relu",
    ) -> None:
        super().__init__()
        c = tuple(channels)
        layers = dict(norm_kind=norm_kind, act=act)

        def basic_block(channels_in: int, channels_out: int, stride: int) -> nn.Module:
            return ResidualBlock(spatial_dims, channels_in, channels_out, stride=stride, bias=False, **layers)

        stem = ConvNormAct(spatial_dims, in_channels, c[0], 7, stride=2, padding=3, bias=False, **layers)
        layer1 = nn.Sequential(max_pool(spatial_dims, 2), basic_block(c[0], c[1], 1), basic_block(c[1], c[1], 1))
        deeper = [nn.Sequential(basic_block(c[k - 1], c[k], 2), basic_block(c[k], c[k], 1)) for k in range(2, 5)]
        self.stages = nn.ModuleList([stem, layer1, *deeper])
        self.out_channels = c
        self.strides = (2, 4, 8, 16, 32)


BACKBONES: dict[str, type[Backbone]] = {"lightweight": LightweightBackbone, "resnet18_3d": ResNet3D18Backbone}
DEFAULT_BACKBONE_CHANNELS = {"lightweight": (16, 32, 64, 128, 256), "resnet18_3d": (64, 64, 128, 256, 512)}


# --------------------------------------------------------------------------------------------------
# PMSA: progressive multi-scale attention
# --------------------------------------------------------------------------------------------------


class ScaleGate(nn.Module):
    """Dynamic scale gating: per-sample softmax weights over the scales from globally pooled features.

    Args:
        channels: channels of the features the gate looks at.
        num_scales: number of scales.
        hidden: width of the hidden layer.
        act: see `blocks.activation`.
    """

    def __init__(self, channels: int, num_scales: int, hidden: int, act: str = "leaky_relu") -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.act = activation(act)
        self.fc2 = nn.Linear(hidden, num_scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, C, *S]` -> scale weights `[B, num_scales]`, summing to 1 per sample."""
        pooled = global_average_pool(x)  # [B, C]
        return torch.softmax(self.fc2(self.act(self.fc1(pooled))), dim=1)


class ReceptiveFieldBranch(nn.Module):
    """A 3x3(x3) conv-act whose receptive field is set by average pooling, not by kernel size.

    At `rate` r the map is average-pooled by r, convolved and upsampled back (linear), so the
    receptive field is about 3r voxels at 1/r^3 of the cost. Pooling rather than dilation: on CPU,
    dilated and depthwise 3D convolutions run on slow reference kernels, forward and backward, while
    a pooled dense convolution is the fast kernel on fewer voxels.
    No normalisation: a pooled map can be a single voxel, which instance norm would zero; the
    branches are residual refinements of a normalised input. `[B, C_in, *S] -> [B, C_out, *S]`.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels.
        rate: pooling factor (1: a plain conv-act).
        act: see `blocks.activation`.
    """

    def __init__(
        self, spatial_dims: int, in_channels: int, out_channels: int, rate: int = 1, *, act: str = "leaky_relu"
    ) -> None:
        super().__init__()
        self.rate = rate
        self.conv = conv(spatial_dims, in_channels, out_channels, 3)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 1:
            return self.act(self.conv(x))
        pooled = average_pool(x, self.rate)  # ceil sizes: a 1-voxel map stays 1 voxel
        return resize(self.act(self.conv(pooled)), x.shape[2:])


class OrganSizePaths(nn.Module):
    """Small/medium/large-organ paths mixed by per-voxel softmax gates (a learned router).

    Each path is a `ReceptiveFieldBranch` with its own rate (receptive fields of about 3, 6 and 12
    voxels for rates 1, 2, 4); a 1x1 router gives per-voxel softmax weights over the paths, which
    sum to 1 at every voxel. Used twice: as PMSA's organ contexts and as each decoder level's
    size-specific paths. `[B, C, *S] -> ([B, C, *S], gates [B, n_paths, *S])`.

    Args:
        spatial_dims: 2 or 3.
        channels: channels in and out.
        rates: pooling rate of each path, small to large organs.
        act: see `blocks.activation`.
    """

    def __init__(
        self, spatial_dims: int, channels: int, rates: Sequence[int] = SIZE_RATES, *, act: str = "leaky_relu"
    ) -> None:
        super().__init__()
        self.paths = nn.ModuleList(ReceptiveFieldBranch(spatial_dims, channels, channels, r, act=act) for r in rates)
        self.router = conv(spatial_dims, channels, len(self.paths), 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gates = torch.softmax(self.router(x), dim=1)  # [B, n_paths, *S], sums to 1 per voxel
        # Mixed in (at least) float32: a bf16 gate broadcast over a bf16 map's channels runs a slow CPU kernel.
        weights = gates.to(torch.promote_types(gates.dtype, torch.float32))
        mixed, dtype = None, gates.dtype
        for p, path in enumerate(self.paths):
            out = path(x)  # [B, C, *S]
            mixed = weights[:, p : p + 1] * out if mixed is None else mixed.addcmul_(weights[:, p : p + 1], out)
            dtype = torch.promote_types(dtype, out.dtype)
        assert mixed is not None
        return mixed.to(dtype), gates  # the dtype the gated sum of the paths would have


class PMSA(nn.Module):
    """Progressive multi-scale attention on one feature level: `[B, C, *S] -> [B, C, *S]`.

    1. Reduce to `A = attention_channels` (1x1 conv-norm-act): all multi-scale work is narrow.
    2. Visit the scales coarse to fine (0.5 ... 1.5 of S). At each scale, resample the reduced map,
       fuse it with the cumulative features of the coarser scales (progressive fusion: 1x1 conv on
       the concatenation) and apply a 3x3(x3) convolution shared by all scales (the same filters
       look at the volume at five zooms), giving this scale's cumulative features.
    3. Resample each scale's cumulative features back to S and average them with the per-sample
       scale gates (softmax over scales, learned from the pooled input: dynamic gating).
    4. Organ contexts: small/medium/large receptive fields mixed per voxel (`OrganSizePaths`).
    5. Project back to C and add to the input.

    Args:
        spatial_dims: 2 or 3.
        channels: channels in and out (`C`).
        attention_channels: width of the multi-scale path (`A`).
        scales: resampling factors; sorted coarse to fine.
        context_rates: pooling rates of the small/medium/large organ contexts.
        norm_kind: see `blocks.norm`.
        act: see `blocks.activation`.
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        attention_channels: int,
        *,
        scales: Sequence[float] = SCALES,
        context_rates: Sequence[int] = SIZE_RATES,
        norm_kind: str = "instance",
        act: str = "leaky_relu",
    ) -> None:
        super().__init__()
        self.scales = tuple(sorted(float(s) for s in scales))
        width = attention_channels
        self.reduce = ConvNormAct(spatial_dims, channels, width, 1, bias=False, norm_kind=norm_kind, act=act)
        self.scale_gate = ScaleGate(channels, len(self.scales), hidden=max(8, channels // 8), act=act)
        # No normalisation inside the pyramid: at scale 0.5 the coarsest map can be a single voxel.
        self.progressive = nn.ModuleList(
            ConvNormAct(spatial_dims, 2 * width, width, 1, norm_kind="none", act=act) for _ in self.scales[1:]
        )
        self.scale_conv = ConvNormAct(spatial_dims, width, width, 3, norm_kind="none", act=act)
        self.organ_context = OrganSizePaths(spatial_dims, width, context_rates, act=act)
        self.expand = conv(spatial_dims, width, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        reduced = self.reduce(x)  # [B, A, *S]
        scale_weights = self.scale_gate(x)  # [B, n_scales], sums to 1 per sample
        broadcast = (1,) * (x.ndim - 2)
        cumulative: torch.Tensor | None = None
        fused = torch.zeros_like(reduced)
        for i, scale in enumerate(self.scales):
            here = resize(reduced, scaled_size(size, scale))  # [B, A, *S*scale]
            if cumulative is not None:
                coarser = resize(cumulative, here.shape[2:])
                here = self.progressive[i - 1](torch.cat([here, coarser], dim=1))
            cumulative = self.scale_conv(here)  # [B, A, *S*scale]: this scale and all coarser ones
            fused = fused + scale_weights[:, i].view(-1, 1, *broadcast) * resize(cumulative, size)
        context, _ = self.organ_context(fused)  # [B, A, *S]
        return x + self.expand(context)  # [B, C, *S]


class CrossLevelPMSA(nn.Module):
    """One level of the hierarchy: add the coarser level's attended features, then PMSA.

    `[B, C, *S]` + coarser `[B, C_coarser, *S']` -> `[B, C, *S]`. The coarser map is projected to
    `C` (1x1 conv-norm-act) at its own resolution, where it is cheap, then upsampled.

    Args:
        spatial_dims: 2 or 3.
        channels: channels of this level.
        coarser_channels: channels of the coarser level (None for the coarsest level).
        attention_channels: width of the PMSA's multi-scale path.
        scales: see `PMSA`.
        context_rates: see `PMSA`.
        norm_kind: see `blocks.norm`.
        act: see `blocks.activation`.
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        coarser_channels: int | None,
        attention_channels: int,
        *,
        scales: Sequence[float] = SCALES,
        context_rates: Sequence[int] = SIZE_RATES,
        norm_kind: str = "instance",
        act: str = "leaky_relu",
    ) -> None:
        super().__init__()
        self.top_down = (
            None
            if coarser_channels is None
            else ConvNormAct(spatial_dims, coarser_channels, channels, 1, bias=False, norm_kind=norm_kind, act=act)
        )
        self.pmsa = PMSA(
            spatial_dims,
            channels,
            attention_channels,
            scales=scales,
            context_rates=context_rates,
            norm_kind=norm_kind,
            act=act,
        )

    def forward(self, x: torch.Tensor, coarser: torch.Tensor | None = None) -> torch.Tensor:
        if self.top_down is not None and coarser is not None:
            x = x + resize(self.top_down(coarser), x.shape[2:])
        return self.pmsa(x)


class HierarchicalPMSA(nn.Module):
    """PMSA over several feature levels with top-down cross-level flow (coarsest first).

    Args:
        spatial_dims: 2 or 3.
        channels: channels of each level, finest first.
        attention_channels: cap on the PMSA width; a level of C channels uses `min(C // 4, attention_channels)`.
        scales: see `PMSA`.
        context_rates: see `PMSA`.
        norm_kind: see `blocks.norm`.
        act: see `blocks.activation`.
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: Sequence[int],
        attention_channels: int,
        *,
        scales: Sequence[float] = SCALES,
        context_rates: Sequence[int] = SIZE_RATES,
        norm_kind: str = "instance",
        act: str = "leaky_relu",
    ) -> None:
        super().__init__()
        c = tuple(channels)
        self.levels = nn.ModuleList(
            CrossLevelPMSA(
                spatial_dims,
                c[k],
                c[k + 1] if k + 1 < len(c) else None,
                max(1, min(c[k] // PMSA_REDUCTION, attention_channels)),
                scales=scales,
                context_rates=context_rates,
                norm_kind=norm_kind,
                act=act,
            )
            for k in range(len(c))
        )

    def forward(self, features: Sequence[torch.Tensor], run_block: BlockRunner = _call) -> list[torch.Tensor]:
        """Feature maps, finest first -> attended maps of the same shapes, finest first."""
        attended: list[torch.Tensor] = [None] * len(features)  # type: ignore[list-item]
        coarser = None
        for k in reversed(range(len(features))):
            coarser = run_block(self.levels[k], features[k], coarser)
            attended[k] = coarser
        return attended


# --------------------------------------------------------------------------------------------------
# Organ-size-aware decoder
# --------------------------------------------------------------------------------------------------


class SizeAwareDecoderLevel(nn.Module):
    """One decoder level: upsample, merge the skip, three organ-size paths mixed by a per-voxel router.

    `[B, C_in, *S']` + skip `[B, C_skip, *S]` -> (`[B, C_out, *S]`, gates `[B, n_paths, *S]`).
    Merging is `act(norm(up(W_in x) + W_skip skip))`: the 1x1 convolution of the concatenation,
    with the coarse input projected before upsampling (linear interpolation and 1x1 convolution
    commute), so the wide coarse map is never held at the fine resolution. The size paths
    (`OrganSizePaths`: small/medium/large receptive fields, softmax gates summing to 1 per voxel)
    refine the merged map residually: the level returns `merged + sum_p gate_p * path_p(merged)`.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the coarser input.
        skip_channels: channels of the skip.
        out_channels: channels of this level.
        path_rates: pooling rate of each size path, small to large.
        norm_kind: see `blocks.norm`.
        act: see `blocks.activation`.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        *,
        path_rates: Sequence[int] = SIZE_RATES,
        norm_kind: str = "instance",
        act: str = "leaky_relu",
    ) -> None:
        super().__init__()
        self.lift = conv(spatial_dims, in_channels, out_channels, 1, bias=False)
        self.skip_proj = conv(spatial_dims, skip_channels, out_channels, 1, bias=False)
        self.merge_norm = norm(norm_kind, spatial_dims, out_channels)
        self.merge_act = activation(act)
        self.size_paths = OrganSizePaths(spatial_dims, out_channels, path_rates, act=act)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lifted = resize(self.lift(x), skip.shape[2:])  # [B, C_out, *S]
        merged = self.merge_act(self.merge_norm(lifted + self.skip_proj(skip)))  # [B, C_out, *S]
        routed, gates = self.size_paths(merged)  # [B, C_out, *S], gates [B, 3, *S] summing to 1 per voxel
        return merged + routed, gates


class OrganSizeAwareDecoder(nn.Module):
    """Decoder levels from the bottleneck to the finest skip; each level's output feeds the next.

    Args:
        spatial_dims: 2 or 3.
        bottleneck_channels: channels of the coarsest (attended) features.
        skip_channels: channels of the skips, coarse to fine (one per level).
        channels: width of each level, coarse to fine.
        path_rates: see `SizeAwareDecoderLevel`.
        norm_kind: see `blocks.norm`.
        act: see `blocks.activation`.
    """

    def __init__(
        self,
        spatial_dims: int,
        bottleneck_channels: int,
        skip_channels: Sequence[int],
        channels: Sequence[int],
        *,
        path_rates: Sequence[int] = SIZE_RATES,
        norm_kind: str = "instance",
        act: str = "leaky_relu",
    ) -> None:
        super().__init__()
        inputs = (bottleneck_channels, *tuple(channels)[:-1])
        self.levels = nn.ModuleList(
            SizeAwareDecoderLevel(
                spatial_dims, c_in, c_skip, c_out, path_rates=path_rates, norm_kind=norm_kind, act=act
            )
            for c_in, c_skip, c_out in zip(inputs, skip_channels, channels, strict=True)
        )

    def forward(
        self, bottleneck: torch.Tensor, skips: Sequence[torch.Tensor], run_block: BlockRunner = _call
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Bottleneck and skips (coarse to fine) -> (level outputs, routing gates), coarse to fine."""
        x = bottleneck
        outputs, gates = [], []
        for level, skip in zip(self.levels, skips, strict=True):
            x, level_gates = run_block(level, x, skip)
            outputs.append(x)
            gates.append(level_gates)
        return outputs, gates


# --------------------------------------------------------------------------------------------------
# LHA-Net
# --------------------------------------------------------------------------------------------------


def _check_widths(name: str, widths: Sequence[int], count: int) -> tuple[int, ...]:
    widths = tuple(widths)
    if len(widths) != count or not all(isinstance(w, int) and w > 0 for w in widths):
        raise ConfigError("needs positive integer widths", source=name, expected=f"{count} of them", got=widths)
    return widths


class LHANet(MednetsModel):
    """LHA-Net: backbone, hierarchical PMSA, organ-size-aware decoder, deep supervision.

    Eval mode (or `deep_supervision=False`): `[B, in_channels, *S] -> [B, num_classes, *S]` logits.
    Train mode: `{"logits": [B, num_classes, *S], "aux_logits": [4 tensors]}`, the auxiliary logits
    of the three coarser decoder levels and of the attended bottleneck, finest first (lightweight:
    S/2, S/4, S/8, S/16; resnet18_3d: S/4, S/8, S/16, S/32). See `mednets.losses.DeepSupervisionLoss`.

    Args:
        in_channels: input channels.
        num_classes: output classes, background + 13 organs by default (`create_model`'s `out_channels`).
        backbone: `lightweight` or `resnet18_3d`.
        backbone_channels: five stage widths (default: the backbone's own).
        pmsa_channels: cap on the width of PMSA's multi-scale path.
        scales: PMSA scales.
        context_rates: pooling rates of PMSA's small/medium/large organ contexts.
        decoder_channels: widths of the four decoder levels, coarse to fine.
        path_rates: pooling rates of the decoder's small/medium/large paths.
        deep_supervision: return auxiliary logits in train mode.
        norm_kind: normalisation; instance norm by default because 3D patches train at batch 1-2.
        act: activation.
        spatial_dims: 3 (2 works too: every block is dimension-generic).
    """

    spatial_dims = 3

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 14,
        *,
        backbone: str = "lightweight",
        backbone_channels: Sequence[int] | None = None,
        pmsa_channels: int = 64,
        scales: Sequence[float] = SCALES,
        context_rates: Sequence[int] = SIZE_RATES,
        decoder_channels: Sequence[int] = (96, 64, 32, 16),
        path_rates: Sequence[int] = SIZE_RATES,
        deep_supervision: bool = True,
        norm_kind: str = "instance",
        act: str = "leaky_relu",
        spatial_dims: int = 3,
    ) -> None:
        super().__init__()
        if backbone not in BACKBONES:
            raise UnknownNameError(
                "unknown backbone", source="backbone", expected=f"one of {list(BACKBONES)}", got=backbone
            )
        if not scales or any(s <= 0 for s in scales):
            raise ConfigError("scales must be positive", source="scales", got=tuple(scales))
        if in_channels < 1 or num_classes < 1 or pmsa_channels < 1:
            raise ConfigError(
                "channels must be positive", source="LHANet", got=(in_channels, num_classes, pmsa_channels)
            )
        c = _check_widths("backbone_channels", backbone_channels or DEFAULT_BACKBONE_CHANNELS[backbone], 5)
        d = _check_widths("decoder_channels", decoder_channels, 4)
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.deep_supervision = deep_supervision
        layers = dict(norm_kind=norm_kind, act=act)

        self.backbone = BACKBONES[backbone](spatial_dims, in_channels, c, **layers)
        self.pmsa = HierarchicalPMSA(
            spatial_dims, c[1:], pmsa_channels, scales=scales, context_rates=context_rates, **layers
        )
        self.decoder = OrganSizeAwareDecoder(
            spatial_dims, c[4], (c[3], c[2], c[1], c[0]), d, path_rates=path_rates, **layers
        )
        self.head = conv(spatial_dims, d[3], num_classes, 1)
        # Finest first: decoder levels 3, 2, 1 (coarse-to-fine indices 2, 1, 0), then the bottleneck.
        self.aux_heads = (
            nn.ModuleList(conv(spatial_dims, width, num_classes, 1) for width in (d[2], d[1], d[0], c[4]))
            if deep_supervision
            else None
        )

    @property
    def out_channels(self) -> int:
        """Alias of `num_classes`, the name `create_model` uses."""
        return self.num_classes

    def segmentation_head(self) -> nn.Module:
        """The final logits layer (a presence head reads its input features)."""
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, Any]:
        check_input(x, channels=self.in_channels, spatial_dims=self.spatial_dims)
        f0, f1, f2, f3, f4 = self.backbone(x, self.run_block)  # [B, c_k, *S / stride_k], finest first
        p1, p2, p3, p4 = self.pmsa([f1, f2, f3, f4], self.run_block)  # same shapes, attended
        levels, _ = self.decoder(p4, [p3, p2, p1, f0], self.run_block)  # 4 x [B, d_k, *S_k], coarse to fine
        logits = resize(self.head(levels[3]), x.shape[2:])  # [B, num_classes, *S]
        if not (self.training and self.deep_supervision):
            return logits
        aux_logits = [head(f) for head, f in zip(self.aux_heads, (levels[2], levels[1], levels[0], p4), strict=True)]
        return {"logits": logits, "aux_logits": aux_logits}  # aux: [B, num_classes, *S_k], finest first

    def parameter_breakdown(self) -> dict[str, int]:
        """Parameters per component; `decoder` includes the output and auxiliary heads."""
        count = lambda module: sum(p.numel() for p in module.parameters()) if module is not None else 0  # noqa: E731
        return {
            "backbone": count(self.backbone),
            "pmsa": count(self.pmsa),
            "decoder": count(self.decoder) + count(self.head) + count(self.aux_heads),
        }


_TINY_LIGHTWEIGHT = {"backbone_channels": (4, 8, 8, 16, 16), "pmsa_channels": 4, "decoder_channels": (8, 8, 4, 4)}
_TINY_STANDARD = {"backbone_channels": (4, 4, 8, 8, 16), "pmsa_channels": 4, "decoder_channels": (8, 8, 4, 4)}


@register_model(
    "lhanet_lightweight",
    task="segmentation",
    spatial_dims=3,
    in_channels=1,
    out_channels=14,
    input_size=(64, 128, 128),
    output_names=("logits",),
    size_multiple=1,
    description="LHA-Net (seed 003), lightweight backbone: 5-scale PMSA on 4 levels, organ-size-aware decoder",
    param_count=5_507_066,
    tiny_overrides=_TINY_LIGHTWEIGHT,
    tiny_input_size=(32, 32, 24),
)
def lhanet_lightweight(
    in_channels: int = 1,
    out_channels: int = 14,
    backbone: str = "lightweight",
    backbone_channels: Sequence[int] = DEFAULT_BACKBONE_CHANNELS["lightweight"],
    pmsa_channels: int = 64,
    decoder_channels: Sequence[int] = (96, 64, 32, 16),
    deep_supervision: bool = True,
    norm_kind: str = "instance",
) -> nn.Module:
    """LHA-Net (`out_channels` is `LHANet`'s `num_classes`); logits in eval mode, any input size."""
    return LHANet(
        in_channels,
        out_channels,
        backbone=backbone,
        backbone_channels=backbone_channels,
        pmsa_channels=pmsa_channels,
        decoder_channels=decoder_channels,
        deep_supervision=deep_supervision,
        norm_kind=norm_kind,
    )


register_variant(
    "lhanet_standard",
    "lhanet_lightweight",
    description="LHA-Net (seed 003), ResNet3D-18 backbone: 5-scale PMSA on 4 levels, organ-size-aware decoder",
    param_count=37_227_570,
    backbone="resnet18_3d",
    backbone_channels=DEFAULT_BACKBONE_CHANNELS["resnet18_3d"],
    decoder_channels=(128, 96, 64, 32),
    tiny_overrides=_TINY_STANDARD,
    tiny_input_size=(40, 33, 36),
)
