"""Typing and placement rules, one at a time, on small programs."""

from __future__ import annotations

import textwrap

import pytest

import fedlang
from fedlang.ir.types import parse
from fedlang.syntax import ast


def check(source: str, file: str = "t.fed"):
    return fedlang.check_source(textwrap.dedent(source), file)


def types_of(source: str) -> dict[str, str]:
    result = check(source)
    assert result.ok, result.render()
    return {name: str(t) for name, t in result.types().items()}


def codes(source: str) -> list[str]:
    return [d.code for d in check(source).diagnostics]


def expr_type(expr: str, params: str = "", prelude: str = "") -> str:
    """The inferred type of `expr` in an fn with `params`."""
    result = check(f"{prelude}\nfn probe({params}) -> bool {{ let probe_value = {expr}; return true }}")
    assert result.ok, result.render()
    decl = next(d for d in result.module().module.decls if getattr(d, "name", None) == "probe")
    return str(result.module().aval(decl.body.lets[0].value).type)


# ---- inference -----------------------------------------------------------------------

@pytest.mark.parametrize("expr, params, expected", [
    ("1", "", "int32"),
    ("1.5", "", "float32"),
    ("x * 2", "x: float64[3]", "float64[3]"),
    ("x + 2.0", "x: float16", "float16"),
    ("2 * 3 + x", "x: int64", "int64"),
    ("x + y", "x: float32[?,1], y: float32[4]", "float32[?,4]"),
    ("x + y", "x: float32[3,1], y: float32[1,5]", "float32[3,5]"),
    ("x == y", "x: int32[2], y: int32", "bool[2]"),
    ("not (x > 0.0) or true", "x: float32", "bool"),
    ("-x ** 2", "x: float32[2]", "float32[2]"),
    ("m - 0.1 * g", "m: <a=float32[2],b=float32>, g: <a=float32[2],b=float32>", "<a=float32[2],b=float32>"),
    ("m * v", "m: <a=float32[2],b=float32[2]>, v: float32[2]", "<a=float32[2],b=float32[2]>"),
    ("(a=x, b=(x, 1))", "x: float32", "<a=float32,b=<float32,int32>>"),
    ("s.b[1]", "s: <a=float32,b=<int32,bool>>", "bool"),
    ("s[-1]", "s: <a=float32,b=int8>", "int8"),
    ("x[0]", "x: float32[?,3]", "float32[3]"),
    ("matmul(x, w)", "x: float32[?,64], w: float32[64,32]", "float32[?,32]"),
    ("matmul(v, w)", "v: float32[64], w: float32[64,32]", "float32[32]"),
    ("matmul(x, v)", "x: float32[5,64], v: float32[64]", "float32[5]"),
    ("sum(x)", "x: int32[?,3]", "int32"),
    ("mean(x, axis=0)", "x: float32[?,3]", "float32[3]"),
    ("max(x, axis=-1)", "x: float32[4,3]", "float32[4]"),
    ("argmax(x, 1)", "x: float32[?,10]", "int32[?]"),
    ("one_hot(y, 10)", "y: int32[?]", "float32[?,10]"),
    ("cast(x, int64)", "x: float32[2]", "int64[2]"),
    ("cast(m, float64)", "m: <a=float32,b=int32[3]>", "<a=float64,b=float64[3]>"),
    ("reshape(x, [-1, 4])", "x: float32[2,6]", "float32[3,4]"),
    ("reshape(x, [-1])", "x: float32[?,6]", "float32[?]"),
    ("where(x > 0.0, x, 0.0)", "x: float32[5]", "float32[5]"),
    ("clip(x, 0, 1)", "x: float64[5]", "float64[5]"),
    ("global_norm(m)", "m: <a=float32[2],b=float32[3,3]>", "float32"),
    ("size(x)", "x: float32[?,3]", "int32"),
    ("zeros([64, 10])", "", "float32[64,10]"),
    ("ones([3], int32)", "", "int32[3]"),
    ("zeros_like(m)", "m: <a=float32[2],b=int32>", "<a=float32[2],b=int32>"),
    ("sqrt(m)", "m: <a=float32[2],b=float64>", "<a=float32[2],b=float64>"),
    ("maximum(x, 0.0)", "x: float32[3]", "float32[3]"),
    ("softmax(x)", "x: float32[?,10]", "float32[?,10]"),
    ("sparse_softmax_cross_entropy(y, logits)", "y: int32[?], logits: float32[?,10]", "float32[?]"),
    ("random_normal([2, 2], 0.1, 7)", "", "float32[2,2]"),
    ("random_uniform([3], -1.0, 1.0, seed)", "seed: int64", "float32[3]"),
    ("random_normal_like(m, 1.0, 3)", "m: <w=float32[2]>", "<w=float32[2]>"),
    ("if c then x else 0.0", "c: bool, x: float64", "float64"),
    ("reduce(d, 0.0, fn(a: float32, b: float32[?]) -> float32 = a + sum(b))", "d: float32[?]*", "float32"),
    ("map(d, fn(b: float32[?]) = mean(b))", "d: float32[?]*", "float32*"),
    ("count(d)", "d: <x=float32[?,2]>*", "int32"),
    ("num_examples(d)", "d: <x=float32[?,2]>*", "int32"),
    ("fn(a: float32, b: int32) = a", "", "(<a=float32,b=int32> -> float32)"),
    ("fn() -> float32 = 1.0", "", "( -> float32)"),
])
def test_inferred_types(expr, params, expected):
    assert expr_type(expr, params) == expected


GRAD_PRELUDE = """
type M = <w=float32[3],b=float32>
fn loss(m: M, x: float32[3]) -> float32 = sum(m.w * x) + m.b
fn loss1(w: float32[3]) -> float32 = sum(w * w)
"""


@pytest.mark.parametrize("expr, expected", [
    ("grad(loss)", "(<m=<w=float32[3],b=float32>,x=float32[3]> -> <w=float32[3],b=float32>)"),
    ("grad(loss)(m, x)", "<w=float32[3],b=float32>"),
    ("grad(loss1)(x)", "float32[3]"),
    ("value_and_grad(loss)(m, x)", "<float32,<w=float32[3],b=float32>>"),
    ("value_and_grad(loss)(m, x)[0]", "float32"),
])
def test_grad_types(expr, expected):
    assert expr_type(expr, "m: M, x: float32[3]", GRAD_PRELUDE) == expected


def test_weak_literals_adapt_to_parameters():
    assert types_of("""
        fn f(x: float64) -> float64 = x
        fn g() -> float64 = f(2.0)
        fn h(x: int8) -> int8 = x
        fn k() -> int8 = h(3)
    """)["g"] == "( -> float64)"


def test_let_keeps_weakness():
    result = check("fn f(x: float16) -> float16 { let lr = 0.5; return lr * x }")
    assert result.ok, result.render()


def test_declaration_types_and_order_independence():
    assert types_of("""
        comp b(t: {float32}@CLIENTS) -> float32@SERVER = federated_sum(federated_map(a, t))
        fn a(x: float32) -> float32 = x * 2.0
        type Pair = <x=float32,y=float32>
        fn pair() -> Pair = (1.0, 2.0)
    """) == {
        "b": "({float32}@CLIENTS -> float32@SERVER)",
        "a": "(float32 -> float32)",
        "Pair": "<x=float32,y=float32>",
        "pair": "( -> <x=float32,y=float32>)",
    }


def test_examples_check_clean_with_their_types():
    result = fedlang.check("examples/mean_temperature.fed", "examples/fedavg_digits.fed")
    assert result.ok, result.render()
    temps = result.types("examples/mean_temperature.fed")
    assert str(temps["mean_temperature"]) == "({float32}@CLIENTS -> float32@SERVER)"
    fedavg = result.types("examples/fedavg_digits.fed")
    model = "<w1=float32[64,32],b1=float32[32],w2=float32[32,10],b2=float32[10]>"
    batches = "{<x=float32[?,64],y=int32[?]>*}@CLIENTS"
    assert str(fedavg["round"]) == (f"(<model={model}@SERVER,data={batches}> -> "
                                     f"<state={model}@SERVER,metrics=<loss=float32,accuracy=float32>@SERVER>)")
    assert str(fedavg["fedavg"]).startswith(f"<init=( -> {model}@SERVER),next=")


# ---- federated intrinsics ----------------------------------------------------------------

@pytest.mark.parametrize("expr, params, expected", [
    ("federated_value(1.0, SERVER)", "", "float32@SERVER"),
    ("federated_value(zeros([2]), CLIENTS)", "", "float32[2]@CLIENTS"),
    ("federated_eval(fn() -> int32 = 3, CLIENTS)", "", "{int32}@CLIENTS"),
    ("federated_eval(fn() -> int32 = 3, SERVER)", "", "int32@SERVER"),
    ("federated_broadcast(s)", "s: float32@SERVER", "float32@CLIENTS"),
    ("federated_map(fn(x: float32) -> int32 = 1, c)", "c: {float32}@CLIENTS", "{int32}@CLIENTS"),
    ("federated_map(fn(x: float32, y: float32) = x * y, c, federated_broadcast(s))",
     "c: {float32}@CLIENTS, s: float32@SERVER", "{float32}@CLIENTS"),
    ("federated_map(fn(x: float32) = x, s)", "s: float32@SERVER", "float32@SERVER"),
    ("federated_apply(fn(x: float32) = x > 0.0, s)", "s: float32@SERVER", "bool@SERVER"),
    ("federated_zip(c, d)", "c: {float32}@CLIENTS, d: {int32}@CLIENTS", "{<float32,int32>}@CLIENTS"),
    ("federated_sum(c)", "c: {<a=int32,b=float32[2]>}@CLIENTS", "<a=int32,b=float32[2]>@SERVER"),
    ("federated_sum(c)", "c: int32@CLIENTS", "int32@SERVER"),
    ("federated_mean(c, weight=w)", "c: {float32[3]}@CLIENTS, w: {float32}@CLIENTS", "float32[3]@SERVER"),
    ("federated_min(c)", "c: {int32[2]}@CLIENTS", "int32[2]@SERVER"),
    ("federated_max(c)", "c: {float32}@CLIENTS", "float32@SERVER"),
    ("federated_secure_sum(c, 16)", "c: {int32[4]}@CLIENTS", "int32[4]@SERVER"),
    ("federated_aggregate(c, 0.0, fn(a: float32, x: float32) = a + x, fn(a: float32, b: float32) = a + b, "
     "fn(a: float32) = a > 1.0)", "c: {float32}@CLIENTS", "bool@SERVER"),
    ("s.a", "s: <a=float32,b=int32>@SERVER", "float32@SERVER"),
    ("c[1]", "c: {<a=float32,b=int32>}@CLIENTS", "{int32}@CLIENTS"),
])
def test_intrinsic_types(expr, params, expected):
    result = check(f"comp probe({params}) -> bool {{ let probe_value = {expr}; return true }}")
    assert result.ok, result.render()
    decl = result.module().module.decls[0]
    assert str(result.module().aval(decl.body.lets[0].value).type) == expected


def test_destructuring_a_placed_struct_keeps_placement():
    assert types_of("""
        comp f(s: <a=float32,b=int32>@SERVER) -> int32@SERVER { let (x, y) = s; return y }
    """)["f"] == "(<a=float32,b=int32>@SERVER -> int32@SERVER)"


def test_all_equal_is_assignable_to_per_client_but_not_back():
    assert codes("comp f(s: float32@CLIENTS) -> {float32}@CLIENTS = s") == []
    assert codes("comp f(s: {float32}@CLIENTS) -> float32@CLIENTS = s") == ["E040"]


def test_process_shapes():
    assert codes("""
        comp init() -> float32@SERVER = federated_value(0.0, SERVER)
        comp next(s: float32@SERVER, c: {float32}@CLIENTS) -> float32@SERVER = federated_mean(c)
        process p(init = init, next = next)
    """) == []
    assert codes("""
        comp init() -> float32@SERVER = federated_value(0.0, SERVER)
        comp next(s: float32@SERVER) -> <state=float32@SERVER,metrics=<a=float32@SERVER>> = (state=s, metrics=(a=s,))
        process p(init = init, next = next)
    """) == []
    assert codes("""
        comp init() -> float32@SERVER = federated_value(0.0, SERVER)
        comp next(s: int32@SERVER) -> int32@SERVER = s
        process p(init = init, next = next)
    """) == ["E054"]
    assert codes("""
        comp init() -> float32@SERVER = federated_value(0.0, SERVER)
        process p(init = init, nxt = init)
    """) == ["E054"]


# ---- errors: codes and spans ----------------------------------------------------------------

def first(source: str):
    result = check(source)
    assert result.diagnostics, "expected an error"
    return result.diagnostics[0]


def test_all_errors_are_reported_and_cascades_suppressed():
    result = check("""
        fn a(x: float32) -> float32 = x + undefined_name
        fn b(x: int32) -> int32 = x / 2
        comp c(t: {float32}@CLIENTS) -> float32@SERVER = t
        fn d(x: float32) -> float32 = a(a(a(y)))
    """)
    assert [d.code for d in result.diagnostics] == ["E030", "E050", "E060", "E030"]


def test_client_value_returned_as_server_value_points_at_the_value():
    d = first("comp f(t: {float32}@CLIENTS) -> <a=float32@SERVER> = (a=t,)")
    assert d.code == "E060"
    assert (d.span.line, d.span.column, d.span.end_column) == (1, 57, 58)     # the field `a=t`, not the struct
    assert d.message.startswith("field `a` of the result of comp `f` must be float32@SERVER")


def test_placed_value_to_fn_continues_as_federated_map():
    result = check("""
        fn f(x: float32) -> float32 = x
        comp g(t: {float32}@CLIENTS) -> float32@SERVER = federated_sum(f(t))
    """)
    assert [d.code for d in result.diagnostics] == ["E061"]
    assert "federated_map(f, x)" in result.diagnostics[0].help


@pytest.mark.parametrize("source, code", [
    ("comp f(s: {float32}@CLIENTS) -> float32@CLIENTS = federated_broadcast(s)", "E062"),
    ("fn f(x: float32) -> float32 { let y = federated_value(x, SERVER); return x }", "E063"),
    ("comp g() -> int32@SERVER = federated_value(1, SERVER)\nfn f() -> int32 { let h = g; return 1 }", "E063"),
    ("comp f(s: {float32@SERVER}@CLIENTS) -> int32 = 1", "E064"),
    ("comp f(s: float32@SERVER) -> int32@SERVER = federated_value(s, SERVER)", "E064"),
    ("comp f(s: (float32 -> float32)@SERVER) -> int32 = 1", "E065"),
    ("comp f(s: float32@SERVER) -> (float32 -> float32) = fn(x: float32) -> float32 = x + s", "E066"),
    ("fn f(x: float32@SERVER) -> float32 = 1.0", "E067"),
    ("comp f(s: float32@SERVER) -> float32@SERVER = federated_sum(s)", "E068"),
    ("comp f(s: float32@SERVER, c: {float32}@CLIENTS) -> {float32}@CLIENTS = "
     "federated_map(fn(a: float32, b: float32) = a, c, s)", "E068"),
    ("comp f(s: float32@SERVER) -> float32@SERVER = s * 2.0", "E061"),
    ("comp f(s: {float32}@CLIENTS) -> {float32}@CLIENTS = relu(s)", "E061"),
    ("comp f(s: float32@SERVER) -> float32 = if s > 0.0 then 1.0 else 2.0", "E061"),
])
def test_placement_errors(source, code):
    assert codes(source)[:1] == [code]


@pytest.mark.parametrize("source, code", [
    ("fn f(x: float32) -> float32 = x + y", "E030"),
    ("fn f(x: float32) -> float32 = x\nfn f(x: float32) -> float32 = x", "E031"),
    ("fn f(x: float32[?]*) -> float32[?]* = map(x, relu)", "E032"),
    ("fn f(x: float32) -> float32 = g(x)\nfn g(x: float32) -> float32 = f(x)", "E033"),
    ("fn f(x: Nope) -> float32 = 1.0", "E034"),
    ("type A = <a=B>\ntype B = A", "E035"),
    ("fn f(x: float32) -> int32 = x", "E040"),
    ("fn f(x: float32) -> float32 = relu(x, x)", "E041"),
    ("fn f(x: float32[2]) -> float32 = sum(x, axs=0)", "E042"),
    ("fn f(x: float32) -> float32 = x(2)", "E043"),
    ("fn f(x: float32, y: int32) -> float32 = x + y", "E044"),
    ("fn f(x: <a=float32>) -> float32 = x.b", "E045"),
    ("fn f(x: <a=float32>) -> float32 = x[1]", "E046"),
    ("fn f(x: float32) -> float32 = x.a", "E047"),
    ("fn f(x: float32) -> float32 = if x then 1.0 else 2.0", "E048"),
    ("fn f(x: float32[3]) -> float32 = sum(x, axis=3)", "E049"),
    ("fn f(x: int32) -> int32 = sqrt(x)", "E050"),
    ("fn f(x: float32@SERVER*) -> float32 = 1.0", "E051"),
    ("fn f(x: float32) -> float32 { let (a, b) = (x, x, x); return a }", "E052"),
    ("fn l(x: int32) -> float32 = 1.0\nfn f(x: int32) -> int32 = grad(l)(x)", "E053"),
    ("fn f(x: int32) -> int32 = x + 0.5", "E055"),
    ("fn f(x: float32[2,3], y: float32[2,3]) -> float32[2,3] = matmul(x, y)", "E056"),
])
def test_type_errors(source, code):
    assert codes(source)[:1] == [code]


def test_unknown_name_suggests_close_names():
    d = first("fn predict(x: float32) -> float32 = x\nfn f(x: float32) -> float32 = predcit(x)")
    assert d.code == "E030" and "`predict`" in d.help


def test_keyword_as_name_says_so():
    d = first("fn f(x: float32) -> float32 { let fn = x; return x }")
    assert d.code == "E001" and "keyword" in d.message


def test_shadowing_a_builtin_is_allowed():
    assert types_of("""
        fn mean(x: float32[?]) -> float32 = sum(x)
        fn g(x: float32[?]) -> float32 = mean(x)
    """)["g"] == "(float32[?] -> float32)"


# ---- modules --------------------------------------------------------------------------------

def test_std_import(tmp_path):
    path = tmp_path / "main.fed"
    path.write_text("import std.analytics as a\n"
                    "comp f(t: {float32}@CLIENTS) -> float32@SERVER = a.average(t)\n")
    result = fedlang.check(str(path))
    assert result.ok, result.render()


def test_relative_import_and_qualified_types(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "mlp.fed").write_text(
        "type Model = <w=float32[2]>\nfn zero() -> Model = (w=zeros([2]),)\n")
    (tmp_path / "main.fed").write_text(
        'import "models/mlp.fed" as mlp\nfn f(m: mlp.Model) -> mlp.Model = m + mlp.zero()\n')
    result = fedlang.check(str(tmp_path / "main.fed"))
    assert result.ok, result.render()
    assert str(result.types()["f"]) == "(<w=float32[2]> -> <w=float32[2]>)"


def test_import_cycle_names_the_cycle(tmp_path):
    (tmp_path / "a.fed").write_text('import "b.fed" as b\n')
    (tmp_path / "b.fed").write_text('import "a.fed" as a\n')
    result = fedlang.check(str(tmp_path / "a.fed"))
    assert [d.code for d in result.diagnostics] == ["E021"]
    assert "a.fed -> " in result.diagnostics[0].message and result.diagnostics[0].message.endswith("a.fed")


def test_missing_imports(tmp_path):
    (tmp_path / "a.fed").write_text('import "nope.fed" as n\nimport std.analytic as s\nimport foo.bar as f\n')
    result = fedlang.check(str(tmp_path / "a.fed"))
    assert [d.code for d in result.diagnostics] == ["E010", "E020", "E020"]
    assert "`std.analytics`" in result.diagnostics[1].help


def test_imported_module_errors_are_reported_in_that_file(tmp_path):
    (tmp_path / "lib.fed").write_text("fn broken(x: float32) -> int32 = x\n")
    (tmp_path / "main.fed").write_text('import "lib.fed" as lib\nfn f(x: float32) -> int32 = lib.broken(x)\n')
    result = fedlang.check(str(tmp_path / "main.fed"))
    assert [(d.code, d.span.file.endswith("lib.fed")) for d in result.diagnostics] == [("E040", True)]


# ---- parser: spans on every node -------------------------------------------------------------

def test_every_node_has_a_span_inside_its_parent():
    from fedlang.syntax.parser import parse_module

    text = open("examples/fedavg_digits.fed").read()
    module = parse_module(text, "x.fed")

    def children(node):
        for name in node.__dataclass_fields__:
            value = getattr(node, name)
            for item in (value if isinstance(value, tuple) else (value,)):
                for sub in (item if isinstance(item, tuple) else (item,)):
                    if isinstance(sub, ast.Node):
                        yield sub

    count = 0

    def visit(node):
        nonlocal count
        count += 1
        for child in children(node):
            assert node.span.contains(child.span), (node, child)
            visit(child)

    visit(module)
    assert count > 300


def test_type_notation_uses_the_language_grammar():
    assert str(parse("{<x=float32[?,64],y=int32[?]>*}@CLIENTS")) == "{<x=float32[?,64],y=int32[?]>*}@CLIENTS"
    assert str(fedlang.types.parse("(<a=int32,float32> -> float32@SERVER)")) == "(<a=int32,float32> -> float32@SERVER)"


def test_every_syntax_error_is_reported_once():
    result = check("fn f(x: float32) -> float32 = x +\n"
                   "fn g(x: float32) -> float32 = x\n"
                   "fn h(x: float32) -> = x\n"
                   "comp k() -> int32@SERVER = federated_value(1, SERVER)\n"
                   "type T = <a=float32\n")
    assert [(d.code, d.span.line, d.span.column) for d in result.diagnostics] == [
        ("E001", 2, 1), ("E001", 3, 21), ("E001", 6, 1)]
    assert result.diagnostics[1].help == "expected a type"


def test_deep_nesting_is_a_diagnostic_not_a_crash():
    assert check("fn f(x: float32) -> float32 = " + "(" * 3000 + "x" + ")" * 3000).ok   # parentheses add no depth
    result = check("fn f(x: float32) -> float32 = " + "-" * 3000 + "x")
    assert [(d.code, d.span.line, d.span.column) for d in result.diagnostics] == [("E003", 1, 4)]
