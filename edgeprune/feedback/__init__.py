"""Hardware-in-the-loop feedback: per-layer pruning ratios tuned by costs measured on the target.

    result = edgeprune.feedback.search(model, example_input, data, "cortex-m7",
                                       {"latency_ms": 5, "flash_kb": 256}, criterion="l1")

measure.py: one model → compile → QEMU → costs; costs.py: the cost table and its model;
worker.py: the pure jobs, the process pool and the disk cache; search.py: the NetAdapt loop;
plot.py: the Pareto PNG.
"""

from .search import FeedbackResult, search

__all__ = ["search", "FeedbackResult"]
