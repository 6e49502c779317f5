"""The checker: names, types and placements of one module (LANGUAGE.md 2-6).

It reads the AST of a module plus the interfaces of the modules it imports,
infers an abstract value (`AVal`) for every expression, and records every
error it finds as a `Diagnostic` (all of them, not only the first: an
expression with an error gets the type UNKNOWN, which is accepted everywhere,
so one mistake is reported once). Type rules of builtins and intrinsics live in
the primitive table; this module wires names, scopes, calls and placements.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from fedlang.diagnostics import Diagnostic, Span, closest_names
from fedlang.ir.avals import (UNKNOWN, UNKNOWN_AVAL, AVal, accepts, describe, function_parameters, parameters_for,
                              strong, weak_scalar)
from fedlang.ir.primitives import CALLABLE, OPERATORS, ORDINALS, REQUIRED, Primitive, TypeRuleError
from fedlang.ir.types import (FederatedType, FunctionType, Placement, SequenceType, StructType, TensorType,
                              Type, TypeConstructionError, is_assignable, is_placed, placements_in)
from fedlang.syntax import ast


@dataclass(frozen=True, slots=True)
class Binding:
    """What a name means: a value, a top-level computation, a type or a module."""

    kind: str                     # var | fn | comp | process | type | module
    span: Span
    aval: AVal = UNKNOWN_AVAL     # for var, fn, comp, process
    type: Type | None = None      # for type aliases
    module: "ModuleInterface | None" = None
    top_level: str | None = None  # the declaration's name, for top-level fn/comp
    static_function: bool = False # a let bound to a function known at compile time (grad needs one)


@dataclass
class ModuleInterface:
    """What other modules see of a checked module: its top-level names."""

    name: str                     # how the module was imported (std.learning, "mlp.fed")
    names: dict[str, Binding]


@dataclass
class CheckedModule:
    file: str
    module: ast.Module
    interface: ModuleInterface
    avals: dict[int, AVal]        # id(expression node) -> its abstract value
    declarations: list[tuple[str, str, Type | None]]   # (kind, name, type) in source order
    diagnostics: list[Diagnostic]

    def aval(self, node: ast.Node) -> AVal:
        return self.avals[id(node)]

    def type_of(self, name: str) -> Type | None:
        for _, n, t in self.declarations:
            if n == name:
                return t
        return None


class _Scope:
    """Lexical scope of local names (params and lets), chained to its parent."""

    def __init__(self, parent: "_Scope | None" = None):
        self.parent = parent
        self.names: dict[str, Binding] = {}

    def lookup(self, name: str) -> Binding | None:
        scope = self
        while scope is not None:
            if name in scope.names:
                return scope.names[name]
            scope = scope.parent
        return None

    def all_names(self) -> set[str]:
        out, scope = set(), self
        while scope is not None:
            out |= scope.names.keys()
            scope = scope.parent
        return out


@dataclass
class _Ctx:
    scope: _Scope
    local: bool                   # inside an `fn` or a lambda: no intrinsics, no placed values
    where: str                    # "fn `f`", "comp `g`", for messages


class _CheckAbort(Exception):
    pass


def check_module(module: ast.Module, file: str, name: str,
                 imports: dict[str, ModuleInterface]) -> CheckedModule:
    """Check one parsed module against the interfaces of its imports."""
    return _Checker(module, file, name, imports).run()


class _Checker:
    def __init__(self, module: ast.Module, file: str, name: str, imports: dict[str, ModuleInterface]):
        self.module, self.file, self.name = module, file, name
        self.imports = imports
        self.diagnostics: list[Diagnostic] = []
        self.avals: dict[int, AVal] = {}
        self.top: dict[str, Binding] = {}
        self.type_decls: dict[str, ast.TypeDecl] = {}
        self.resolved_types: dict[str, Type | object] = {}
        self.resolving: list[str] = []
        self.calls: dict[str, list[tuple[str, Span]]] = {}   # top-level name -> references to top-level fns
        self.current: str | None = None
        self.param_types: dict[int, list] = {}                # id(FunctionDecl) -> resolved parameter types

    # ---- driver ----------------------------------------------------------------------
    def run(self) -> CheckedModule:
        try:
            self._collect()
        except RecursionError:
            self.diagnostics.append(Diagnostic("E003", "a declaration nests too deeply for fedlang to check", None,
                                               help="name the inner parts of deep types with `type` declarations",
                                               file=self.file))
            return CheckedModule(self.file, self.module, ModuleInterface(self.name, {}), self.avals, [],
                                 self.diagnostics)
        declarations: list[tuple[str, str, Type | None]] = []
        for decl in self.module.decls:
            try:
                if isinstance(decl, ast.TypeDecl):
                    declarations.append(("type", decl.name, self._alias(decl.name)))
                elif isinstance(decl, ast.FunctionDecl):
                    self.current = decl.name
                    self._check_function_body(decl)
                    declarations.append(("comp" if decl.federated else "fn", decl.name,
                                         self._decl_type(decl.name)))
                elif isinstance(decl, ast.ProcessDecl):
                    self.current = decl.name
                    declarations.append(("process", decl.name, self._check_process(decl)))
            except RecursionError:
                self.error("E003", f"`{decl.name}` nests too deeply for fedlang to check", decl.name_span,
                           "too deep", help="split deeply nested expressions into let statements")
        self.current = None
        self._check_recursion()
        exported = {n: b for n, b in self.top.items() if b.kind != "module"}
        return CheckedModule(self.file, self.module, ModuleInterface(self.name, exported), self.avals,
                             declarations, self.diagnostics)

    def error(self, code: str, message: str, span: Span | None, label: str = "", help: str | None = None,
              notes: Iterable[str] = ()) -> None:
        self.diagnostics.append(Diagnostic(code, message, span, label, help, tuple(notes)))

    def _decl_type(self, name: str) -> Type | None:
        b = self.top.get(name)
        return None if b is None or b.aval.unknown else b.aval.type

    # ---- top-level names ----------------------------------------------------------------
    def _collect(self) -> None:
        seen: dict[str, Span] = {}

        def declare(name: str, span: Span) -> bool:
            if name in seen:
                first = seen[name]
                self.error("E031", f"`{name}` is defined twice", span, "defined again here",
                           notes=[f"first defined at {first}"], help="rename one of them")
                return False
            seen[name] = span
            return True

        for decl in self.module.decls:
            if isinstance(decl, ast.Import):
                if declare(decl.alias, decl.alias_span):
                    interface = self.imports.get(decl.alias)
                    self.top[decl.alias] = Binding("module", decl.alias_span, module=interface)
            elif isinstance(decl, ast.TypeDecl):
                if declare(decl.name, decl.name_span):
                    self.type_decls[decl.name] = decl
                    self.top[decl.name] = Binding("type", decl.name_span)
            elif isinstance(decl, (ast.FunctionDecl, ast.ProcessDecl)):
                declare(decl.name, decl.name_span)
        for name in self.type_decls:
            self.top[name] = Binding("type", self.type_decls[name].name_span, type=self._alias(name))
        for decl in self.module.decls:
            if isinstance(decl, ast.FunctionDecl) and self.top.get(decl.name) is None:
                self.top[decl.name] = Binding("comp" if decl.federated else "fn", decl.name_span,
                                              aval=self._signature(decl), top_level=decl.name)
        for decl in self.module.decls:
            if isinstance(decl, ast.ProcessDecl) and self.top.get(decl.name) is None:
                self.top[decl.name] = Binding("process", decl.name_span)

    def _duplicate_params(self, params: tuple[ast.Param, ...]) -> bool:
        seen: dict[str, ast.Param] = {}
        for p in params:
            if p.name in seen:
                self.error("E031", f"the parameter `{p.name}` is declared twice", p.span, "declared again",
                           notes=[f"first declared at {seen[p.name].span}"])
                return True
            seen[p.name] = p
        return False

    def _signature(self, decl: ast.FunctionDecl) -> AVal:
        duplicate = self._duplicate_params(decl.params)
        params = [self.resolve_type(p.type) for p in decl.params]
        result = self.resolve_type(decl.result)
        if not decl.federated:
            for i, (p, t) in enumerate(zip(decl.params, params)):
                if self._no_placement(t, p.type.span, f"the parameter `{p.name}` of fn `{decl.name}`"):
                    params[i] = UNKNOWN
            if self._no_placement(result, decl.result.span, f"the result of fn `{decl.name}`"):
                result = UNKNOWN
        self.param_types[id(decl)] = params
        if duplicate or any(t is UNKNOWN for t in params) or result is UNKNOWN:
            return AVal(UNKNOWN, arity=tuple(p.name for p in decl.params), federated_function=decl.federated)
        return AVal(FunctionType(_parameter_type(decl.params, params), result),
                    arity=tuple(p.name for p in decl.params), federated_function=decl.federated)

    def _no_placement(self, t: Type | object, span: Span, what: str) -> bool:
        """Report a placed type where a local function needs an unplaced one."""
        if t is not UNKNOWN and is_placed(t):
            self.error("E067", f"{what} is placed ({t}); an fn is a local computation", span, "placed type",
                       help="declare it with `comp` to work on placed values, or drop the placement")
            return True
        return False

    # ---- types ----------------------------------------------------------------------------
    def _alias(self, name: str) -> Type | object:
        if name in self.resolved_types:
            return self.resolved_types[name]
        decl = self.type_decls[name]
        if name in self.resolving:
            cycle = self.resolving[self.resolving.index(name):] + [name]
            self.error("E035", f"type alias `{name}` refers to itself ({' -> '.join(cycle)})", decl.name_span,
                       "recursive type", help="types cannot be recursive; spell the type out")
            self.resolved_types[name] = UNKNOWN
            return UNKNOWN
        self.resolving.append(name)
        t = self.resolve_type(decl.type)
        self.resolving.pop()
        self.resolved_types.setdefault(name, t)
        return self.resolved_types[name]

    def resolve_type(self, e: ast.TypeExpr) -> Type | object:
        """A type annotation -> a Type (UNKNOWN after reporting an error)."""
        try:
            return self._resolve_type(e)
        except RecursionError:
            self.error("E003", "this type nests too deeply for fedlang to check", e.span, "too deep",
                       help="name the inner parts with `type` declarations")
            return UNKNOWN

    def _resolve_type(self, e: ast.TypeExpr) -> Type | object:
        if isinstance(e, ast.TensorTypeExpr):
            if any(d is not None and d > 2 ** 31 - 1 for d in e.shape):
                self.error("E051", f"a dimension of {e.dtype}{list(e.shape)} is beyond 2**31 - 1", e.span,
                           "too large")
                return UNKNOWN
            return TensorType(e.dtype, e.shape)
        if isinstance(e, ast.StructTypeExpr):
            fields = [(n, self.resolve_type(f)) for n, f in e.fields]
            names = [n for n, _ in fields if n is not None]
            dup = next((n for n in names if names.count(n) > 1), None)
            if dup is not None:
                self.error("E051", f"the struct type names the field `{dup}` twice", e.span, "duplicate field")
                return UNKNOWN
            if any(t is UNKNOWN for _, t in fields):
                return UNKNOWN
            return StructType(tuple(fields))
        if isinstance(e, ast.SequenceTypeExpr):
            element = self.resolve_type(e.element)
            if element is UNKNOWN:
                return UNKNOWN
            try:
                return SequenceType(element)
            except TypeConstructionError as err:
                self.error("E051", str(err), e.span, "invalid sequence type",
                           help="a sequence holds tensors and structs of them, as a client's dataset does")
                return UNKNOWN
        if isinstance(e, ast.FunctionTypeExpr):
            parameter = None if e.parameter is None else self.resolve_type(e.parameter)
            result = self.resolve_type(e.result)
            if parameter is UNKNOWN or result is UNKNOWN:
                return UNKNOWN
            return FunctionType(parameter, result)
        if isinstance(e, ast.FederatedTypeExpr):
            member = self.resolve_type(e.member)
            if member is UNKNOWN:
                return UNKNOWN
            if is_placed(member):
                self.error("E064", f"placements cannot nest: the member {member} is already placed", e.span,
                           "nested placement", help="federated types cannot nest; drop the inner placement")
                return UNKNOWN
            if isinstance(member, FunctionType):
                self.error("E065", f"function types cannot be placed: {member}@{e.placement}", e.span,
                           "placed function", help="place the function's result instead, or use federated_eval")
                return UNKNOWN
            if e.placement == "SERVER" and not e.all_equal:
                self.error("E051", f"{{{member}}}@SERVER is not a type: the server holds one value", e.span,
                           help=f"write {member}@SERVER")
                return UNKNOWN
            try:
                return FederatedType(member, Placement(e.placement), e.all_equal)
            except TypeConstructionError as err:
                self.error("E064", str(err), e.span, "nested placement",
                           help="federated types cannot nest; drop the inner placement")
                return UNKNOWN
        if isinstance(e, ast.NamedTypeExpr):
            return self._named_type(e)
        raise AssertionError(f"unknown type expression {e!r}")

    def _named_type(self, e: ast.NamedTypeExpr) -> Type | object:
        if e.module is not None:
            b = self.top.get(e.module)
            if b is None or b.kind != "module":
                self.error("E030", f"unknown module `{e.module}`", e.span, "not imported",
                           help=self._did_you_mean(e.module, [n for n, x in self.top.items() if x.kind == "module"]))
                return UNKNOWN
            if b.module is None:
                return UNKNOWN
            member = b.module.names.get(e.name)
            if member is None or member.kind != "type":
                self.error("E034", f"module `{e.module}` has no type `{e.name}`", e.span, "unknown type",
                           help=self._did_you_mean(e.name, [n for n, x in b.module.names.items() if x.kind == "type"]))
                return UNKNOWN
            return member.type if member.type is not None else UNKNOWN
        if e.name in self.type_decls:
            return self._alias(e.name)
        b = self.top.get(e.name)
        if b is not None:
            self.error("E034", f"`{e.name}` is a {b.kind}, not a type", e.span, "not a type")
            return UNKNOWN
        self.error("E034", f"unknown type `{e.name}`", e.span, "unknown type",
                   help=self._did_you_mean(e.name, list(self.type_decls))
                   or "declare it with `type Name = ...` or use a dtype such as float32")
        return UNKNOWN

    def _did_you_mean(self, name: str, candidates: Iterable[str]) -> str | None:
        close = closest_names(name, candidates)
        if not close:
            return None
        return "did you mean " + " or ".join(f"`{c}`" for c in close) + "?"

    # ---- declarations ---------------------------------------------------------------------------
    def _check_function_body(self, decl: ast.FunctionDecl) -> None:
        binding = self.top.get(decl.name)
        if binding is None or binding.span is not decl.name_span:
            return                                   # a duplicate definition, already reported
        kind = "comp" if decl.federated else "fn"
        scope = _Scope()
        for p, t in zip(decl.params, self.param_types[id(decl)]):
            scope.names[p.name] = Binding("var", p.span, aval=AVal(t))
        ctx = _Ctx(scope, local=not decl.federated, where=f"{kind} `{decl.name}`")
        body = self.infer_body(decl.body, ctx)
        if binding.aval.unknown:
            return
        expected = binding.aval.type.result
        self.expect(expected, body, _result_span(decl.body), f"the result of {kind} `{decl.name}`",
                    _result_expr(decl.body))

    def _check_process(self, decl: ast.ProcessDecl) -> Type | None:
        binding = self.top.get(decl.name)
        fields: dict[str, tuple[Span, ast.Expr]] = {}
        for key, key_span, value in decl.fields:
            if key not in ("init", "next"):
                self.error("E054", f"a process has `init` and `next`, not `{key}`", key_span, "unknown field",
                           help=self._did_you_mean(key, ["init", "next"]) or "write process p(init = f, next = g)")
            elif key in fields:
                self.error("E054", f"`{key}` is given twice", key_span, "given again")
            else:
                fields[key] = (key_span, value)
        missing = [k for k in ("init", "next") if k not in fields]
        unknown_keys = any(key not in ("init", "next") for key, _, _ in decl.fields)
        if missing and not unknown_keys:
            self.error("E054", f"process `{decl.name}` has no `{missing[0]}`", decl.name_span,
                       help="write process p(init = initialize, next = round)")
        ctx = _Ctx(_Scope(), local=False, where=f"process `{decl.name}`")
        avals = {k: self.infer(v, ctx) for k, (_, v) in fields.items()}
        if missing or any(a.unknown for a in avals.values()):
            return None
        init, nxt = avals["init"], avals["next"]
        init_span, next_span = fields["init"][1].span, fields["next"][1].span
        it = init.type
        if not (isinstance(it, FunctionType) and it.parameter is None and isinstance(it.result, FederatedType)
                and it.result.placement is Placement.SERVER):
            self.error("E054", f"init must be a computation ( -> S@SERVER); this is {describe(it)}", init_span,
                       "not an initializer", help="init takes no parameter and returns the server state")
            return None
        state = it.result
        nt = nxt.type
        params = function_parameters(nxt)
        if not isinstance(nt, FunctionType) or not params:
            self.error("E054", f"next must be a computation taking the state {state}; this is {describe(nt)}",
                       next_span, "not a round")
            return None
        if not is_assignable(params[0], state):
            self.error("E054", f"the first parameter of next is {params[0]} but init returns the state {state}",
                       next_span, "state types differ", help="next takes the state init returns, as its first parameter")
            return None
        result = nt.result
        if isinstance(result, FederatedType):
            new_state, metrics = result, None
        elif isinstance(result, StructType) and result.names == ("state", "metrics"):
            new_state, metrics = result.types
        else:
            self.error("E054", f"next must return the new state S@SERVER or <state=S@SERVER,metrics=M@SERVER>; "
                               f"it returns {result}", next_span, "not a round")
            return None
        if not is_assignable(params[0], new_state):
            self.error("E054", f"next returns the state {new_state} but takes {params[0]}", next_span,
                       "state types differ", help="the state next returns is what the next round takes")
            return None
        if metrics is not None and Placement.CLIENTS in placements_in(metrics):
            self.error("E060", f"the metrics of next hold a value at CLIENTS: {metrics}", next_span,
                       "at CLIENTS", help="aggregate metrics to the server first (federated_mean, federated_sum)")
            return None
        t = StructType((("init", it), ("next", nt)))
        if binding is not None and binding.span is decl.name_span:
            self.top[decl.name] = Binding("process", decl.name_span, aval=AVal(t))
        return t

    def _check_recursion(self) -> None:
        reported: set[str] = set()
        for start in self.calls:
            path = self._cycle_from(start)
            if path and not (set(path) & reported):
                reported |= set(path)
                span = next(s for n, s in self.calls[path[-2]] if n == path[-1])
                chain = " -> ".join(path)
                self.error("E033", f"recursion is not supported: {chain}", span, "calls back into "
                           f"`{path[-1]}`", help="loops over data are written with reduce(seq, init, fn)")

    def _cycle_from(self, start: str) -> list[str] | None:
        stack, on_path = [(start, [start])], set()
        seen: set[str] = set()
        while stack:
            node, path = stack.pop()
            for callee, _ in self.calls.get(node, []):
                if callee == start:
                    return path + [start]
                if callee not in seen:
                    seen.add(callee)
                    stack.append((callee, path + [callee]))
        return None

    # ---- bodies and statements --------------------------------------------------------------
    def infer_body(self, body: ast.Expr | ast.Block, ctx: _Ctx) -> AVal:
        if not isinstance(body, ast.Block):
            return self.infer(body, ctx)
        scope = _Scope(ctx.scope)
        inner = _Ctx(scope, ctx.local, ctx.where)
        for let in body.lets:
            value = self.infer(let.value, inner)
            if not let.destructure:
                scope.names[let.names[0]] = Binding("var", let.span, aval=value,
                                                    static_function=self._is_static_function(let.value, inner))
                continue
            for name, aval in zip(let.names, self._destructure(let, value)):
                scope.names[name] = Binding("var", let.span, aval=aval)
        return self.infer(body.result, inner)

    def _destructure(self, let: ast.Let, value: AVal) -> list[AVal]:
        n = len(let.names)
        repeated = next((name for name in let.names if let.names.count(name) > 1), None)
        if repeated is not None:
            self.error("E031", f"the pattern binds `{repeated}` twice", let.span, "bound twice",
                       help="give every field its own name (use _1, _2 for fields you ignore)")
            return [UNKNOWN_AVAL] * n
        if value.unknown:
            return [UNKNOWN_AVAL] * n
        t = value.type
        if isinstance(t, FederatedType) and isinstance(t.member, StructType):
            fields = [FederatedType(f, t.placement, t.all_equal) for f in t.member.types]
        elif isinstance(t, StructType):
            fields = list(t.types)
        else:
            self.error("E052", f"only a struct can be destructured; this value is {describe(t)}", let.value.span,
                       "not a struct", help=f"bind it to one name: let {let.names[0]} = ...")
            return [UNKNOWN_AVAL] * n
        if len(fields) != n:
            self.error("E052", f"the pattern has {n} names but the struct has {len(fields)} fields: {t}",
                       let.span, f"{n} names", help="name every field, in order")
            return [UNKNOWN_AVAL] * n
        return [AVal(f) for f in fields]

    # ---- expressions ---------------------------------------------------------------------------
    def infer(self, e: ast.Expr, ctx: _Ctx) -> AVal:
        aval = self._infer(e, ctx)
        self.avals[id(e)] = aval
        return aval

    def _infer(self, e: ast.Expr, ctx: _Ctx) -> AVal:
        method = getattr(self, "_infer_" + type(e).__name__)
        return method(e, ctx)

    def _infer_IntLit(self, e: ast.IntLit, ctx: _Ctx) -> AVal:
        if e.value > 2 ** 63 - 1:
            self.error("E049", f"the integer literal {e.value} is too large", e.span, "out of range",
                       help="integers are at most int64 (9223372036854775807)")
            return UNKNOWN_AVAL
        return weak_scalar("int")

    def _infer_FloatLit(self, e: ast.FloatLit, ctx: _Ctx) -> AVal:
        return weak_scalar("float")

    def _infer_BoolLit(self, e: ast.BoolLit, ctx: _Ctx) -> AVal:
        return AVal(TensorType("bool"))

    def _infer_StringLit(self, e: ast.StringLit, ctx: _Ctx) -> AVal:
        return AVal(TensorType("string"))

    def _infer_DTypeLit(self, e: ast.DTypeLit, ctx: _Ctx) -> AVal:
        self.error("E049", f"the dtype `{e.dtype}` is not a value", e.span, "a dtype",
                   help="dtypes are arguments of cast, zeros, ones, e.g. cast(x, float32)")
        return UNKNOWN_AVAL

    def _infer_PlacementLit(self, e: ast.PlacementLit, ctx: _Ctx) -> AVal:
        self.error("E049", f"`{e.placement}` is a placement, not a value", e.span, "a placement",
                   help=f"placements are arguments of federated_value and federated_eval")
        return UNKNOWN_AVAL

    def _infer_ListLit(self, e: ast.ListLit, ctx: _Ctx) -> AVal:
        self.error("E049", "a list is only a static shape argument", e.span, "a list",
                   help="shapes are arguments of zeros, ones, reshape and random_*: zeros([64, 10])")
        return UNKNOWN_AVAL

    def _infer_Name(self, e: ast.Name, ctx: _Ctx) -> AVal:
        b = ctx.scope.lookup(e.id)
        if b is not None:
            if ctx.local and not b.aval.unknown and is_placed(b.aval.type):
                # Inside a local function every placed name is captured from a comp.
                self.error("E066", f"`{e.id}` is placed ({b.aval.type}) and a local function cannot use it",
                           e.span, "placed value", help="pass the value in as an argument, through federated_map")
                return UNKNOWN_AVAL
            return b.aval
        b = self.top.get(e.id)
        if b is not None:
            return self._top_level_value(e.id, b, e.span, ctx)
        if e.id in CALLABLE:
            self.error("E032", f"the builtin `{e.id}` can only be called, not used as a value", e.span,
                       "builtin", help=f"wrap it in a lambda: fn(x: T) -> U = {e.id}(x)")
            return UNKNOWN_AVAL
        candidates = ctx.scope.all_names() | set(self.top) | set(CALLABLE)
        self.error("E030", f"unknown name `{e.id}`", e.span, "not found",
                   help=self._did_you_mean(e.id, candidates))
        return UNKNOWN_AVAL

    def _top_level_value(self, name: str, b: Binding, span: Span, ctx: _Ctx, module: str | None = None) -> AVal:
        shown = name if module is None else f"{module}.{name}"
        if b.kind in ("fn", "comp"):
            if b.kind == "comp" and ctx.local:
                self.error("E063", f"the comp `{shown}` cannot be used inside {ctx.where}", span,
                           "federated computation",
                           help="an fn is local: only comps call comps and intrinsics")
                return UNKNOWN_AVAL
            if module is None and self.current is not None and b.top_level is not None:
                self.calls.setdefault(self.current, []).append((b.top_level, span))
            return b.aval
        if b.kind == "process":
            self.error("E043", f"the process `{shown}` is not a value", span, "process",
                       help="processes are run by `fedlang run`; use its init and next comps instead")
            return UNKNOWN_AVAL
        if b.kind == "type":
            self.error("E043", f"`{shown}` is a type, not a value", span, "type")
            return UNKNOWN_AVAL
        self.error("E043", f"`{shown}` is a module, not a value", span, "module",
                   help=f"select a name from it: {shown}.NAME")
        return UNKNOWN_AVAL

    def _infer_StructLit(self, e: ast.StructLit, ctx: _Ctx) -> AVal:
        fields, seen, bad = [], set(), False
        for name, value in e.fields:
            aval = self.infer(value, ctx)
            if name is not None:
                if name in seen:
                    self.error("E031", f"the field `{name}` is given twice", value.span, "given again")
                    bad = True
                seen.add(name)
            bad = bad or aval.unknown
            fields.append((name, strong(aval).type))
        return UNKNOWN_AVAL if bad else AVal(StructType(tuple(fields)))

    def _module_member(self, e: ast.Select, ctx: _Ctx) -> AVal | None:
        """`alias.name` where alias is an imported module; None if it is not one."""
        if not (isinstance(e.base, ast.Name) and ctx.scope.lookup(e.base.id) is None):
            return None
        b = self.top.get(e.base.id)
        if b is None or b.kind != "module":
            return None
        if b.module is None:
            return UNKNOWN_AVAL
        member = b.module.names.get(e.name)
        if member is None:
            self.error("E030", f"module `{e.base.id}` has no `{e.name}`", e.name_span, "not found",
                       help=self._did_you_mean(e.name, b.module.names))
            return UNKNOWN_AVAL
        return self._top_level_value(e.name, member, e.span, ctx, module=e.base.id)

    def _infer_Select(self, e: ast.Select, ctx: _Ctx) -> AVal:
        member = self._module_member(e, ctx)
        if member is not None:
            return member
        base = self.infer(e.base, ctx)
        if base.unknown:
            return UNKNOWN_AVAL
        t = base.type
        struct, placed = (t.member, t) if isinstance(t, FederatedType) else (t, None)
        if not isinstance(struct, StructType):
            self.error("E047", f"`.{e.name}` selects a struct field, but this value is {describe(t)}", e.base.span,
                       "not a struct")
            return UNKNOWN_AVAL
        field_type = struct.field(e.name)
        if field_type is None:
            names = [n for n in struct.names if n is not None]
            self.error("E045", f"{struct} has no field `{e.name}`", e.name_span, "no such field",
                       help=self._did_you_mean(e.name, names) or
                       (f"its fields are {', '.join(names)}" if names else "its fields are unnamed; use s[0]"))
            return UNKNOWN_AVAL
        if placed is not None:
            return AVal(FederatedType(field_type, placed.placement, placed.all_equal))
        return AVal(field_type)

    def _infer_Index(self, e: ast.Index, ctx: _Ctx) -> AVal:
        base = self.infer(e.base, ctx)
        t = base.type
        if base.unknown:
            self.infer(e.index, ctx)
            return UNKNOWN_AVAL
        struct, placed = (t.member, t) if isinstance(t, FederatedType) else (t, None)
        if isinstance(struct, StructType):
            k = _static_int(e.index)
            if k is None:
                self.error("E046", "a struct is indexed by an integer literal", e.index.span, "not static",
                           help="write s[0], s[1], ...")
                return UNKNOWN_AVAL
            if not -len(struct.fields) <= k < len(struct.fields):
                self.error("E046", f"index {k} is out of range for {struct} ({len(struct.fields)} fields)",
                           e.index.span, "out of range")
                return UNKNOWN_AVAL
            ft = struct.fields[k][1]
            return AVal(FederatedType(ft, placed.placement, placed.all_equal) if placed else ft)
        if placed is not None:
            self.error("E061", f"indexing a tensor is a local operation; this value is {t}", e.base.span,
                       "placed value", help=_lift_help(t))
            return UNKNOWN_AVAL
        if isinstance(t, TensorType):
            index = self.infer(e.index, ctx)
            if not index.unknown and not (index.weak == "int" or (
                    isinstance(index.type, TensorType) and index.type.shape == ()
                    and index.type.dtype in ("int8", "int16", "int32", "int64", "uint8"))):
                self.error("E046", f"a tensor is indexed by an integer scalar, not {describe(index.type)}",
                           e.index.span, "not an integer")
                return UNKNOWN_AVAL
            if t.rank == 0:
                self.error("E046", f"cannot index a scalar ({t})", e.base.span, "scalar")
                return UNKNOWN_AVAL
            return AVal(TensorType(t.dtype, t.shape[1:]))
        self.error("E046", f"cannot index {describe(t)}", e.base.span, "not indexable",
                   help="index structs (s[0]) and tensors (x[i])")
        return UNKNOWN_AVAL

    def _infer_BinOp(self, e: ast.BinOp, ctx: _Ctx) -> AVal:
        prim = OPERATORS[e.op]
        left, right = self.infer(e.left, ctx), self.infer(e.right, ctx)
        return self._apply_operator(prim, e, {"x": (left, e.left.span), "y": (right, e.right.span)})

    def _infer_UnaryOp(self, e: ast.UnaryOp, ctx: _Ctx) -> AVal:
        prim = OPERATORS["neg" if e.op == "-" else "not"]
        operand = self.infer(e.operand, ctx)
        return self._apply_operator(prim, e, {"x": (operand, e.operand.span)})

    def _apply_operator(self, prim: Primitive, e: ast.Expr, args: dict[str, tuple[AVal, Span]]) -> AVal:
        shown = prim.operator if prim.operator != "neg" else "-"
        for aval, span in args.values():
            if not aval.unknown and is_placed(aval.type):
                self.error("E061", f"`{shown}` works on unplaced values; this value is {aval.type}", span,
                           "placed value", help=_lift_help(aval.type))
                return UNKNOWN_AVAL
            if not aval.unknown and isinstance(aval.type, (FunctionType, SequenceType)):
                self.error("E044", f"`{shown}` works on tensors and structs of tensors, not on {describe(aval.type)}",
                           span, "not a tensor")
                return UNKNOWN_AVAL
        if any(aval.unknown for aval, _ in args.values()):
            return UNKNOWN_AVAL
        try:
            return prim.type_rule(*(aval for aval, _ in args.values()))
        except TypeRuleError as err:
            span = args[err.arg][1] if err.arg in args else e.span
            self.error(err.code, err.message, span, err.label or "", err.help)
            return UNKNOWN_AVAL

    def _infer_If(self, e: ast.If, ctx: _Ctx) -> AVal:
        cond = self.infer(e.cond, ctx)
        then, orelse = self.infer(e.then, ctx), self.infer(e.orelse, ctx)
        if not cond.unknown:
            if is_placed(cond.type):
                self.error("E061", f"`if` is local; its condition is placed ({cond.type})", e.cond.span,
                           "placed value", help="decide per client inside an fn applied with federated_map")
                return UNKNOWN_AVAL
            if cond.type != TensorType("bool"):
                self.error("E048", f"the condition of `if` must be a bool scalar, not {describe(cond.type)}",
                           e.cond.span, "not a bool", help="for elementwise choices use where(c, a, b)")
        if then.unknown or orelse.unknown:
            return UNKNOWN_AVAL
        for aval, span in ((then, e.then.span), (orelse, e.orelse.span)):
            if is_placed(aval.type):
                self.error("E061", f"`if` is local; this branch is placed ({aval.type})", span, "placed value",
                           help="choose inside an fn applied with federated_map or federated_apply")
                return UNKNOWN_AVAL
        joined = _join(then, orelse)
        if joined is None:
            self.error("E048", f"the branches of `if` differ: {strong(then).type} and {strong(orelse).type}",
                       e.span, "branches differ", help="both branches must have one type")
            return UNKNOWN_AVAL
        return joined

    def _infer_Lambda(self, e: ast.Lambda, ctx: _Ctx) -> AVal:
        duplicate = self._duplicate_params(e.params)
        scope = _Scope(ctx.scope)
        types = []
        for p in e.params:
            t = self.resolve_type(p.type)
            if self._no_placement(t, p.type.span, f"the parameter `{p.name}` of a lambda"):
                duplicate = True             # reported; the lambda's type is unknown from here on
            types.append(t)
            scope.names[p.name] = Binding("var", p.span, aval=AVal(t if not (t is not UNKNOWN and is_placed(t))
                                                                   else UNKNOWN))
        # Names of the enclosing scope stay visible (closures), but placed ones may not be used:
        # `_infer_Name` rejects them because the lambda's context is local.
        body = self.infer_body(e.body, _Ctx(scope, local=True, where="a lambda"))
        arity = tuple(p.name for p in e.params)
        result = UNKNOWN
        if e.result is not None:
            result = self.resolve_type(e.result)
            if result is not UNKNOWN:
                if self._no_placement(result, e.result.span, "the result of a lambda"):
                    result = UNKNOWN
                else:
                    self.expect(result, body, _result_span(e.body), "the result of this lambda",
                                _result_expr(e.body))
        elif not body.unknown:
            result = strong(body).type
        if duplicate or result is UNKNOWN or any(t is UNKNOWN for t in types):
            return AVal(UNKNOWN, arity=arity)
        return AVal(FunctionType(_parameter_type(e.params, types), result), arity=arity)

    # ---- calls -------------------------------------------------------------------------------------
    def _infer_Call(self, e: ast.Call, ctx: _Ctx) -> AVal:
        func = e.func
        if isinstance(func, ast.Name) and ctx.scope.lookup(func.id) is None and func.id not in self.top \
                and func.id in CALLABLE:
            return self._call_primitive(CALLABLE[func.id], e, ctx)
        callee = self.infer(func, ctx)
        args = [(a, self.infer(a.value, ctx)) for a in e.args]
        if callee.unknown:
            return UNKNOWN_AVAL
        if not isinstance(callee.type, FunctionType):
            self.error("E043", f"this value is not a function; it is {describe(callee.type)}", func.span,
                       "not callable")
            return UNKNOWN_AVAL
        return self._call_value(callee, e, args, ctx)

    def _call_value(self, callee: AVal, e: ast.Call, args: list[tuple[ast.Arg, AVal]], ctx: _Ctx) -> AVal:
        ft: FunctionType = callee.type
        shown = _callee_name(e.func)
        params = list(function_parameters(callee) or ())
        names = list(callee.arity) if callee.arity and len(callee.arity) == len(params) else None
        if len(params) == 1 and len(args) > 1 and isinstance(ft.parameter, StructType) \
                and len(ft.parameter.fields) == len(args):
            params = list(ft.parameter.types)                       # TFF's struct auto-unpacking
            names = [n for n in ft.parameter.names] if all(ft.parameter.names) else None
        ordered: list[tuple[ast.Arg, AVal] | None] = [None] * len(params)
        position = 0
        if self._positional_after_keyword([a for a, _ in args], shown):
            return UNKNOWN_AVAL
        for arg, aval in args:
            if arg.keyword is None:
                if position >= len(params):
                    self.error("E041", f"{shown} takes {_count(len(params), 'argument')} but gets {len(args)}",
                               arg.span, "one too many", notes=[f"{shown} is {ft}"])
                    return UNKNOWN_AVAL
                ordered[position] = (arg, aval)
                position += 1
                continue
            if names is None or arg.keyword not in names:
                self.error("E042", f"{shown} has no parameter `{arg.keyword}`", arg.span, "unknown keyword",
                           help=self._did_you_mean(arg.keyword, names or []) or f"{shown} is {ft}")
                return UNKNOWN_AVAL
            k = names.index(arg.keyword)
            if ordered[k] is not None:
                self.error("E042", f"the parameter `{arg.keyword}` of {shown} is given twice", arg.span,
                           "given again")
                return UNKNOWN_AVAL
            ordered[k] = (arg, aval)
        missing = [i for i, a in enumerate(ordered) if a is None]
        if missing:
            what = f"`{names[missing[0]]}`" if names else f"its {ORDINALS[missing[0]]} argument"
            self.error("E041", f"{shown} takes {_count(len(params), 'argument')}; {what} is missing", e.span,
                       "missing argument", notes=[f"{shown} is {ft}"])
            return UNKNOWN_AVAL
        if any(aval.unknown for _, aval in args):
            return UNKNOWN_AVAL
        if not callee.federated_function:
            placed = [(arg, aval) for arg, aval in args if is_placed(aval.type)]
            if placed:
                return self._placed_to_fn(shown, ft, ordered, placed)
        ok = True
        for i, ((arg, aval), expected) in enumerate(zip(ordered, params)):
            what = f"the {ORDINALS[i]} argument of {shown}"
            ok &= self.expect(expected, aval, arg.value.span, what, arg.value)
        return AVal(ft.result) if ok else UNKNOWN_AVAL

    def _positional_after_keyword(self, args: list[ast.Arg], shown: str) -> bool:
        seen_keyword = False
        for arg in args:
            if arg.keyword is not None:
                seen_keyword = True
            elif seen_keyword:
                self.error("E042", f"a positional argument of {shown} follows a keyword argument", arg.span,
                           "after a keyword argument", help="give positional arguments first, then keywords")
                return True
        return False

    def _placed_to_fn(self, shown: str, ft: FunctionType, ordered, placed) -> AVal:
        """An fn called on placed values: report, then go on as federated_map/apply would."""
        arg, aval = placed[0]
        self.error("E061", f"{shown} is a local function (fn); it cannot take a placed value, and this one is "
                           f"{aval.type}", arg.value.span, "placed value", help=_lift_help(aval.type, shown))
        placements = set().union(*(placements_in(a.type) for _, a in ordered))
        result = ft.result
        if len(placements) == 1 and not is_placed(result):
            (p,) = placements
            return AVal(FederatedType(result, p, p is Placement.SERVER))
        return UNKNOWN_AVAL

    def _call_primitive(self, prim: Primitive, e: ast.Call, ctx: _Ctx) -> AVal:
        if prim.federated and ctx.local:
            self.error("E063", f"the intrinsic {prim.name} cannot be called inside {ctx.where}", e.span,
                       "federated intrinsic", help="an fn is a local computation; call intrinsics from a comp")
            for a in e.args:
                self._infer_arg_quietly(a, ctx)
            return UNKNOWN_AVAL
        bound = self._bind(prim, e, ctx)
        if bound is None:
            return UNKNOWN_AVAL
        if prim.name in ("grad", "value_and_grad") and e.args and not bound[0]["f"].unknown \
                and not self._is_static_function(e.args[0].value, ctx):
            self.error("E053", f"{prim.name} needs a function known at compile time", e.args[0].value.span,
                       "chosen at run time", help="pass a named fn or a lambda, not a parameter or an `if`")
            return UNKNOWN_AVAL
        values, statics, spans = bound
        if any(v is not None and v.unknown for v in _flat_values(values)):
            return UNKNOWN_AVAL
        self._type_literal_accumulator(prim, e, values)
        if not prim.federated:
            for key, v in _named_values(values):
                if is_placed(v.type):
                    self.error("E061", f"{prim.name} is a local builtin; it cannot take a placed value, and this one "
                                       f"is {v.type}", spans[key], "placed value", help=_lift_help(v.type, prim.name))
                    return UNKNOWN_AVAL
        try:
            kwargs = {**statics}
            positional = []
            for p in prim.params:
                if p.kind != "value":
                    continue
                if prim.variadic and p is prim.params[-1]:
                    positional.extend(values[p.name])
                else:
                    kwargs[p.name] = values[p.name]
            if prim.variadic:
                fixed = [kwargs.pop(p.name) for p in prim.params[:-1] if p.kind == "value"]
                result = prim.type_rule(*fixed, *positional, **kwargs)
            else:
                result = prim.type_rule(**kwargs)
        except TypeRuleError as err:
            span = spans.get(err.arg, e.span) if err.arg else e.span
            self.error(err.code, err.message, span, err.label or "", err.help)
            return UNKNOWN_AVAL
        return result

    def _type_literal_accumulator(self, prim: Primitive, e: ast.Call, values: dict) -> None:
        """`reduce(seq, (s = 0.0, n = 0), f)`: the literal takes f's accumulator type."""
        keys = {"reduce": ("init", "f"), "federated_aggregate": ("zero", "accumulate")}.get(prim.name)
        if keys is None:
            return
        init_key, fn_key = keys
        params = parameters_for(values[fn_key], 2) if isinstance(values[fn_key].type, FunctionType) else None
        init_expr = self._arg_expr(prim, e, init_key)
        if params and init_expr is not None and self._literal_fits(init_expr, params[0]):
            values[init_key] = AVal(params[0])

    def _arg_expr(self, prim: Primitive, e: ast.Call, name: str) -> ast.Expr | None:
        positional = [a for a in e.args if a.keyword is None]
        names = [p.name for p in prim.params]
        for a in e.args:
            if a.keyword == name:
                return a.value
        index = names.index(name)
        return positional[index].value if index < len(positional) else None

    def _is_static_function(self, e: ast.Expr, ctx: _Ctx) -> bool:
        """Whether `e` is a function the compiler knows (grad transforms its body)."""
        if isinstance(e, ast.Lambda):
            return True
        if isinstance(e, ast.Name):
            b = ctx.scope.lookup(e.id)
            if b is not None:
                return b.static_function
            return e.id in self.top and self.top[e.id].kind in ("fn", "comp")
        if isinstance(e, ast.Select) and isinstance(e.base, ast.Name) and ctx.scope.lookup(e.base.id) is None:
            b = self.top.get(e.base.id)
            return b is not None and b.kind == "module"
        if isinstance(e, ast.Call) and isinstance(e.func, ast.Name) and e.func.id in ("grad", "value_and_grad") \
                and ctx.scope.lookup(e.func.id) is None and e.func.id not in self.top:
            return bool(e.args) and self._is_static_function(e.args[0].value, ctx)
        return False

    def _infer_arg_quietly(self, arg: ast.Arg, ctx: _Ctx) -> None:
        if not isinstance(arg.value, (ast.ListLit, ast.DTypeLit, ast.PlacementLit)):
            self.infer(arg.value, ctx)

    def _bind(self, prim: Primitive, e: ast.Call, ctx: _Ctx):
        """Match a primitive call's arguments to its parameters, evaluating statics."""
        params = list(prim.params)
        variadic = params[-1] if prim.variadic else None
        fixed = params[:-1] if variadic else params
        given: dict[str, ast.Arg] = {}
        rest: list[ast.Arg] = []
        position = 0
        if self._positional_after_keyword(list(e.args), prim.name):
            return None
        for arg in e.args:
            if arg.keyword is None:
                if position < len(fixed):
                    given[fixed[position].name] = arg
                    position += 1
                elif variadic is not None:
                    rest.append(arg)
                else:
                    self.error("E041", f"{prim.name} takes {_count(len(fixed), 'argument')} but gets "
                                       f"{len([a for a in e.args if a.keyword is None])}", arg.span,
                               "one too many", notes=[f"{prim.name}: {prim.signature}"])
                    return None
            else:
                names = [p.name for p in fixed]
                if arg.keyword not in names:
                    self.error("E042", f"{prim.name} has no parameter `{arg.keyword}`", arg.span, "unknown keyword",
                               help=self._did_you_mean(arg.keyword, names) or f"{prim.name}: {prim.signature}")
                    return None
                if arg.keyword in given:
                    self.error("E042", f"the parameter `{arg.keyword}` of {prim.name} is given twice", arg.span,
                               "given again")
                    return None
                given[arg.keyword] = arg
        values: dict[str, object] = {}
        statics: dict[str, object] = {}
        spans: dict[str, Span] = {}
        ok = True
        for p in fixed:
            arg = given.get(p.name)
            if arg is None:
                if p.default is REQUIRED:
                    self.error("E041", f"{prim.name} is missing its argument `{p.name}`", e.span,
                               "missing argument", notes=[f"{prim.name}: {prim.signature}"])
                    return None
                (values if p.kind == "value" else statics)[p.name] = p.default
                continue
            spans[p.name] = arg.value.span
            if p.kind == "value":
                values[p.name] = self.infer(arg.value, ctx)
            else:
                static = self._static(p.kind, p.name, prim, arg.value)
                ok &= static is not _BAD
                statics[p.name] = static
        if variadic is not None:
            if not rest and variadic.default is REQUIRED:
                self.error("E041", f"{prim.name} needs at least one value", e.span, "missing argument",
                           notes=[f"{prim.name}: {prim.signature}"])
                return None
            values[variadic.name] = [self.infer(a.value, ctx) for a in rest]
            for i, a in enumerate(rest):
                spans[f"{variadic.name}[{i}]"] = a.value.span
        return (values, statics, spans) if ok else None

    def _static(self, kind: str, name: str, prim: Primitive, e: ast.Expr) -> object:
        if kind == "int":
            k = _static_int(e)
            if k is not None and abs(k) > 2 ** 31 - 1:
                self.error("E049", f"`{name}` of {prim.name} is beyond 2**31 - 1", e.span, "too large")
                return _BAD
            if k is None:
                self.error("E049", f"`{name}` of {prim.name} must be an integer literal", e.span, "not static",
                           help=f"write a number, e.g. {name}=1")
                return _BAD
            return k
        if kind == "float":
            k = _static_float(e)
            if k is None:
                self.error("E049", f"`{name}` of {prim.name} must be a number literal", e.span, "not static",
                           help=f"write a number, e.g. {name}=1.0")
                return _BAD
            return k
        if kind == "shape":
            if isinstance(e, ast.ListLit):
                dims = [_static_int(i) for i in e.items]
                if all(d is not None for d in dims):
                    if any(abs(d) > 2 ** 31 - 1 for d in dims):
                        self.error("E049", f"the shape of {prim.name} has a dimension beyond 2**31 - 1", e.span,
                                   "too large")
                        return _BAD
                    return tuple(dims)
            self.error("E049", f"the shape of {prim.name} must be a list of integer literals", e.span,
                       "not a static shape", help="write it out, e.g. [64, 10]")
            return _BAD
        if kind == "dtype":
            if isinstance(e, ast.DTypeLit):
                return e.dtype
            self.error("E049", f"`{name}` of {prim.name} must be a dtype name", e.span, "not a dtype",
                       help="e.g. float32, int32, bool")
            return _BAD
        if kind == "placement":
            if isinstance(e, ast.PlacementLit):
                return Placement(e.placement)
            self.error("E049", f"`{name}` of {prim.name} must be CLIENTS or SERVER", e.span, "not a placement")
            return _BAD
        raise AssertionError(kind)

    # ---- expected types ------------------------------------------------------------------------
    def _literal_fits(self, expr: ast.Expr, expected: Type) -> bool:
        """A struct literal whose literal fields take the expected dtypes: `(0.0, 1)` fits
        `<float64,int64>` as each literal alone would."""
        aval = self.avals.get(id(expr))
        if aval is None or aval.unknown:
            return True
        if accepts(expected, aval):
            return True
        if not (isinstance(expr, ast.StructLit) and isinstance(expected, StructType)
                and len(expr.fields) == len(expected.fields)):
            return False
        return all(((en is None and n is None) or (en is not None and n in (en, None)))
                   and self._literal_fits(fe, ft)
                   for (n, fe), (en, ft) in zip(expr.fields, expected.fields))

    def expect(self, expected: Type, aval: AVal, span: Span, what: str, expr: ast.Expr | None = None) -> bool:
        """Report unless `aval` may be used where `expected` is required.

        When the value is a struct literal, point at the field that does not fit."""
        if accepts(expected, aval) or (expr is not None and self._literal_fits(expr, expected)):
            return True
        if isinstance(expr, ast.StructLit) and isinstance(expected, StructType) \
                and len(expected.fields) == len(expr.fields) and not aval.unknown:
            for i, ((name, field_expr), (expected_name, field_type)) in enumerate(zip(expr.fields, expected.fields)):
                field_aval = self.avals.get(id(field_expr))
                names_fit = (expected_name is None and name is None) or (
                    expected_name is not None and name in (expected_name, None))
                if field_aval is not None and names_fit and not accepts(field_type, field_aval):
                    label = f"field `{name}`" if name else f"the {ORDINALS[i]} field"
                    return self.expect(field_type, field_aval, field_expr.span, f"{label} of {what}", field_expr)
        self.diagnostics.append(_mismatch(expected, aval.type, span, what))
        return False


_BAD = object()


def _parameter_type(params: tuple[ast.Param, ...], types: list[Type]) -> Type | None:
    if not params:
        return None
    if len(params) == 1:
        return types[0]
    return StructType(tuple((p.name, t) for p, t in zip(params, types)))


def _result_expr(body: ast.Expr | ast.Block) -> ast.Expr:
    return body.result if isinstance(body, ast.Block) else body


def _result_span(body: ast.Expr | ast.Block) -> Span:
    return body.result.span if isinstance(body, ast.Block) else body.span


def _static_int(e: ast.Expr) -> int | None:
    if isinstance(e, ast.IntLit):
        return e.value
    if isinstance(e, ast.UnaryOp) and e.op == "-" and isinstance(e.operand, ast.IntLit):
        return -e.operand.value
    return None


def _static_float(e: ast.Expr) -> float | None:
    if isinstance(e, (ast.IntLit, ast.FloatLit)):
        return float(e.value)
    if isinstance(e, ast.UnaryOp) and e.op == "-" and isinstance(e.operand, (ast.IntLit, ast.FloatLit)):
        return -float(e.operand.value)
    return None


def _count(n: int, noun: str) -> str:
    if n == 0:
        return f"no {noun}"
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _callee_name(func: ast.Expr) -> str:
    if isinstance(func, ast.Name):
        return f"`{func.id}`"
    if isinstance(func, ast.Select) and isinstance(func.base, ast.Name):
        return f"`{func.base.id}.{func.name}`"
    return "the function"


def _lift_help(t: Type, fn: str | None = None) -> str:
    server = isinstance(t, FederatedType) and t.placement is Placement.SERVER
    if fn:
        target = fn.strip("`")
        return (f"apply it at the server with federated_apply({target}, x)" if server
                else f"apply it at each client with federated_map({target}, x)")
    if server:
        return "write the local work as an fn f and apply it at the server: federated_apply(f, x)"
    if isinstance(t, FederatedType):
        return "write the local work as an fn f and apply it at each client: federated_map(f, x)"
    return "do local work inside an fn and apply it with federated_map (CLIENTS) or federated_apply (SERVER)"


def _flat_values(values: dict[str, object]):
    for v in values.values():
        if isinstance(v, list):
            yield from v
        else:
            yield v


def _named_values(values: dict[str, object]):
    for k, v in values.items():
        if isinstance(v, list):
            for i, x in enumerate(v):
                yield f"{k}[{i}]", x
        elif v is not None:
            yield k, v


def _join(a: AVal, b: AVal) -> AVal | None:
    """The one type of two `if` branches (weak literals adapt, `?` absorbs)."""
    if a.weak and b.weak:     # the result depends on the condition: not a constant, so not weak
        return strong(a if a.weak == b.weak or a.weak == "float" else b)
    if a.weak and accepts(b.type, a):
        return AVal(b.type)
    if b.weak and accepts(a.type, b):
        return AVal(a.type)
    if is_assignable(a.type, b.type):
        return AVal(a.type)
    if is_assignable(b.type, a.type):
        return AVal(b.type)
    return None


def _first_difference(expected: Type, actual: Type) -> tuple[Type, Type]:
    """Descend while the two types have the same structure; return where they part."""
    if isinstance(expected, FederatedType) and isinstance(actual, FederatedType) \
            and expected.placement == actual.placement and expected.all_equal <= actual.all_equal:
        return _first_difference(expected.member, actual.member)
    if isinstance(expected, StructType) and isinstance(actual, StructType) \
            and len(expected.fields) == len(actual.fields):
        for (en, et), (an, at) in zip(expected.fields, actual.fields):
            if not is_assignable(et, at):
                return _first_difference(et, at)
    return expected, actual


def _mismatch(expected: Type, actual: Type, span: Span, what: str) -> Diagnostic:
    e, a = _first_difference(expected, actual)
    if isinstance(e, FederatedType) and isinstance(a, FederatedType) and e.placement != a.placement:
        if a.placement is Placement.CLIENTS:
            return Diagnostic("E060", f"{what} must be {expected}; this value is {actual}", span,
                              f"at CLIENTS", help="aggregate it with federated_sum or federated_mean first",
                              notes=("a value at CLIENTS reaches the server only through an aggregation",))
        return Diagnostic("E068", f"{what} must be {expected}; this value is {actual}", span, "at SERVER",
                          help="send it to the clients with federated_broadcast first")
    if isinstance(e, FederatedType) and isinstance(a, FederatedType) and e.all_equal and not a.all_equal:
        return Diagnostic("E040", f"{what} must be {expected}; this value is {actual}", span, "per-client values",
                          notes=(f"{e} is one value shared by all clients; {a} may differ per client",))
    if isinstance(e, FederatedType) and not isinstance(a, FederatedType):
        return Diagnostic("E040", f"{what} must be {expected}; this value is {actual}", span, "unplaced",
                          help=f"place it with federated_value(v, {e.placement})")
    if isinstance(a, FederatedType) and not isinstance(e, FederatedType):
        return Diagnostic("E061", f"{what} must be {expected}; this value is {actual}", span, f"at {a.placement}",
                          help=_lift_help(a))
    label = f"this is {actual}" if len(str(actual)) < 40 else "type mismatch"
    help_line = None
    if isinstance(e, TensorType) and isinstance(a, TensorType) and e.dtype != a.dtype:
        help_line = f"there is no implicit conversion; use cast(x, {e.dtype})"
    elif isinstance(e, StructType) and isinstance(a, StructType) and len(e.fields) == len(a.fields) \
            and e.names != a.names:
        help_line = "struct fields match by position and name; an unnamed field fits a named one, not the reverse"
    return Diagnostic("E040", f"{what} must be {expected}; this value is {actual}", span, label, help_line)
