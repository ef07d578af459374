"""Sinks: send watch's statistics and findings to TensorBoard, Weights & Biases or MLflow.

Pass them to :func:`gradguard.watch` (``sinks=[...]``); each receives every flush. Each
backend library is imported only when its sink is created.
"""

from __future__ import annotations

from .mlflow import MLflow
from .tensorboard import TensorBoard
from .wandb import WandB

__all__ = ["MLflow", "TensorBoard", "WandB"]
