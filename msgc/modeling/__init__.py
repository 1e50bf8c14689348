"""Models: registries, layers, backbones and the classifier built by :func:`build_model`."""
from .attention import ATTENTION_REGISTRY, build_attention
from .backbone import BACKBONE_REGISTRY, Backbone, build_backbone
from .budget import BudgetEntry, BudgetTable, budget_range, budget_table, check_budget, set_budget, set_budget_table
from .build import build_model, check_mac_target
from .classifier import Classifier
from .grouping import GROUPING_REGISTRY, Grouping, build_grouping
from .layers import fold_gate_thresholds, mask_generators, set_gate_noise, set_gate_thresholds
from .macs import Costs

__all__ = [
    "ATTENTION_REGISTRY", "BACKBONE_REGISTRY", "GROUPING_REGISTRY", "Backbone", "BudgetEntry", "BudgetTable",
    "Classifier", "Costs", "Grouping", "budget_range", "budget_table", "build_attention", "build_backbone",
    "build_grouping", "build_model", "check_budget", "fold_gate_thresholds", "mask_generators", "set_budget",
    "set_budget_table", "set_gate_noise", "set_gate_thresholds", "check_mac_target",
]
