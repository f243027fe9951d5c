"""The model registry: one door, clear errors."""

from __future__ import annotations

import pytest

from mednets.errors import ConfigError, MednetsError, UnknownNameError
from mednets.models import create_model, get_model_spec, list_models


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
