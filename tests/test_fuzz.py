"""Fuzzing the front end: whatever text or bytes it is given, checking returns
a result with diagnostics and never raises (LANGUAGE.md section 7: a Python
traceback shown to a user is a bug)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import fedlang
from fedlang.api import CheckResult
from fedlang.diagnostics import to_json
from fedlang.testing import strategies as fst

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
FEDAVG = (EXAMPLES / "fedavg_digits.fed").read_text(encoding="utf-8")
MEAN_TEMPERATURE = (EXAMPLES / "mean_temperature.fed").read_text(encoding="utf-8")

_KEYWORDS = "import as type fn comp process let return if then else and or not true false CLIENTS SERVER".split()
_DTYPES = "bool int8 int16 int32 int64 uint8 float16 float32 float64 string".split()
_BUILTINS = ("matmul relu sum mean cast reshape zeros ones grad value_and_grad reduce map count num_examples "
             "random_normal federated_value federated_eval federated_broadcast federated_map federated_apply "
             "federated_zip federated_sum federated_mean federated_aggregate federated_secure_sum").split()
_PUNCTUATION = ["(", ")", "{", "}", "[", "]", "<", ">", ",", ";", ":", ".", "=", "==", "!=", "<=", ">=", "+", "-",
                "*", "/", "%", "**", "->", "@", "?", "#", "\n"]
_LITERALS = ["0", "1", "42", "0.1", "1e-3", "2.5E+1", '"std"', '"x.fed"', '"\\q"', "99999999999999999999999",
             "std.learning", "weight=", "axis=", "x", "y", "m", "f", "Model", "data"]
TOKENS = _KEYWORDS + _DTYPES + _BUILTINS + _PUNCTUATION + _LITERALS

_SEPARATORS = st.sampled_from([" ", " ", "\n", "", "\t", " # comment\n"])


def _check_never_raises(text: str, file: str = "fuzz.fed", events: bool = True) -> CheckResult:
    result = fedlang.check_source(text, file)
    assert isinstance(result, CheckResult)
    _inspect(result, events)
    return result


def _inspect(result: CheckResult, events: bool = True) -> None:
    """Everything a user can ask of a result works, whatever the input was."""
    if events:
        event("ok" if result.ok else "rejected")
    result.render()
    for d in result.diagnostics:
        assert re.fullmatch(r"[EW]\d{3}", d.code), d
        to_json(d)
        if d.span is not None:
            assert d.span.line >= 1 and d.span.column >= 1
            assert (d.span.end_line, d.span.end_column) >= (d.span.line, d.span.column)
    if result.ok:
        result.types()


@st.composite
def token_soups(draw) -> str:
    tokens = draw(st.lists(st.sampled_from(TOKENS), max_size=60))
    separators = draw(st.lists(_SEPARATORS, min_size=len(tokens), max_size=len(tokens)))
    return "".join(t + s for t, s in zip(tokens, separators))


@given(token_soups())
def test_token_soups_never_raise(text):
    _check_never_raises(text)


@given(st.sampled_from(["fn f(x: float32) -> float32 = ", "comp c(x: {float32}@CLIENTS) -> float32@SERVER = ",
                        "type T = ", "fn f() -> float32 { let a = ", "process p(init = "]),
       token_soups())
def test_token_soups_after_a_declaration_head_never_raise(head, text):
    # a valid head gets the soup past the first token, into expressions and types
    _check_never_raises(head + text)


@given(st.text(max_size=200))
def test_random_text_never_raises(text):
    _check_never_raises(text)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=200))
def test_random_bytes_in_a_file_never_raise(tmp_path, data):
    path = tmp_path / "fuzz.fed"
    path.write_bytes(data)
    _inspect(fedlang.check(str(path)))


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_example_files_never_raise(tmp_path, data):
    raw = bytearray(FEDAVG.encode("utf-8"))
    for _ in range(data.draw(st.integers(1, 4), label="corruptions")):
        i = data.draw(st.integers(0, len(raw)), label="at")
        raw[i:i + data.draw(st.integers(0, 3))] = data.draw(st.binary(max_size=3), label="bytes")
    path = tmp_path / "fedavg.fed"
    path.write_bytes(bytes(raw))
    _inspect(fedlang.check(str(path)))


_TOKEN = re.compile(r"\s+|#[^\n]*|\"[^\"\n]*\"|[A-Za-z_][A-Za-z0-9_]*|[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
                    r"|->|\*\*|[=!<>]=|.", re.S)


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


@st.composite
def token_mutations(draw, text: str) -> str:
    """`text` with a few of its tokens deleted, duplicated, swapped or replaced."""
    tokens = _tokens(text)
    for _ in range(draw(st.integers(1, 3))):
        if not tokens:
            break
        i = draw(st.integers(0, len(tokens) - 1))
        j = draw(st.integers(0, len(tokens) - 1))
        op = draw(st.sampled_from(["delete", "duplicate", "swap", "replace", "move"]))
        if op == "delete":
            del tokens[i]
        elif op == "duplicate":
            tokens.insert(i, tokens[i])
        elif op == "swap":
            tokens[i], tokens[j] = tokens[j], tokens[i]
        elif op == "replace":
            tokens[i] = draw(st.sampled_from(TOKENS + tokens))
        else:
            tokens.insert(j, tokens.pop(i))
    return "".join(tokens)


def test_the_token_splitter_loses_nothing():
    assert "".join(_tokens(FEDAVG)) == FEDAVG


@given(token_mutations(FEDAVG))
def test_token_mutations_of_fedavg_never_raise(text):
    _check_never_raises(text, "examples/fedavg_digits.fed")


@given(token_mutations(MEAN_TEMPERATURE))
def test_token_mutations_of_mean_temperature_never_raise(text):
    _check_never_raises(text, "examples/mean_temperature.fed")


@given(st.data())
def test_character_mutations_of_fedavg_never_raise(data):
    text = FEDAVG
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(text) - 1))
        op = data.draw(st.sampled_from(["delete", "duplicate", "swap", "insert"]))
        if op == "delete":
            text = text[:i] + text[i + 1:]
        elif op == "duplicate":
            text = text[:i] + text[i] + text[i:]
        elif op == "swap" and i + 1 < len(text):
            text = text[:i] + text[i + 1] + text[i] + text[i + 2:]
        else:
            text = text[:i] + data.draw(st.sampled_from(list("(){}[]<>,;:.=+-*/@?#\"\n x0"))) + text[i:]
    _check_never_raises(text)


@given(st.data())
def test_token_mutations_of_generated_programs_never_raise(data):
    # well-typed programs one or two edits away from valid reach the checker's
    # error paths with rich types, where a crash is likeliest
    program = data.draw(fst.programs(max_decls=3), label="program")
    _check_never_raises(data.draw(token_mutations(program.source), label="mutated"))


# ---- nesting far deeper than a person writes: a diagnostic (E003 or another), never a RecursionError ----

_DEEP = [
    pytest.param(lambda n: "type T = " + "<" * n + ">" * n + "\n", id="struct-type"),
    pytest.param(lambda n: "type T = " + "( -> " * n + "float32" + ")" * n + "\n", id="function-type"),
    pytest.param(lambda n: "comp c(x: {" + "<" * n + ">" * n + "}@CLIENTS) -> {<>}@CLIENTS = x\n",
                 id="placed-struct-type"),
    pytest.param(lambda n: "type T = float32" + "*" * n + "\n", id="sequence-type"),
    pytest.param(lambda n: "fn f() -> float32 = " + "(" * n + "1.0" + ")" * n + "\n", id="parentheses"),
    pytest.param(lambda n: "fn f() -> float32 = " + "(a=" * n + "1.0" + ")" * n + "\n", id="struct-literal"),
    pytest.param(lambda n: "fn g(x: float32) -> float32 = x\nfn f() -> float32 = " + "g(" * n + "1.0" + ")" * n + "\n",
                 id="calls"),
    pytest.param(lambda n: "fn f() -> float32 = " + "if true then " * n + "1.0" + " else 2.0" * n + "\n", id="if"),
    pytest.param(lambda n: "fn f() -> float32 = " + "(fn() = " * n + "1.0" + ")()" * n + "\n", id="lambdas"),
    pytest.param(lambda n: "fn f(x: <a=float32>) -> float32 = x" + ".a" * n + "\n", id="selections"),
    pytest.param(lambda n: "fn f() -> float32 = " + "-" * n + "1.0\n", id="negations"),
    pytest.param(lambda n: "fn f() -> float32 = " + " + ".join(["1.0"] * n) + "\n", id="sum-chain"),
    pytest.param(lambda n: "fn f() -> float32 = " + "2.0 ** " * n + "1.0\n", id="power-chain"),
    pytest.param(lambda n: "fn f() -> float32 {\n" + "".join(f"let a{i} = {'1.0' if i == 0 else f'a{i - 1} + 1.0'}\n"
                                                          for i in range(n)) + f"return a{n - 1}\n}}\n", id="lets"),
]


@pytest.mark.parametrize("make", _DEEP)
def test_deep_nesting_never_raises(make):
    for depth in (1000, 5000):
        _check_never_raises(make(depth), events=False)


@pytest.mark.parametrize("text", ["<" * 5000 + ">" * 5000, "( -> " * 5000 + "float32" + ")" * 5000,
                                  "{" * 5000 + "float32" + "}@CLIENTS" * 5000, "float32" + "@SERVER" * 5000])
def test_deeply_nested_type_notation_raises_only_fedlang_error(text):
    from fedlang.diagnostics import FedlangError
    from fedlang.types import parse
    try:
        parse(text)
    except FedlangError as error:
        assert error.diagnostics
