"""The reference interpreter: the definition of what a program means.

One small loop (read the inputs of a node from the environment, run its
rule, write the result) over the nodes of a function, in dependency order.
The rules are the primitives' NumPy implementations; a few structural nodes
read the interpreter's own state (parameters, captures, globals, closures).
Federated values are lists with one entry per client (CLIENTS) or the value
itself (SERVER); the number of clients is fixed per invocation.
"""

from __future__ import annotations

from typing import Any, Sequence

from fedlang.diagnostics import InternalCompilerError
from fedlang.ir.graph import Function, Program
from fedlang.ir.lazy_numpy import np
from fedlang.ir.primitives import NUM_CLIENTS, FedlangRuntimeError
from fedlang.ir.values import Struct


class Closure:
    """A function value: an IR function with the values it captured."""

    __slots__ = ("function", "captured", "interpreter")

    def __init__(self, function: Function, captured: tuple, interpreter: "Interpreter"):
        self.function, self.captured, self.interpreter = function, captured, interpreter

    def __call__(self, *args: Any) -> Any:
        return self.interpreter.run(self.function, _conventional(self.function, args), self.captured)

    def __repr__(self) -> str:
        return f"<fedlang function {self.function.name}: {self.function.type}>"


def _conventional(function: Function, args: Sequence[Any]) -> tuple:
    """Match call arguments to parameters (TFF's struct packing and unpacking)."""
    n = len(function.params)
    if len(args) == n:
        return tuple(args)
    if n == 1:
        return (Struct(args),)
    if len(args) == 1 and isinstance(args[0], Struct) and len(args[0]) == n:
        return tuple(args[0].values)
    raise InternalCompilerError(f"{function.name} takes {n} arguments, got {len(args)}")


class Interpreter:
    def __init__(self, program: Program):
        self.program = program
        self.calls = 0

    def run(self, function: Function, args: Sequence[Any], captured: Sequence[Any] = ()) -> Any:
        self.calls += 1
        env: dict[int, Any] = {}
        for nid, node in function.nodes():
            name = node.prim.name
            if name == "param":
                value = args[node.attr("index")]
            elif name == "capture":
                value = captured[node.attr("index")]
            elif name == "global":
                value = Closure(self.program.functions[node.attr("name")], (), self)
            elif name == "closure":
                value = Closure(node.attr("function"), tuple(env[i] for i in node.inputs), self)
            else:
                impl = node.prim.impl
                if impl is None:
                    raise InternalCompilerError(f"{name} has no reference implementation")
                attrs = {k: v for k, v in node.attrs if k not in _NOT_IMPL_ATTRS}
                if node.prim.typed_impl:
                    attrs["out_type"] = node.type
                inputs = [env[i] for i in node.inputs]
                names = node.attr("args")
                try:
                    if names is not None:
                        value = impl(**dict(zip(names, inputs)), **attrs)
                    else:
                        value = impl(*inputs, **attrs)
                except FedlangRuntimeError as error:
                    raise FedlangRuntimeError(_where(node, str(error))) from None
                except (ArithmeticError, IndexError, ValueError) as error:
                    raise FedlangRuntimeError(_where(node, f"{name} failed: {error}")) from None
            env[nid] = value
        return env[function.result]

    def call(self, name: str, args: Sequence[Any], num_clients: int) -> Any:
        """Run top-level computation `name` with `num_clients` participating clients."""
        token = NUM_CLIENTS.set(num_clients)
        try:
            with np.errstate(all="ignore"):      # IEEE semantics: inf and nan are values, not warnings
                return self.run(self.program.functions[name], args)
        finally:
            NUM_CLIENTS.reset(token)


def _where(node, message: str) -> str:
    if node.span is None or message.startswith(str(node.span)):
        return message
    return f"{node.span}: {message}"


# Attributes that describe a node for printing and passes but are not impl arguments.
_NOT_IMPL_ATTRS = frozenset({"args", "weak", "arity"})
