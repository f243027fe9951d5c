"""Tasks turn model outputs into predictions: SADAAn's overlap rule, checked on hand-made outputs."""

from __future__ import annotations

import torch

from mednets.tasks import create_task


def test_absence_task_gives_an_overlap_to_the_structure_claiming_fewer_voxels() -> None:
    probs = torch.zeros(1, 2, 4, 4, 4)
    probs[0, 0, :, :, :3] = 0.99  # a big organ, 48 voxels
    probs[0, 1, 1:3, 1:3, 2:4] = 0.8  # a small one, 8 voxels: 4 overlap the big one at lower probability
    outputs = {
        "segmentation_probs": probs,
        "presence_probs": torch.ones(1, 2),
        "present": torch.ones(1, 2, dtype=torch.bool),
    }
    labels = create_task("absence_segmentation", num_classes=3).predict(outputs)["labels"]
    small = probs[0, 1] > 0.5
    assert (labels[0][small] == 2).all()  # the overlap goes to the small structure, not the more probable one
    assert (labels[0][(probs[0, 0] > 0.5) & ~small] == 1).all() and (labels[0][probs.amax(1)[0] <= 0.5] == 0).all()
