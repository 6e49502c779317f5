"""Checked AST -> IR. Runs only on programs the checker accepted.

Every expression becomes nodes of the enclosing `Function`; lambdas become
nested functions referenced by `closure` nodes whose inputs are the values
they capture; `grad`/`value_and_grad` are expanded here by reverse-mode
autodiff (`fedlang.ir.autodiff`), so later stages only see ordinary ops.

Weak literals stay Python numbers in `const` nodes (`weak=True`) where they
meet a tensor (so they take its dtype, as NumPy's and TensorFlow's rules do),
and become typed constants where a type is expected (arguments, results).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedlang.diagnostics import InternalCompilerError
from fedlang.ir.avals import AVal, function_parameters, parameters_for
from fedlang.ir.checker import CheckedModule
from fedlang.ir.graph import Function, Node, Program, prim
from fedlang.ir.primitives import CALLABLE, OPERATORS, Primitive
from fedlang.ir.types import FederatedType, FunctionType, Placement, StructType, TensorType, Type
from fedlang.syntax import ast


def build_program(modules: list[tuple[CheckedModule, dict[str, str], str]]) -> Program:
    """IR for checked modules, dependencies first.

    Each item is (checked module, alias -> prefix of the imported module, this module's prefix);
    the root module has the prefix ""."""
    program = Program()
    for checked, imports, prefix in modules:
        _ModuleBuilder(program, checked, imports, prefix).build()
    return program


def qualified(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


class _ModuleBuilder:
    def __init__(self, program: Program, checked: CheckedModule, imports: dict[str, str], prefix: str):
        self.program, self.checked, self.imports, self.prefix = program, checked, imports, prefix
        self.decls = {d.name: d for d in checked.module.decls if isinstance(d, (ast.FunctionDecl, ast.ProcessDecl))}

    def build(self) -> None:
        for decl in self.checked.module.decls:
            if isinstance(decl, ast.FunctionDecl):
                self.function(decl.name)
        for decl in self.checked.module.decls:
            if isinstance(decl, ast.ProcessDecl):
                fields = {key: value for key, _, value in decl.fields}
                self.program.processes[qualified(self.prefix, decl.name)] = (
                    self._global_name(fields["init"]), self._global_name(fields["next"]))
                if not self.prefix:
                    self.program.root.append(decl.name)

    def _global_name(self, e: ast.Expr) -> str:
        if isinstance(e, ast.Name):
            return qualified(self.prefix, e.id)
        if isinstance(e, ast.Select) and isinstance(e.base, ast.Name):
            return qualified(self.imports[e.base.id], e.name)
        raise InternalCompilerError("a process field is not a computation name")

    def function(self, name: str) -> Function:
        """The IR of top-level `name` of this module (built once, on first use)."""
        key = qualified(self.prefix, name)
        if key in self.program.functions:
            return self.program.functions[key]
        decl = self.decls[name]
        aval = self.checked.interface.names[name].aval
        ft: FunctionType = aval.type
        params = function_parameters(aval)
        function = Function(key, tuple((p.name, t) for p, t in zip(decl.params, params)), ft.result,
                            federated=decl.federated, span=decl.span)
        self.program.functions[key] = function
        if not self.prefix:
            self.program.root.append(name)
        scope = _Scope(None, function)
        for i, p in enumerate(decl.params):
            scope.names[p.name] = function.add(Node(prim("param"), (), params[i], (("index", i),), p.span))
        builder = _ExprBuilder(self, function)
        function.result = builder.coerce(builder.body(decl.body, scope), ft.result)
        return function


class _Scope:
    """Names -> node ids. A function's root scope records what its closure captures;
    blocks open child scopes in the same function."""

    def __init__(self, parent: "_Scope | None", function: Function, root: bool = True):
        self.parent, self.function = parent, function
        self.root: _Scope = self if root else parent.root
        self.names: dict[str, int] = {}
        if root:
            self.captured: dict[tuple[int, int], int] = {}   # (id(owner function), node) -> capture node
            self.capture_sources: list[int] = []             # the enclosing function's nodes, in order

    def child(self) -> "_Scope":
        return _Scope(self, self.function, root=False)

    def lookup(self, name: str) -> tuple["_Scope", int] | None:
        scope = self
        while scope is not None:
            if name in scope.names:
                return scope, scope.names[name]
            scope = scope.parent
        return None

    def local(self, owner: "_Scope", nid: int) -> int:
        """Node `nid` of `owner`'s function as a node of this function (capturing it)."""
        if owner.function is self.function:
            return nid
        root = self.root
        key = (id(owner.function), nid)
        if key in root.captured:
            return root.captured[key]
        node = owner.function.node(nid)
        if node.prim.name == "const":                # constants are copied, not captured
            local = self.function.add(node)
        else:
            source = root.parent.local(owner, nid)
            index = len(root.capture_sources)
            root.capture_sources.append(source)
            self.function.captures += ((f"c{index}", node.type),)
            local = self.function.add(Node(prim("capture"), (), node.type, (("index", index),), node.span))
        root.captured[key] = local
        return local


class _ExprBuilder:
    def __init__(self, module: _ModuleBuilder, function: Function):
        self.module, self.f = module, function
        self.literals: dict[int, list[int]] = {}     # struct literal node -> its field nodes before typing

    def aval(self, e: ast.Expr) -> AVal:
        return self.module.checked.avals[id(e)]

    def add(self, p: Primitive | str, inputs, t: Type, span, **attrs) -> int:
        primitive = prim(p) if isinstance(p, str) else p
        return self.f.add(Node(primitive, tuple(inputs), t, tuple(attrs.items()), span))

    # ---- bodies -------------------------------------------------------------------------
    def body(self, body: ast.Expr | ast.Block, scope: _Scope) -> int:
        if not isinstance(body, ast.Block):
            return self.expr(body, scope)
        inner = scope.child()
        for let in body.lets:
            value = self.expr(let.value, inner)
            if not let.destructure:
                inner.names[let.names[0]] = value
                continue
            t = self.f.node(value).type
            member = t.member if isinstance(t, FederatedType) else t
            for i, (name, field_type) in enumerate(member.fields):
                ft = FederatedType(field_type, t.placement, t.all_equal) if isinstance(t, FederatedType) else field_type
                inner.names[let.names[i]] = self.add("select", [value], ft, let.span, index=i)
        return self.expr(body.result, inner)

    # ---- expressions ------------------------------------------------------------------------
    def expr(self, e: ast.Expr, scope: _Scope) -> int:
        method = getattr(self, "_" + type(e).__name__)
        return method(e, scope)

    def _IntLit(self, e: ast.IntLit, scope) -> int:
        return self.add("const", [], TensorType("int32"), e.span, value=e.value, weak=True)

    def _FloatLit(self, e: ast.FloatLit, scope) -> int:
        return self.add("const", [], TensorType("float32"), e.span, value=e.value, weak=True)

    def _BoolLit(self, e: ast.BoolLit, scope) -> int:
        return self.add("const", [], TensorType("bool"), e.span, value=np.asarray(e.value))

    def _StringLit(self, e: ast.StringLit, scope) -> int:
        return self.add("const", [], TensorType("string"), e.span, value=np.asarray(e.value, np.str_))

    def _Name(self, e: ast.Name, scope: _Scope) -> int:
        found = scope.lookup(e.id)
        if found is not None:
            owner, nid = found
            return scope.local(owner, nid)
        return self._global(qualified(self.module.prefix, e.id), self.aval(e), e.span, e.id)

    def _global(self, key: str, aval: AVal, span, local_name: str | None = None) -> int:
        if local_name is not None and key not in self.module.program.functions:
            self.module.function(local_name)
        return self.add("global", [], aval.type, span, name=key, arity=aval.arity)

    def _Select(self, e: ast.Select, scope: _Scope) -> int:
        if isinstance(e.base, ast.Name) and scope.lookup(e.base.id) is None and e.base.id in self.module.imports:
            return self._global(qualified(self.module.imports[e.base.id], e.name), self.aval(e), e.span)
        base = self.expr(e.base, scope)
        t = self.f.node(base).type
        member = t.member if isinstance(t, FederatedType) else t
        return self.add("select", [base], self.aval(e).type, e.span, index=member.names.index(e.name))

    def _Index(self, e: ast.Index, scope: _Scope) -> int:
        base = self.expr(e.base, scope)
        t = self.f.node(base).type
        member = t.member if isinstance(t, FederatedType) else t
        if isinstance(member, StructType):
            k = _static_int(e.index)
            return self.add("select", [base], self.aval(e).type, e.span, index=k % len(member.fields))
        return self.add("index", [base, self.expr(e.index, scope)], self.aval(e).type, e.span)

    def _StructLit(self, e: ast.StructLit, scope: _Scope) -> int:
        t: StructType = self.aval(e).type
        fields = [self.expr(v, scope) for _, v in e.fields]
        nid = self.add("struct", [self.coerce(f, ft) for f, ft in zip(fields, t.types)], t, e.span, names=t.names)
        if any(self._weak_value(f) is not None or f in self.literals for f in fields):
            self.literals[nid] = fields       # a later expected type may re-type its literal fields
        return nid

    def _BinOp(self, e: ast.BinOp, scope: _Scope) -> int:
        return self._apply(OPERATORS[e.op], e, [self.expr(e.left, scope), self.expr(e.right, scope)])

    def _UnaryOp(self, e: ast.UnaryOp, scope: _Scope) -> int:
        return self._apply(OPERATORS["neg" if e.op == "-" else "not"], e, [self.expr(e.operand, scope)])

    def _apply(self, p: Primitive, e: ast.Expr, inputs: list[int], **attrs) -> int:
        aval = self.aval(e)
        if aval.weak and all(self._weak_value(i) is not None for i in inputs):
            value = self._fold(p, [self._weak_value(i) for i in inputs], attrs)
            if value is not None:
                value = float(value) if aval.weak == "float" else int(value)
                return self.add("const", [], aval.type, e.span, value=value, weak=True)
            inputs = [self._materialize_default(i) for i in inputs]
        return self.add(p, inputs, aval.type, e.span, **attrs)

    def _fold(self, p: Primitive, values: list, attrs: dict) -> Any:
        """Literal arithmetic at full precision (float64, int64), or None when it fails
        (`7 % 0`): then the node is kept and behaves at run time as any other."""
        arrays = [np.asarray(v, np.float64 if isinstance(v, float) else np.int64) for v in values]
        static = {k: v for k, v in attrs.items() if k != "args"}
        names = attrs.get("args")
        try:
            with np.errstate(all="raise"):
                value = p.impl(**dict(zip(names, arrays)), **static) if names else p.impl(*arrays, **static)
            return np.asarray(value).item()
        except (ArithmeticError, ValueError, TypeError, FloatingPointError):
            return None

    def _weak_value(self, nid: int) -> Any:
        node = self.f.node(nid)
        return node.attr("value") if node.prim.name == "const" and node.attr("weak") else None

    def _If(self, e: ast.If, scope: _Scope) -> int:
        t = self.aval(e).type
        inputs = [self.expr(e.cond, scope), self.coerce(self.expr(e.then, scope), t),
                  self.coerce(self.expr(e.orelse, scope), t)]
        return self.add("cond", inputs, t, e.span)

    def _Lambda(self, e: ast.Lambda, scope: _Scope) -> int:
        aval = self.aval(e)
        ft: FunctionType = aval.type
        params = function_parameters(aval)
        inner = Function(f"{self.f.name}.lambda{e.span.line}_{e.span.column}",
                         tuple((p.name, t) for p, t in zip(e.params, params)), ft.result, span=e.span)
        inner_scope = _Scope(scope, inner)
        for i, p in enumerate(e.params):
            inner_scope.names[p.name] = inner.add(Node(prim("param"), (), params[i], (("index", i),), p.span))
        builder = _ExprBuilder(self.module, inner)
        inner.result = builder.coerce(builder.body(e.body, inner_scope), ft.result)
        return self.add("closure", inner_scope.capture_sources, ft, e.span, function=inner, arity=aval.arity)

    # ---- calls ---------------------------------------------------------------------------------
    def _Call(self, e: ast.Call, scope: _Scope) -> int:
        func = e.func
        if isinstance(func, ast.Name) and scope.lookup(func.id) is None \
                and func.id not in self.module.checked.interface.names and func.id not in self.module.imports \
                and func.id in CALLABLE:
            return self._primitive_call(CALLABLE[func.id], e, scope)
        callee = self.expr(func, scope)
        callee_aval = self.aval(func)
        params = list(function_parameters(callee_aval) or ())
        ft: FunctionType = callee_aval.type
        args = e.args
        names = list(callee_aval.arity) if callee_aval.arity and len(callee_aval.arity) == len(params) else None
        pack = len(params) == 1 and len(args) > 1
        if pack:
            params = list(ft.parameter.types)
            names = list(ft.parameter.names) if all(ft.parameter.names) else None
        ordered: list[ast.Arg | None] = [None] * len(params)
        position = 0
        for arg in args:
            if arg.keyword is None:
                ordered[position] = arg
                position += 1
            else:
                ordered[names.index(arg.keyword)] = arg
        inputs = [self.coerce(self.expr(a.value, scope), t) for a, t in zip(ordered, params)]
        if pack:
            inputs = [self.add("struct", inputs, ft.parameter, e.span, names=ft.parameter.names)]
        return self.add("call", [callee, *inputs], self.aval(e).type, e.span)

    def _primitive_call(self, p: Primitive, e: ast.Call, scope: _Scope) -> int:
        if p.name in ("grad", "value_and_grad"):
            from fedlang.ir.autodiff import build_grad

            fn = self.expr(e.args[0].value, scope)
            return build_grad(self, fn, p.name, self.aval(e), e.span, scope=scope)
        fixed = [q for q in p.params if not (p.variadic and q is p.params[-1])]
        given: dict[str, ast.Arg] = {}
        rest: list[ast.Arg] = []
        for i, arg in enumerate(a for a in e.args if a.keyword is None):
            if i < len(fixed):
                given[fixed[i].name] = arg
            else:
                rest.append(arg)
        for arg in e.args:
            if arg.keyword is not None:
                given[arg.keyword] = arg
        inputs, attrs, arg_names = [], {}, []
        for q in fixed:
            arg = given.get(q.name)
            if q.kind == "value":
                if arg is not None:
                    inputs.append(self.expr(arg.value, scope))
                    arg_names.append(q.name)
            else:
                attrs[q.name] = q.default if arg is None else _static(q.kind, arg.value)
        for arg in rest:
            inputs.append(self.expr(arg.value, scope))
        if p.name == "reduce":
            inputs[1] = self.coerce(inputs[1], self.aval(e).type)
        if p.name == "federated_aggregate":       # a literal zero takes the accumulator's type
            accumulator = parameters_for(self.aval(given["accumulate"].value), 2)[0]
            inputs[1] = self.coerce(inputs[1], accumulator)
        if p.name in _TYPED_SCALAR_ARGS:
            inputs = [self._materialize_default(i) for i in inputs]
        if not p.variadic:
            attrs["args"] = tuple(arg_names)
        return self._apply(p, e, inputs, **attrs)

    def _materialize_default(self, nid: int) -> int:
        value = self._weak_value(nid)
        if value is None:
            return nid
        node = self.f.node(nid)
        return self.add("const", [], node.type, node.span, value=np.asarray(value, np.dtype(node.type.dtype)))

    def coerce(self, nid: int, t: Type) -> int:
        """Make a weak constant a typed one where a type is expected (also the
        literal fields of a struct literal: `(s = 0.0, n = 0)` as `<s=float64,n=int32>`)."""
        node = self.f.node(nid)
        if nid in self.literals and isinstance(t, StructType) and node.type != t:
            fields = [self.coerce(f, ft) for f, ft in zip(self.literals[nid], t.types)]
            return self.add("struct", fields, t, node.span, names=t.names)
        if isinstance(t, StructType) and isinstance(node.type, StructType) and _names_differ(node.type, t):
            # `(x, y)` where `<a=..,b=..>` is expected: the value takes the expected names too.
            fields = [self.coerce(self.add("select", [nid], ft_given, node.span, index=i), ft)
                      for i, (ft_given, ft) in enumerate(zip(node.type.types, t.types))]
            return self.add("struct", fields, StructType(tuple(zip(t.names, (self.f.node(f).type for f in fields)))),
                            node.span, names=t.names)
        value = self._weak_value(nid)
        if value is None:
            return nid
        node = self.f.node(nid)
        if not isinstance(t, TensorType):
            t = node.type
        return self.add("const", [], t, node.span, value=np.asarray(value, np.dtype(t.dtype)))


def _names_differ(given: Type, expected: Type) -> bool:
    """Whether a struct value of type `given` needs renaming to `expected`, at any depth."""
    if isinstance(given, StructType) and isinstance(expected, StructType):
        return given.names != expected.names or any(_names_differ(a, b) for a, b in zip(given.types, expected.types))
    return False


# Primitives whose scalar arguments are not elementwise partners of a tensor: weak
# literals given to them take their default dtype (int32, float32).
_TYPED_SCALAR_ARGS = frozenset({
    "reduce", "federated_value", "random_normal", "random_uniform", "random_normal_like",
    "size", "count", "num_examples", "cast", "one_hot", "argmax", "sum", "mean", "max", "min", "zeros_like",
    "ones_like", "global_norm", "reshape", "softmax", "log_softmax", "matmul", "sparse_softmax_cross_entropy",
})


def _static_int(e: ast.Expr) -> int:
    if isinstance(e, ast.IntLit):
        return e.value
    if isinstance(e, ast.UnaryOp) and isinstance(e.operand, ast.IntLit):
        return -e.operand.value
    raise InternalCompilerError("a static integer was expected")


def _static(kind: str, e: ast.Expr) -> Any:
    if kind == "int":
        return _static_int(e)
    if kind == "float":
        if isinstance(e, ast.UnaryOp):
            return -float(e.operand.value)
        return float(e.value)
    if kind == "shape":
        return tuple(_static_int(i) for i in e.items)
    if kind == "dtype":
        return e.dtype
    if kind == "placement":
        return Placement(e.placement)
    raise InternalCompilerError(f"unknown static kind {kind}")
