"""A presence head any softmax segmenter can carry: per-structure present/absent logits.

`with_presence_head(model)` wraps a segmenter (DynUNet, LHA-Net, the 3D UNet: any `MednetsModel`
whose `segmentation_head()` is its final logits layer). The head reads two things the segmenter
already computes and changes neither:

- the decoder's last features `[B, F, *S]` (the input of the final layer, caught by a forward hook),
  pooled globally and, per structure, weighted by that structure's softmax probability;
- the segmentation's own evidence per structure: its soft volume (log voxels) and its peak probability.

A small MLP shared by the structures (with a learned embedding per structure) turns them into
`presence_logits` `[B, K]` (log-odds of "present"). Its inputs are detached: the presence terms of
the loss train the head only, so the segmentation is the same as without the head.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mednets.errors import ConfigError
from mednets.models.base import MednetsModel

__all__ = ["PresenceHead", "PresenceSegmenter", "with_presence_head"]


class PresenceHead(nn.Module):
    """Per-structure presence logits from decoder features and soft segmentation evidence.

    Args:
        feature_channels: channels `F` of the decoder features.
        num_structures: structures `K` (the softmax's classes without background).
        hidden: width of the shared MLP.
        embedding: size of each structure's learned embedding.
    """

    def __init__(self, feature_channels: int, num_structures: int, hidden: int = 32, embedding: int = 8) -> None:
        super().__init__()
        self.num_structures = num_structures
        self.embedding = nn.Parameter(torch.randn(num_structures, embedding) * 0.1)
        self.mlp = nn.Sequential(
            nn.Linear(2 * feature_channels + 2 + embedding, hidden), nn.GELU(), nn.Linear(hidden, 1)
        )  # fmt: skip
        # Start confident that structures are present (most are): the absent calls must be learned.
        nn.init.constant_(self.mlp[-1].bias, 2.0)

    def forward(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """`features` `[B, F, *S_f]` and softmax `logits` `[B, K+1, *S]` -> `presence_logits` `[B, K]` (fp32)."""
        features = features.detach().float()
        probs = torch.softmax(logits.detach().float(), 1)[:, 1:]  # [B, K, *S]
        soft_voxels = probs.flatten(2).sum(-1)  # [B, K]: the segmentation's own volume, in voxels
        peak = probs.flatten(2).amax(-1)  # [B, K]
        if probs.shape[2:] != features.shape[2:]:  # a decoder whose last features are coarser than the logits
            probs = F.adaptive_avg_pool3d(probs, features.shape[2:]) if probs.ndim == 5 else (
                F.adaptive_avg_pool2d(probs, features.shape[2:]))  # fmt: skip
        flat = features.flatten(2)  # [B, F, N]
        weights = probs.flatten(2)  # [B, K, N]
        pooled = torch.einsum("bkn,bfn->bkf", weights, flat) / weights.sum(-1, keepdim=True).clamp_min(1e-3)
        overall = flat.mean(-1)[:, None].expand(-1, self.num_structures, -1)  # [B, K, F]
        evidence = torch.stack([torch.log1p(soft_voxels), peak], -1)  # [B, K, 2]
        embedding = self.embedding[None].expand(features.shape[0], -1, -1)
        return self.mlp(torch.cat([pooled, overall, evidence, embedding], -1)).squeeze(-1)  # [B, K]


class PresenceSegmenter(MednetsModel):
    """A segmenter with a presence head: `{"logits", "presence_logits", ["aux_logits"]}`.

    Args:
        backbone: the segmenter; its `segmentation_head()` is the final logits layer.
        hidden: width of the head's MLP.
    """

    def __init__(self, backbone: MednetsModel, hidden: int = 32) -> None:
        super().__init__()
        self.backbone = backbone
        self.spatial_dims = backbone.spatial_dims
        final = backbone.segmentation_head()
        convolutions = [m for m in final.modules() if isinstance(m, nn.modules.conv._ConvNd)]
        if not convolutions:
            raise ConfigError("the segmenter's final layer has no convolution to read features from",
                              source="presence_head", got=type(final).__name__)  # fmt: skip
        self.presence_head = PresenceHead(convolutions[0].in_channels, convolutions[0].out_channels - 1, hidden)
        self._features: torch.Tensor | None = None
        self._catching = False  # only this module's forward: a checkpoint's recomputation in backward is ignored
        final.register_forward_pre_hook(self._keep_features)

    @property
    def in_channels(self) -> int:
        return self.backbone.in_channels

    @property
    def out_channels(self) -> int:
        return self.backbone.out_channels

    def _keep_features(self, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        if self._catching:
            self._features = inputs[0]

    def set_gradient_checkpointing(self, enabled: bool = True) -> PresenceSegmenter:
        self.backbone.set_gradient_checkpointing(enabled)
        return self

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        """`x` `[B, C, *S]` -> the backbone's outputs as a dict plus `presence_logits` `[B, K]`."""
        self._catching = True
        try:
            outputs = self.backbone(x)
        finally:
            self._catching = False
        outputs = dict(outputs) if isinstance(outputs, dict) else {"logits": outputs}
        features, self._features = self._features, None
        outputs["presence_logits"] = self.presence_head(features, outputs["logits"])
        return outputs


def with_presence_head(model: nn.Module) -> PresenceSegmenter:
    """`model` with a presence head; refuses models without a softmax logits layer (`segmentation_head`).

    Raises:
        ConfigError: the model does not expose its final layer or has a single (binary) output.
    """
    if not isinstance(model, MednetsModel) or not hasattr(model, "segmentation_head"):
        raise ConfigError("this model cannot carry a presence head", source="presence_head",
                          expected="a softmax segmenter (dynunet, lhanet*, unet3d)", got=type(model).__name__)  # fmt: skip
    if model.out_channels < 2:
        raise ConfigError("a presence head needs a softmax head (background and structures)", source="presence_head",
                          expected="out_channels >= 2", got=model.out_channels)  # fmt: skip
    return PresenceSegmenter(model)
