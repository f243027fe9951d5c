"""Contract tests generated from the registry: every model gets them by being registered.

Besides forward/backward, checkpointing, bf16 and channels-last, each model is held to its
`ModelSpec`: output names, the size multiple its inputs need (patch-wise models keep the input's
size), its grid (whole-image models refuse another size), and `in_channels`/`out_channels` through
`create_model`.
"""

from __future__ import annotations

import copy

import pytest
import torch

from mednets.errors import InvalidInputError
from mednets.models import MednetsModel, ModelSpec, create_model, get_model_spec, list_models

MODELS = list_models()


def main_output(outputs: object) -> torch.Tensor:
    """The prediction tensor of any model's outputs (tensor, or the logits or image entry of a dict)."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    for key in ("logits", "segmentation_logits", "denoised"):
        if key in outputs:
            return outputs[key]
    raise AssertionError(f"no main output among {list(outputs)}")


def surrogate_loss(outputs: object) -> torch.Tensor:
    """Mean of every floating output, so that every output (and every parameter) gets a gradient."""
    if isinstance(outputs, torch.Tensor):
        return outputs.mean() if outputs.is_floating_point() else torch.zeros(())
    items = outputs.values() if isinstance(outputs, dict) else outputs
    return sum(surrogate_loss(item) for item in items)


def tiny(
    name: str, dtype: torch.dtype = torch.float32, size: tuple[int, ...] | None = None, **overrides: object
) -> tuple[torch.nn.Module, torch.Tensor]:
    """The registry's tiny build of `name` (with `overrides`) and a batch of 2 inputs of `size`."""
    spec = get_model_spec(name)
    torch.manual_seed(0)
    model = create_model(name, **{**spec.tiny_overrides, **overrides}).to(dtype)
    channels = overrides.get("in_channels", spec.in_channels)
    x = torch.randn(2, channels, *(size or spec.tiny_input_size), dtype=dtype)
    return model, x


def named_outputs(outputs: object, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Outputs by name: a dict as it is, a single tensor under the spec's one output name."""
    if isinstance(outputs, torch.Tensor):
        assert len(spec.output_names) == 1, f"one tensor returned, but the spec names {spec.output_names}"
        return {spec.output_names[0]: outputs}
    return dict(outputs)


@pytest.mark.parametrize("name", MODELS)
def test_parameter_count_equals_registry_figure(name: str) -> None:
    spec = get_model_spec(name)
    if spec.param_count is None:
        pytest.skip(f"{name} records no parameter count")
    model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == spec.param_count


@pytest.mark.parametrize("name", MODELS)
def test_forward_backward_gives_shapes_and_finite_gradients(name: str) -> None:
    spec = get_model_spec(name)
    model, x = tiny(name)
    model.train()
    outputs = model(x)
    assert tuple(main_output(outputs).shape) == (2, spec.out_channels, *spec.tiny_input_size)
    surrogate_loss(outputs).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad[:5]}"


def _saved_tensor_bytes(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, object]:
    saved = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outputs = model(x)
    return saved, outputs


@pytest.mark.parametrize("name", MODELS)
def test_checkpointing_gives_equal_gradients_and_saves_memory(name: str) -> None:
    model, x = tiny(name, torch.float64)
    assert isinstance(model, MednetsModel)
    model.train()
    reference = copy.deepcopy(model)
    checkpointed = copy.deepcopy(model).set_gradient_checkpointing(True)

    saved_plain, out_plain = _saved_tensor_bytes(reference, x)
    saved_ckpt, out_ckpt = _saved_tensor_bytes(checkpointed, x)
    surrogate_loss(out_plain).backward()
    surrogate_loss(out_ckpt).backward()

    assert saved_ckpt < saved_plain, "checkpointing stored as many activations as the plain forward"
    for (n, p), q in zip(reference.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-8, msg=f"gradient of {n} differs")
    for (n, b), c in zip(reference.named_buffers(), checkpointed.buffers(), strict=True):
        torch.testing.assert_close(c, b, rtol=0, atol=1e-12, msg=f"buffer {n} changed by recomputation")


@pytest.mark.parametrize("name", MODELS)
def test_bf16_autocast_stays_close_to_fp32(name: str) -> None:
    # Train mode: eval-mode presence gating could flip a borderline structure between precisions.
    model, x = tiny(name)
    model.train()
    with torch.no_grad():
        reference = main_output(model(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = main_output(model(x)).float()
    assert torch.isfinite(low).all()
    relative_rms = (low - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt().clamp_min(1e-6)
    assert relative_rms < 0.05


@pytest.mark.parametrize("name", MODELS)
def test_channels_last_gives_the_same_output(name: str) -> None:
    model, x = tiny(name)
    model.eval()
    with torch.no_grad():
        reference = main_output(model(x))
        model.to_channels_last()
        fast = main_output(
            model(x.contiguous(memory_format=torch.channels_last_3d if x.ndim == 5 else torch.channels_last))
        )
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_wrong_rank_is_rejected_with_the_expected_layout(name: str) -> None:
    model, x = tiny(name)
    with pytest.raises(InvalidInputError, match="axes"):
        model(x[:, :, 0])


@pytest.mark.parametrize("name", MODELS)
def test_eval_outputs_are_the_registry_output_names(name: str) -> None:
    spec = get_model_spec(name)
    model, x = tiny(name)
    with torch.no_grad():
        outputs = named_outputs(model.eval()(x), spec)
    assert tuple(outputs) == spec.output_names


def _other_valid_size(spec: ModelSpec) -> tuple[int, ...]:
    """The next sides up from the tiny size that are multiples of the size multiple."""
    step = spec.size_multiple
    return tuple((side // step + 1) * step for side in spec.tiny_input_size)


@pytest.mark.parametrize("name", MODELS)
def test_input_sides_multiple_of_the_size_multiple_keep_their_size(name: str) -> None:
    spec = get_model_spec(name)
    if spec.whole_image:
        pytest.skip(f"{name} sees a fixed grid: see the grid test")
    size = _other_valid_size(spec)
    assert size != spec.tiny_input_size and all(side % spec.size_multiple == 0 for side in size)
    model, x = tiny(name, size=size)
    with torch.no_grad():
        outputs = named_outputs(model.eval()(x), spec)
    assert tuple(outputs[spec.output_names[0]].shape) == (2, spec.out_channels, *size)


@pytest.mark.parametrize("name", MODELS)
def test_whole_image_models_take_their_grid_and_refuse_other_sizes(name: str) -> None:
    spec = get_model_spec(name)
    if not spec.whole_image:
        pytest.skip(f"{name} is patch-wise")
    assert spec.grid == spec.input_size and all(side % spec.size_multiple == 0 for side in spec.grid)
    model, x = tiny(name)
    with torch.no_grad():
        outputs = main_output(model.eval()(x))
    assert tuple(outputs.shape) == (2, spec.out_channels, *spec.tiny_input_size)
    other = torch.randn(2, spec.in_channels, *_other_valid_size(spec))
    with pytest.raises(InvalidInputError, match="grid"):
        model(other)


@pytest.mark.parametrize("name", MODELS)
def test_in_and_out_channels_through_create_model(name: str) -> None:
    spec = get_model_spec(name)
    assert {"in_channels", "out_channels"} <= set(spec.options)
    model, x = tiny(name, in_channels=2, out_channels=3)
    assert x.shape[1] == 2
    with torch.no_grad():
        outputs = named_outputs(model.eval()(x), spec)
    assert tuple(main_output(outputs).shape) == (2, 3, *spec.tiny_input_size)
