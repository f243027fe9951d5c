"""MONAI pipelines: loading with normalisation, resampling, presence-aware crops, augmentation; decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mednets.data.transforms import RandOrganRemovald, allowed_flip_axes, augmentation
from mednets.errors import ConfigError
from mednets.tasks.decoding import claimed_labels, labels_from_logits, smallest_claim_first


def test_labels_from_logits_matches_full_resolution_argmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 6, 7, 8)
    full = torch.nn.functional.interpolate(logits[None], size=(12, 14, 16), mode="trilinear", align_corners=False)[0]
    labels = labels_from_logits(logits, (12, 14, 16))
    assert labels.dtype == torch.uint8
    np.testing.assert_array_equal(labels.numpy(), full.argmax(0).numpy())


@pytest.mark.parametrize(
    ("grid", "shape", "slab"), [((5, 6, 7), (37, 20, 9), 4), ((9, 6, 7), (4, 5, 6), 3), ((6, 7), (19, 23), 16)]
)
def test_labels_from_logits_in_slabs_equals_one_interpolation(
    grid: tuple[int, ...], shape: tuple[int, ...], slab: int
) -> None:
    """Up- and downsampling, a depth that is no multiple of the slab, and 2D: all equal F.interpolate's argmax."""
    torch.manual_seed(1)
    logits = torch.randn(4, *grid)
    mode = "trilinear" if len(grid) == 3 else "bilinear"
    full = torch.nn.functional.interpolate(logits[None], size=shape, mode=mode, align_corners=False)[0]
    labels = labels_from_logits(logits, shape, slab=slab)
    assert labels.shape == shape
    np.testing.assert_array_equal(labels.numpy(), full.argmax(0).numpy())


def test_claimed_labels_give_an_overlap_to_the_smallest_claimant() -> None:
    """A big organ spilling over a small neighbour loses the overlap; single claims keep their structure."""
    liver = torch.zeros(1, 10, 10, dtype=torch.bool)
    liver[0, :, :6] = True  # 60 voxels
    adrenal = torch.zeros(1, 10, 10, dtype=torch.bool)
    adrenal[0, 4:6, 4:8] = True  # 8 voxels, 4 of them inside the liver's claim
    claims = torch.stack([liver, adrenal])  # [S=2, 1, 10, 10]
    labels = claimed_labels(claims, smallest_claim_first(claims, spatial_dims=3))
    assert labels.shape == (1, 10, 10) and labels.dtype == torch.int64
    assert (labels[adrenal] == 2).all()  # the whole adrenal, overlap included
    assert (labels[liver & ~adrenal] == 1).all() and (labels[~liver & ~adrenal] == 0).all()
    # With a batch axis and the other priority, the liver wins the overlap instead.
    batched = claimed_labels(claims[None], torch.tensor([[1.0, 0.0]]))
    assert (batched[0][liver] == 1).all() and (batched[0][adrenal & ~liver] == 2).all()


def test_labels_from_logits_with_a_priority_resolves_claims_after_upsampling() -> None:
    torch.manual_seed(2)
    scores = torch.cat([torch.full((1, 4, 5, 6), 0.5), torch.rand(3, 4, 5, 6)])  # background 0.5, 3 structures
    priority = torch.tensor([0.0, 2.0, 1.0])
    shape = (9, 10, 11)
    labels = labels_from_logits(scores, shape, slab=4, priority=priority)
    full = torch.nn.functional.interpolate(scores[None], size=shape, mode="trilinear", align_corners=False)[0]
    expected = claimed_labels(full[1:] > full[:1], priority)
    np.testing.assert_array_equal(labels.numpy(), expected.numpy())
    assert (labels.numpy() != full.argmax(0).numpy()).any()  # not the plain argmax


def test_no_left_right_flip_when_left_and_right_are_separate_classes() -> None:
    assert allowed_flip_axes() == []
    assert allowed_flip_axes(["liver", "spleen", "aorta"]) == [2]
    assert allowed_flip_axes(["nucleus"], spatial_dims=2) == [1]


@pytest.mark.parametrize("strength", ["nnunet", "light"])
def test_augmentation_keeps_labels_integral_and_shapes(strength: str) -> None:
    torch.manual_seed(0)
    image = torch.rand(1, 16, 16, 16)
    label = torch.zeros(1, 16, 16, 16)
    label[:, 4:12, 4:12, 4:8] = 3
    augment = augmentation(flip_axes=[], strength=strength)
    augment.set_random_state(1)
    out = augment({"image": image, "label": label})
    assert out["image"].shape == image.shape
    assert set(np.unique(np.asarray(out["label"]))) <= {0.0, 3.0}
    assert not torch.equal(torch.as_tensor(out["image"]), image)


def test_light_augmentation_leaves_out_noise_blur_low_resolution_and_gamma() -> None:
    names = {type(t).__name__ for t in augmentation(strength="light").transforms}
    assert names == {"RandAffined", "RandShiftIntensityd", "RandScaleIntensityd"}
    assert {"RandGaussianNoised", "RandSimulateLowResolutiond"} <= {type(t).__name__ for t in augmentation().transforms}
    with pytest.raises(ConfigError, match="augmentation strength"):
        augmentation(strength="strong")


def _two_organ_record() -> dict:
    generator = torch.Generator().manual_seed(0)
    image = 0.3 + 0.02 * torch.randn(1, 12, 12, 12, generator=generator)  # background tissue ~0.3
    label = torch.zeros(1, 12, 12, 12, dtype=torch.int64)
    label[0, 2:6, 2:6, 2:6] = 1
    label[0, 7:10, 7:10, 7:10] = 2
    image[label == 1] = 0.8
    image[label == 2] = 0.6
    return {"image": image, "label": label, "presence": np.array([1.0, 1.0, 0.0])}


def test_organ_removal_fills_the_bed_with_surrounding_tissue_and_updates_presence() -> None:
    record = _two_organ_record()
    removal = RandOrganRemovald("image", "label", organ_ids=[1], prob=1.0, margin=2)
    removal.set_random_state(seed=0)
    out = removal(record)
    bed = record["label"] == 1
    assert not (out["label"] == 1).any() and torch.equal(out["label"][~bed], record["label"][~bed])
    assert abs(float(out["image"][bed].mean()) - 0.3) < 0.01  # the shell's median, not the organ's 0.8
    assert 0.01 < float(out["image"][bed].std()) < 0.03  # and the shell's spread (0.02)
    assert torch.equal(out["image"][~bed], record["image"][~bed])
    assert out["presence"].tolist() == [0.0, 1.0, 0.0]
    assert (record["label"] == 1).any() and record["presence"][0] == 1.0  # the input record is not modified
    again = RandOrganRemovald("image", "label", organ_ids=[1], prob=1.0, margin=2)
    again.set_random_state(seed=0)
    assert torch.equal(again(record)["image"], out["image"])  # seeded: reproducible


def test_organ_removal_leaves_cases_alone_when_not_drawn_or_nothing_to_remove() -> None:
    record = _two_organ_record()
    for removal in (
        RandOrganRemovald("image", "label", organ_ids=[1, 2], prob=0.0),
        RandOrganRemovald("image", "label", organ_ids=[3], prob=1.0),  # organ 3 is not in this case
    ):
        out = removal(record)
        assert torch.equal(out["image"], record["image"]) and torch.equal(out["label"], record["label"])
    with pytest.raises(ConfigError):
        RandOrganRemovald("image", "label", organ_ids=[1], prob=1.5)


def test_left_and_right_twins_outside_the_registry_are_never_flipped() -> None:
    from mednets.data.transforms import augmentation_axes

    thorax = ["left_lung", "right_lung", "heart", "vertebrae_L1"]
    assert allowed_flip_axes(thorax, 3) == []
    assert augmentation_axes(thorax, 3) == ([], False)
    assert augmentation_axes(["heart", "left_lung"], 3) == (
        [2],
        False,
    )  # no twin to swap; a scan is never turned upside down
