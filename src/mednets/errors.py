"""Typed errors: every problem a user can cause raises a subclass of `MednetsError`.

Each error names *where* the problem is (a file, a config key, a tensor), *what* was wrong and
*what was expected*, so the one line the CLI prints is enough to fix it.
"""

from __future__ import annotations

import os

__all__ = [
    "MednetsError",
    "InvalidInputError",
    "ConfigError",
    "UnknownNameError",
    "CheckpointError",
    "DatasetError",
    "TrainingError",
    "failure_message",
]


class MednetsError(Exception):
    """Base class of every error mednets raises on purpose.

    Args:
        message: what is wrong, in one sentence.
        source: the file, config key or argument the problem is in.
        expected: what would have been accepted.
        got: what was found instead.
    """

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        expected: object | None = None,
        got: object | None = None,
    ) -> None:
        self.message = message
        self.source = source
        self.expected = expected
        self.got = got
        super().__init__(self._render())

    def _render(self) -> str:
        text = f"{self.source}: {self.message}" if self.source else self.message
        details = []
        if self.expected is not None:
            details.append(f"expected {self.expected}")
        if self.got is not None:
            details.append(f"got {self.got}")
        return f"{text} ({', '.join(details)})" if details else text


class InvalidInputError(MednetsError, ValueError):
    """Input data is unusable: wrong shape or rank, NaN, corrupt or truncated file, empty volume."""


class ConfigError(MednetsError, ValueError):
    """A configuration, override or argument is invalid."""


class UnknownNameError(ConfigError, KeyError):
    """A name (model, loss term, label, scenario) is not one of the known choices."""

    def __str__(self) -> str:  # KeyError would otherwise wrap the message in quotes
        return self._render()


class CheckpointError(MednetsError):
    """A checkpoint is missing, corrupt, or does not match the model it is loaded into."""


class DatasetError(InvalidInputError):
    """A dataset folder breaks the documented format (see docs/dataset_format.md)."""


class TrainingError(MednetsError, RuntimeError):
    """Training cannot continue, e.g. the loss became NaN or infinite."""


def failure_message(case: str | os.PathLike[str], error: Exception) -> str:
    """One line for a case that failed in a batch: the case's file first, then the reason.

    A typed error usually names the file already; an `OSError` (a full disk, a read-only folder)
    names the file it was writing, which is often a temporary one, so the case is put in front.
    """
    case = os.fspath(case)
    if isinstance(error, OSError):
        reason = error.strerror or str(error)
        target = os.fspath(error.filename) if error.filename else None
        return f"{case}: {reason}" + (f" (writing {target})" if target and target != case else "")
    text = str(error) or type(error).__name__
    return text if case in text else f"{case}: {text}"
