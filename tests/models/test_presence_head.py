"""The presence head any softmax segmenter can carry (`create_model(name, presence_head=True)`)."""

from __future__ import annotations

import pytest
import torch

from mednets.errors import ConfigError, UnknownNameError
from mednets.models import create_model, get_model_spec

BACKBONES = ["dynunet", "lhanet_lightweight", "unet3d"]


def _tiny(name: str, **options: object) -> torch.nn.Module:
    spec = get_model_spec(name)
    torch.manual_seed(0)
    return create_model(name, out_channels=5, **{**spec.tiny_overrides, **options}), spec.tiny_input_size


@pytest.mark.parametrize("name", BACKBONES)
def test_every_3d_segmenter_gets_presence_logits_per_structure(name: str) -> None:
    model, size = _tiny(name, presence_head=True)
    x = torch.randn(2, 1, *size)
    model.eval()
    with torch.no_grad():
        outputs = model(x)
    assert outputs["logits"].shape == (2, 5, *size)
    assert outputs["presence_logits"].shape == (2, 4)
    assert torch.isfinite(outputs["presence_logits"]).all()


@pytest.mark.parametrize("name", BACKBONES)
def test_the_head_leaves_the_segmentation_unchanged(name: str) -> None:
    plain, size = _tiny(name)
    with_head, _ = _tiny(name, presence_head=True)
    with_head.backbone.load_state_dict(plain.state_dict())
    x = torch.randn(1, 1, *size)
    plain.eval(), with_head.eval()
    with torch.no_grad():
        assert torch.equal(with_head(x)["logits"], plain(x))
    # Its loss trains the head only: no gradient reaches the segmenter.
    with_head.train()
    with_head(x)["presence_logits"].sum().backward()
    assert all(p.grad is None for p in with_head.backbone.parameters())
    assert all(p.grad is not None for p in with_head.presence_head.parameters())


def test_checkpointing_keeps_the_features_of_this_forward_only() -> None:
    model, size = _tiny("dynunet", presence_head=True)
    model.set_gradient_checkpointing(True)
    model.train()
    x = torch.randn(2, 1, *size, requires_grad=True)
    outputs = model(x)
    (outputs["logits"].mean() + outputs["presence_logits"].mean()).backward()  # recomputes the backbone
    assert model._features is None  # the recomputation in backward kept nothing alive
    assert x.grad is not None


def test_models_that_cannot_carry_the_head_say_so() -> None:
    with pytest.raises(UnknownNameError, match="presence_head"):
        create_model("sadaan_fast", presence_head=True)  # SADAAn keeps its own head
    with pytest.raises(ConfigError, match="softmax"):
        create_model("unet3d", out_channels=1, presence_head=True)
