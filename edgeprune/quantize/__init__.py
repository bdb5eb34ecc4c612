"""Integer quantization: PTQ / QAT / ADMM low-bit weights -> QuantModel -> golden model / Relax."""

from .qmodel import Op, QuantModel, TensorInfo, load  # noqa: F401
