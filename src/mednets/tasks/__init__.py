"""Tasks: what a model's outputs mean for training (loss, metrics) and prediction (labels, presence)."""

from __future__ import annotations

from mednets.tasks.task import (
    AbsenceSegmentationTask,
    Decoded,
    DenoisingTask,
    SegmentationTask,
    Task,
    create_task,
    task_type,
)

__all__ = [
    "AbsenceSegmentationTask",
    "Decoded",
    "DenoisingTask",
    "SegmentationTask",
    "Task",
    "create_task",
    "task_type",
]
