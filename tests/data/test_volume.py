"""The `Volume` type and its geometry (mednets.data.volume)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from mednets.data.volume import Volume
from mednets.errors import InvalidInputError


def test_reoriented_keeps_world_positions(oblique_affine: np.ndarray, make_volume: Callable[..., Volume]) -> None:
    volume = make_volume(oblique_affine)
    lps = volume.reoriented("LPS")
    assert lps.orientation == "LPS"
    # Find a voxel by value and compare its world position before and after.
    d, h, w = 2, 3, 4
    value = volume.array[d, h, w]
    matches = np.argwhere(lps.array == value)
    worlds = [lps.affine @ [m[2], m[1], m[0], 1.0] for m in matches]
    target = volume.affine @ [w, h, d, 1.0]
    assert min(np.abs(world - target).max() for world in worlds) < 1e-6


def test_spacing_is_in_array_order_and_voxel_volume_in_ml(oblique_affine: np.ndarray) -> None:
    volume = Volume(np.zeros((5, 6, 7)), oblique_affine)
    assert volume.spacing == pytest.approx((2.5, 0.9, 0.8))  # (D, H, W) = norms of columns k, j, i
    assert volume.voxel_volume_ml() == pytest.approx(0.8 * 0.9 * 2.5 / 1000)


def test_non_4x4_affine_is_rejected() -> None:
    with pytest.raises(InvalidInputError, match="affine must be 4x4"):
        Volume(np.zeros((2, 2, 2)), np.eye(3))
