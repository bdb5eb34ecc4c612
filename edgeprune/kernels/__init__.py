"""Hand-scheduled TIR kernels that replace TVM's default lowering where it is slow (see int8.py)."""

from .int8 import C_PRELUDE, specialize_int8, with_prelude

__all__ = ["C_PRELUDE", "specialize_int8", "with_prelude"]
