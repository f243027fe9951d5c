"""Presence calibration: per-structure temperatures and a decision threshold fitted on validation cases.

A presence head's logits rank well but their probabilities need not mean what they say. After
training, the validation cases' presence logits `z` `[N, K]` (one per case and structure, the case's
largest window logit for patch models) and their truth fit one temperature per structure,
`p = sigmoid(z / T_k)`, with `log T_k = a + b_k`: a shared scale `a` and per-structure offsets `b_k`
shrunk towards 0 (a Gaussian prior, `OFFSET_PRIOR_SD`), because a validation split holds few absent
cases of any one structure. The targets are Platt's (`(n+ + 1) / (n+ + 2)` for present pairs,
`1 / (n- + 2)` for absent ones, counted over all pairs): with cleanly separated validation logits, plain likelihood would
drive the temperatures to 0 (certainty). The decision threshold is then chosen on the same
calibrated validation probabilities (`choose_threshold`). Nothing here ever sees test data.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from mednets.errors import InvalidInputError

__all__ = ["PresenceCalibration", "fit_temperatures", "choose_threshold", "OFFSET_PRIOR_SD"]

OFFSET_PRIOR_SD = 0.5  # a structure's temperature may differ from the shared one by about e^0.5 = 1.6x
THRESHOLD_RANGE = (0.05, 0.95)  # never a threshold that calls (almost) everything present or absent


@dataclass
class PresenceCalibration:
    """What `predict` applies to presence logits: `sigmoid(z / temperature)` and `>= threshold`.

    Attributes:
        structures: names, in the model's structure order.
        temperatures: one per structure.
        threshold: the decision threshold on the calibrated probability.
        volume_floor_fraction: a structure painted with less than this fraction of its smallest
            training volume is emptied (chosen on validation; None keeps the run's setting).
        fitted_on: what it was fitted on (cases, present and absent pairs, validation ECE before/after).
    """

    structures: list[str]
    temperatures: list[float]
    threshold: float = 0.5
    volume_floor_fraction: float | None = None
    fitted_on: dict[str, Any] = field(default_factory=dict)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated presence probabilities of logits `[..., K]`."""
        if logits.shape[-1] != len(self.temperatures):
            raise InvalidInputError("presence logits and calibration disagree on the structures",
                                    source="calibration.json", expected=len(self.temperatures), got=logits.shape[-1])  # fmt: skip
        temperatures = torch.as_tensor(self.temperatures, dtype=torch.float32, device=logits.device)
        return torch.sigmoid(logits.float() / temperatures)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "calibration.json") -> PresenceCalibration:
        """Read a saved calibration; raises `InvalidInputError` naming `source` when a field is wrong."""
        try:
            calibration = cls(structures=list(data["structures"]), temperatures=[float(t) for t in data["temperatures"]],
                              threshold=float(data["threshold"]), volume_floor_fraction=data.get("volume_floor_fraction"),
                              fitted_on=dict(data.get("fitted_on", {})))  # fmt: skip
        except (KeyError, TypeError, ValueError) as error:
            raise InvalidInputError(f"unreadable presence calibration ({error})", source=source) from error
        if len(calibration.structures) != len(calibration.temperatures) or min(calibration.temperatures) <= 0:
            raise InvalidInputError("one positive temperature per structure expected", source=source,
                                    got=calibration.temperatures)  # fmt: skip
        if not 0 < calibration.threshold < 1:
            raise InvalidInputError("the threshold must lie in (0, 1)", source=source, got=calibration.threshold)
        return calibration


def _platt_targets(present: torch.Tensor) -> torch.Tensor:
    """Platt's smoothed targets, counted over all pairs: `(n+ + 1)/(n+ + 2)` for present, `1/(n- + 2)` for absent.

    Pooled, not per structure: a structure seen present in 6 validation cases alone would get the
    target 7/8, an underconfidence that the test set's ECE pays for."""
    positives = present.sum()
    negatives = (~present).sum()
    return torch.where(present, (positives + 1) / (positives + 2), 1 / (negatives + 2)).float()


def fit_temperatures(logits: torch.Tensor, present: torch.Tensor, prior_sd: float = OFFSET_PRIOR_SD) -> list[float]:
    """Per-structure temperatures `[K]` fitted to validation logits `[N, K]` and truth `[N, K]` (bool).

    Maximises the likelihood of Platt's targets under `sigmoid(z / T_k)` with `log T_k = a + b_k` and
    `b_k ~ N(0, prior_sd^2)` (MAP, L-BFGS).
    """
    if logits.ndim != 2 or logits.shape != present.shape or logits.shape[0] == 0:
        raise InvalidInputError("calibration needs logits and truth of the same shape [N, K], N > 0",
                                source="validation cases", got=(tuple(logits.shape), tuple(present.shape)))  # fmt: skip
    logits = logits.detach().double()
    targets = _platt_targets(present.bool()).double()
    shared = torch.zeros((), dtype=torch.float64, requires_grad=True)
    offsets = torch.zeros(logits.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([shared, offsets], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        scaled = logits / torch.exp(shared + offsets)
        nll = torch.nn.functional.binary_cross_entropy_with_logits(scaled, targets, reduction="sum")
        loss = (nll + 0.5 * (offsets / prior_sd).pow(2).sum()) / logits.shape[0]
        loss.backward()
        return loss

    optimizer.step(objective)
    return [float(t) for t in torch.exp(shared + offsets).detach()]


def choose_threshold(probabilities: torch.Tensor, present: torch.Tensor) -> float:
    """The decision threshold with the fewest validation errors: the log-odds midpoint of the best interval.

    Candidates split the sorted calibrated probabilities; among those with the fewest errors (present
    called absent plus absent called present) the widest gap wins, and the threshold is its middle
    in log-odds, clipped to `THRESHOLD_RANGE`; with no absent pair in validation it is 0.5.
    """
    p = probabilities.detach().double().flatten()
    truth = present.bool().flatten()
    if bool(truth.all()) or bool((~truth).all()):
        return 0.5
    low, high = THRESHOLD_RANGE
    edges = sorted({low, high, *[min(max(float(v), low), high) for v in p]})
    best: tuple[int, float, float] | None = None  # (errors, -gap in log-odds, threshold)
    for left, right in itertools.pairwise(edges):
        threshold = _logit_midpoint(left, right)
        decided = p >= threshold
        errors = int((decided != truth).sum())
        candidate = (errors, -(_logit(right) - _logit(left)), threshold)
        if best is None or candidate[:2] < best[:2]:
            best = candidate
    assert best is not None  # at least the [low, high] interval
    return round(best[2], 4)


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _logit_midpoint(left: float, right: float) -> float:
    return 1 / (1 + math.exp(-(_logit(left) + _logit(right)) / 2))
