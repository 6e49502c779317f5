"""Public face of the type system: `fedlang.types.parse("{float32}@CLIENTS")`.

The types live in `fedlang.ir.types`; this module re-exports them.
"""

from fedlang.ir.types import (DTYPES, FederatedType, FunctionType, Placement, SequenceType, StructType,
                              TensorType, Type, TypeConstructionError, is_assignable, leaves, parse, walk)

__all__ = ["DTYPES", "FederatedType", "FunctionType", "Placement", "SequenceType", "StructType", "TensorType",
           "Type", "TypeConstructionError", "is_assignable", "leaves", "parse", "walk"]
