"""Tasks turn model outputs into predictions: SADAAn's overlap rule and the binary head, on hand-made outputs."""

from __future__ import annotations

import pytest
import torch

from mednets.errors import ConfigError
from mednets.tasks import create_task
from mednets.tasks.decoding import labels_from_logits


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


def test_binary_head_scores_are_background_and_foreground_of_the_sigmoid() -> None:
    task = create_task("segmentation", num_classes=2)
    logits = torch.tensor([-2.0, -0.1, 0.0, 0.1, 3.0]).view(1, 1, 1, 5)
    scores = task.decode(task.probabilities(logits), model=None, gating=True).scores  # [2, 1, 5]
    foreground = torch.sigmoid(logits[0])
    torch.testing.assert_close(scores, torch.cat([1 - foreground, foreground]))
    decided = labels_from_logits(scores, (1, 5))
    predicted = task.predict(logits)["labels"]
    assert decided.tolist() == predicted[0].tolist() == [[0, 0, 0, 1, 1]]  # above 0.5 only, the same in both paths


def test_binary_head_metrics_score_the_thresholded_sigmoid() -> None:
    task = create_task("segmentation", num_classes=2)
    logits = torch.tensor([5.0, 5.0, -5.0, -5.0]).view(1, 1, 4)
    truth = torch.tensor([[1, 0, 0, 0]])
    metrics = task.batch_metrics(logits, {"label": truth})
    assert metrics["dice"].item() == pytest.approx(2 / 3)


def test_a_head_that_does_not_fit_the_labels_is_refused_before_training() -> None:
    create_task("segmentation", num_classes=2).check_head(1)  # binary: fits
    create_task("segmentation", num_classes=2).check_head(2)  # softmax: fits
    with pytest.raises(ConfigError, match=r"model.overrides.out_channels.*1 is a sigmoid head") as error:
        create_task("segmentation", num_classes=2).check_head(3)
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match=r"expected one of \[4\]"):
        create_task("segmentation", num_classes=4).check_head(1)
