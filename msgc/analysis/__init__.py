"""Looking inside trained models: where the gates sit, what they learn, and figures of both.

:mod:`~msgc.analysis.structure` maps a backbone's masks to stages and convolutions;
:mod:`~msgc.analysis.gates` measures them over images; :mod:`~msgc.analysis.costs` gives a model's MACs
and parameters per stage; :mod:`~msgc.analysis.figures` draws the numbers (matplotlib, an optional extra:
``pip install -e ".[vis]"``).
"""
from .costs import (analyze_model, build_dense_model, fvcore_count, image_batches, measure_macs_and_gates,
                    parameter_counts)
from .gates import (SPECTRUM, GateRecorder, channel_order, collect_gate_statistics, has_gates, pairwise_jaccard,
                    select_layers, summarize_values)
from .structure import AttentionLayer, GatedLayer, attention_layers, conv_macs, gated_blocks, gated_layers

__all__ = ["SPECTRUM", "AttentionLayer", "GateRecorder", "GatedLayer", "analyze_model", "attention_layers",
           "build_dense_model", "channel_order", "collect_gate_statistics", "conv_macs", "fvcore_count", "gated_blocks",
           "gated_layers", "has_gates", "image_batches", "measure_macs_and_gates", "pairwise_jaccard",
           "parameter_counts", "select_layers", "summarize_values"]
