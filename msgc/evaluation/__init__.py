"""Evaluation: top-1/top-5 accuracy and MACs, summed per process and gathered exactly; gate calibration."""
from .calibration import CalibrationResult, build_budget_table, calibrate_gates, check_budget
from .classification import ClassificationEvaluator, results_table
from .evaluator import DatasetEvaluator, inference_on_dataset

__all__ = ["CalibrationResult", "ClassificationEvaluator", "build_budget_table", "calibrate_gates", "check_budget",
           "DatasetEvaluator", "inference_on_dataset", "results_table"]
