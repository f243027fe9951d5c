"""The model registry: one door, clear errors."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import torch

from mednets.errors import ConfigError, MednetsError, UnknownNameError
from mednets.models import create_model, get_model_spec, list_models
from mednets.models.registry import register_variant, unregister_model

MEASUREMENT = re.compile(r"\d\s*(ms|s|MB|GB|dB|%)\b")


def test_seed_models_are_registered_with_their_facts() -> None:
    assert {"unet", "unet3d", "histo_autoencoder", "deep_histo_autoencoder"} <= set(list_models())
    spec = get_model_spec("unet")
    assert (spec.task, spec.spatial_dims, spec.in_channels, spec.out_channels) == ("segmentation", 2, 3, 1)
    assert spec.description


def test_list_models_filters_with_a_pattern() -> None:
    assert list_models("*histo*") == ["deep_histo_autoencoder", "histo_autoencoder"]


def test_unknown_model_lists_the_valid_names() -> None:
    with pytest.raises(UnknownNameError) as caught:
        create_model("unet_2000")
    message = str(caught.value)
    assert "unknown model" in message and "'unet_2000'" in message and "histo_autoencoder" in message
    assert isinstance(caught.value, MednetsError)


def test_unknown_override_lists_the_valid_options() -> None:
    with pytest.raises(ConfigError, match=r"unknown override.*bilinear.*got \['depth'\]"):
        create_model("unet", depth=7)


def test_every_model_states_its_contract() -> None:
    for name in list_models():
        spec = get_model_spec(name)
        assert spec.output_names and spec.size_multiple >= 1, name
        assert {"in_channels", "out_channels"} <= set(spec.options), name
        assert (spec.grid == spec.input_size) if spec.whole_image else spec.grid is None, name
        assert not MEASUREMENT.search(spec.description), f"{name}: measurements belong in benchmarks/RESULTS.md"
    assert get_model_spec("sadaan").whole_image and get_model_spec("sadaan").output_names[-1] == "present"
    assert get_model_spec("unet").output_names == ("logits",) and get_model_spec("unet").size_multiple == 1
    assert get_model_spec("histo_autoencoder").output_names == ("denoised",)
    assert get_model_spec("histo_autoencoder").size_multiple == 16


def test_presets_are_variants_of_their_base_model() -> None:
    assert get_model_spec("unet3d").base == "unet"
    assert get_model_spec("sadaan_fast").base == "sadaan"
    assert get_model_spec("lhanet_standard").base == "lhanet_lightweight"
    fast = get_model_spec("sadaan_fast")
    assert (fast.out_channels, fast.input_size, fast.defaults["grid_size"]) == (13, (48, 48, 48), (48, 48, 48))


@pytest.fixture
def tiny_unet_variant() -> Iterator[str]:
    """A variant of `unet` registered for one test, then removed so that other tests never see it."""
    name = "test_tiny_unet3d"
    register_variant(
        name,
        "unet",
        description="a tiny 3D UNet for this test",
        spatial_dims=3,
        in_channels=2,
        out_channels=4,
        base_channels=2,
        norm="instance",
        input_size=(16, 16, 16),
        tiny_input_size=(16, 20, 24),
    )
    try:
        yield name
    finally:
        unregister_model(name)
    assert name not in list_models()


def test_register_variant_changes_builder_defaults_and_the_spec(tiny_unet_variant: str) -> None:
    spec = get_model_spec(tiny_unet_variant)
    assert tiny_unet_variant in list_models("test_*")
    assert (spec.base, spec.task, spec.spatial_dims, spec.in_channels, spec.out_channels) == (
        "unet",
        "segmentation",
        3,
        2,
        4,
    )
    assert spec.input_size == (16, 16, 16) and spec.tiny_input_size == (16, 20, 24)
    assert spec.output_names == get_model_spec("unet").output_names and spec.param_count is None
    assert spec.defaults["base_channels"] == 2 and spec.defaults["norm"] == "instance"
    model = create_model(tiny_unet_variant).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 2, 16, 20, 24)).shape == (2, 4, 16, 20, 24)
    wider = create_model(tiny_unet_variant, base_channels=4, out_channels=1)  # overrides still win
    assert wider.inc[0].out_channels == 4 and wider.outc.out_channels == 1
    assert get_model_spec("unet").defaults["base_channels"] == 64  # the base is untouched


def test_register_variant_refuses_unknown_defaults_and_taken_names() -> None:
    with pytest.raises(UnknownNameError, match="depth"):
        register_variant("test_bad_variant", "unet", description="x", depth=3)
    with pytest.raises(ConfigError, match="registered twice"):
        register_variant("unet3d", "unet", description="x")
    with pytest.raises(ConfigError, match="spatial"):
        register_variant("test_bad_variant", "unet", description="x", input_size=(8, 8, 8))  # 2D model, 3D size
    assert "test_bad_variant" not in list_models()


def test_create_model_accepts_the_seed_names_for_one_release() -> None:
    with pytest.warns(FutureWarning) as caught:
        model = create_model("unet", n_channels=2, n_classes=3, base_channels=2)
    assert [str(w.message) for w in caught] == [
        "create_model option 'n_channels' is deprecated; use 'in_channels'",
        "create_model option 'n_classes' is deprecated; use 'out_channels'",
    ]
    assert (model.in_channels, model.out_channels) == (2, 3)
    with pytest.warns(FutureWarning, match="num_structures"):
        sadaan = create_model("sadaan", num_structures=2, **get_model_spec("sadaan").tiny_overrides)
    assert sadaan.num_structures == 2
    with pytest.raises(ConfigError, match="same option"):
        create_model("unet", n_classes=3, out_channels=3)
