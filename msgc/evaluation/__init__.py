"""Evaluation: top-1/top-5 accuracy and MACs, summed per process and gathered exactly."""
from .classification import ClassificationEvaluator, results_table
from .evaluator import DatasetEvaluator, inference_on_dataset

__all__ = ["ClassificationEvaluator", "DatasetEvaluator", "inference_on_dataset", "results_table"]
