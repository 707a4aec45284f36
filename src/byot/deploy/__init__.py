"""Deployment of a trained multi-exit network: per-exit calibration, the early-exit policy (simulated on
logits and fitted on validation data), the real shrinking-batch cascade, export and prediction."""

from byot.deploy.cascade import EarlyExitNet, EarlyExitResult
from byot.deploy.policy import ExitPolicy, fit_thresholds, simulate

__all__ = ["EarlyExitNet", "EarlyExitResult", "ExitPolicy", "fit_thresholds", "simulate"]
