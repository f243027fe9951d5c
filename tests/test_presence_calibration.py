"""Presence calibration (temperatures, threshold) and how the segmentation task uses presence logits."""

from __future__ import annotations

import pytest
import torch

from mednets.engine.sliding_window import WindowPresence, sliding_window
from mednets.errors import InvalidInputError
from mednets.metrics import expected_calibration_error
from mednets.tasks import create_task
from mednets.tasks.calibration import PresenceCalibration, choose_threshold, fit_temperatures


def _overconfident(n: int = 400, k: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose true log-odds are a third of what they claim (a 3x overconfident head)."""
    generator = torch.Generator().manual_seed(seed)
    true_log_odds = torch.randn(n, k, generator=generator) * 2 + 1
    present = torch.rand(n, k, generator=generator) < torch.sigmoid(true_log_odds)
    return true_log_odds * 3, present


def test_temperatures_undo_overconfidence_and_lower_the_ece() -> None:
    logits, present = _overconfident()
    temperatures = fit_temperatures(logits, present)
    assert all(2.2 < t < 4.0 for t in temperatures)  # about 3
    calibration = PresenceCalibration([f"s{i}" for i in range(3)], temperatures)
    before = expected_calibration_error(torch.sigmoid(logits).flatten().tolist(), present.flatten().tolist())
    after = expected_calibration_error(calibration.probabilities(logits).flatten().tolist(), present.flatten().tolist())
    assert after < 0.5 * before


def test_cleanly_separated_validation_does_not_make_the_probabilities_certain() -> None:
    logits = torch.tensor([[8.0, 6.0], [7.0, -5.0], [9.0, 5.0], [6.5, 7.0]])
    present = logits > 0
    temperatures = fit_temperatures(logits, present)
    probabilities = PresenceCalibration(["a", "b"], temperatures).probabilities(logits)
    assert all(t > 0 for t in temperatures)
    assert float(probabilities.max()) < 0.9999  # Platt's targets: never exactly 1 from a few cases


def test_the_threshold_sits_in_the_middle_of_the_gap_between_absent_and_present() -> None:
    probabilities = torch.tensor([0.02, 0.1, 0.7, 0.9, 0.95])
    present = torch.tensor([False, False, True, True, True])
    threshold = choose_threshold(probabilities, present)
    assert 0.1 < threshold < 0.7
    midpoint = torch.sigmoid((torch.logit(torch.tensor(0.1)) + torch.logit(torch.tensor(0.7))) / 2)
    assert threshold == pytest.approx(float(midpoint), abs=1e-3)
    assert choose_threshold(probabilities, torch.ones(5, dtype=torch.bool)) == 0.5  # nothing absent to separate


def test_a_damaged_calibration_file_is_a_clear_error() -> None:
    with pytest.raises(InvalidInputError, match=r"calibration\.json"):
        PresenceCalibration.from_dict({"structures": ["a"], "temperatures": [0.0], "threshold": 0.5})
    with pytest.raises(InvalidInputError, match="unreadable"):
        PresenceCalibration.from_dict({"structures": ["a"]})


def _outputs(presence_logits: list[float]) -> dict[str, torch.Tensor]:
    logits = torch.zeros(1, 3, 4, 4, 4)
    logits[:, 1] = 5.0  # structure 1 wins every voxel unless gated
    return {"logits": logits, "presence_logits": torch.tensor([presence_logits])}


def test_the_presence_term_joins_the_loss_and_absent_pairs_weigh_more() -> None:
    task = create_task("segmentation", num_classes=3, absent_weight=3.0)
    label = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    label[0, :2] = 1  # structure 1 in the input, structure 2 not
    terms = task.loss(_outputs([0.0, 0.0]), {"label": label})
    bce_zero = float(torch.log(torch.tensor(2.0)))
    assert terms["presence"] == pytest.approx(bce_zero, rel=1e-5)  # BCE of logit 0 on both sides
    plain = task.loss(_outputs([0.0, 0.0])["logits"], {"label": label})
    assert terms["total"] == pytest.approx(float(plain["total"] + terms["presence"]), rel=1e-5)
    right = task.loss(_outputs([4.0, -4.0]), {"label": label})["presence"]
    assert right < 0.1 * terms["presence"]


def test_gating_empties_a_structure_the_calibrated_head_calls_absent() -> None:
    task = create_task("segmentation", num_classes=3)
    task.calibration = PresenceCalibration(["a", "b"], [2.0, 2.0], threshold=0.3)
    probabilities = task.probabilities(_outputs([-1.0, 3.0]))  # calibrated: sigmoid(-0.5) = 0.38 -> present
    decoded = task.decode(probabilities, model=None, gating=True)
    assert decoded.presence_probs.tolist() == pytest.approx([0.3775, 0.8176], abs=1e-4)
    assert decoded.present.tolist() == [True, True]
    absent = task.decode(task.probabilities(_outputs([-3.0, 3.0])), model=None, gating=True)
    assert absent.present.tolist() == [False, True]
    assert float(absent.scores[1].abs().max()) == 0.0  # structure 1 can win no voxel
    predicted = task.predict(_outputs([-3.0, 3.0]))
    assert not (predicted["labels"] == 1).any()


def test_window_presence_blends_logits_and_keeps_the_largest_window_logit() -> None:
    class Model(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            mean = x.mean(dim=(1, 2, 3, 4))  # [B]
            return {"logits": x.repeat(1, 2, 1, 1, 1), "presence_logits": torch.stack([mean, -mean], 1)}

    image = torch.zeros(1, 8, 8, 16)
    image[..., 8:] = 1.0
    windows = WindowPresence(Model())
    logits = sliding_window(windows, image, (8, 8, 8), overlap=0.0, precision="fp32", channels_last=False)
    outputs = windows.outputs(logits[None])
    assert torch.allclose(outputs["logits"][0, 0], image[0])
    assert outputs["presence_logits"].tolist() == [[1.0, 0.0]]  # the second window's 1 and the first's -0
