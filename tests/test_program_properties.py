"""The checker against programs generated from the typing rules: every
well-typed program checks clean with the types the generator derived, and
every placement mutation of one is rejected with exactly the diagnostic the
language reference calls for, at the right place, and nothing else."""

from __future__ import annotations

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

import fedlang
from fedlang.syntax import ast
from fedlang.testing import strategies as fst
from fedlang.types import parse

FILE = "generated.fed"


def _check_clean(program: fst.GeneratedProgram):
    result = fedlang.check_source(program.source, FILE)
    assert result.ok, f"a well-typed program was rejected:\n{program.source}\n{result.render()}"
    assert not result.diagnostics, f"a well-typed program has warnings:\n{program.source}\n{result.render()}"
    return result


def _let_types(result) -> dict:
    """(declaration, let name) -> the type the checker inferred for the let's value."""
    checked = result.module()
    out = {}
    for decl in checked.module.decls:
        if isinstance(decl, ast.FunctionDecl) and isinstance(decl.body, ast.Block):
            for let in decl.body.lets:
                out[(decl.name, ",".join(let.names))] = checked.aval(let.value).type
    return out


@given(fst.programs())
def test_generated_programs_check_clean(program):
    _check_clean(program)


@given(fst.programs())
def test_declarations_have_the_generated_types(program):
    types = _check_clean(program).types()
    for name, expected in program.decl_types.items():
        assert name in types, f"`{name}` has no type:\n{program.source}"
        assert types[name] == expected, (f"`{name}`: the checker says {types[name]}, the rules say {expected}\n"
                                         f"{program.source}")
        assert parse(str(types[name])) == types[name]
    assert set(types) == set(program.decl_types)


@given(fst.programs())
def test_lets_have_the_generated_types(program):
    inferred = _let_types(_check_clean(program))
    event(f"lets: {min(len(program.let_types), 5)}")
    for key, expected in program.let_types.items():
        assert key in inferred, f"no let {key}:\n{program.source}"
        assert inferred[key] == expected, (f"let {key[1]} in `{key[0]}`: the checker infers {inferred[key]}, "
                                           f"the rules say {expected}\n{program.source}")


@given(fst.programs())
def test_checking_is_deterministic_and_independent_of_the_file_name(program):
    first = fedlang.check_source(program.source, FILE)
    second = fedlang.check_source(program.source, "elsewhere/other_name.fed")
    assert first.types() == second.types()


# Five mutation kinds, each a test of its own so every code is exercised equally.
_SPANS = {
    "E060": "the returned expression",
    "E061": "the placed argument",
    "E062": "the broadcast argument",
    "E063": "the whole intrinsic call",
    "E064": "the outer federated type",
}


@pytest.mark.parametrize("code", sorted(_SPANS))
@given(data=st.data())
def test_placement_mutations_are_one_diagnostic_at_the_right_place(code, data):
    program = data.draw(fst.programs(), label="program")
    bad = data.draw(fst.ill_placed(program, codes=(code,)), label="mutation")
    assert bad.code == code
    result = fedlang.check_source(bad.source, FILE)
    got = [(d.code, None if d.span is None else (d.span.line, d.span.column, d.span.end_line, d.span.end_column))
           for d in result.diagnostics]
    assert got == [(code, bad.span)], (f"{bad.rule}: expected {code} at {bad.span} ({_SPANS[code]}) and nothing "
                                       f"else\n{bad.source}\n{result.render()}")
    assert result.diagnostics[0].span.file == FILE
    assert f"error[{code}]" in result.render()


@pytest.mark.parametrize("source,code,span", [
    ("comp c(x: {float32}@CLIENTS) -> float32@SERVER = x\n", "E060", (1, 50, 1, 51)),
    ("fn f(x: float32) -> float32 = x\ncomp c(x: {float32}@CLIENTS) -> {float32}@CLIENTS = f(x)\n",
     "E061", (2, 55, 2, 56)),
    ("comp c(x: {float32}@CLIENTS) -> float32@CLIENTS = federated_broadcast(x)\n", "E062", (1, 71, 1, 72)),
    ("fn f(x: float32) -> float32 = federated_sum(x)\n", "E063", (1, 31, 1, 47)),
    ("type T = {float32@SERVER}@CLIENTS\n", "E064", (1, 10, 1, 34)),
])
def test_placement_errors_by_example(source, code, span):
    result = fedlang.check_source(source, FILE)
    d, = result.diagnostics
    assert (d.code, (d.span.line, d.span.column, d.span.end_line, d.span.end_column)) == (code, span)
