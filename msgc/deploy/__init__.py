"""Deployment: inference-only networks that compute only what the gates keep (see the README, "Speed")."""
from .build import DEPLOY_REGISTRY, DeployedClassifier, deploy
from . import backbones  # noqa: F401  (registers the deployed backbones)

__all__ = ["DEPLOY_REGISTRY", "DeployedClassifier", "deploy"]
