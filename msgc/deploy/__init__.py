"""Deployment: inference-only networks that compute only what the gates keep (docs/deployment.md, docs/benchmarks.md;
``msgc/deploy/README.md`` for the layout of this package)."""
from .backbones import BACKBONE_DEPLOYERS, BackboneDeployer
from .blocks import BLOCK_DEPLOYERS
from .build import DeployedClassifier, deploy

__all__ = ["BACKBONE_DEPLOYERS", "BLOCK_DEPLOYERS", "BackboneDeployer", "DeployedClassifier", "deploy"]
