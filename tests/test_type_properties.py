"""Properties of the type notation and of assignability (LANGUAGE.md section 2),
checked on random types from fedlang.testing.strategies."""

from __future__ import annotations

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from fedlang.diagnostics import FedlangError
from fedlang.testing import strategies as fst
from fedlang.types import (FederatedType, FunctionType, Placement, SequenceType, StructType, TensorType,
                           TypeConstructionError, is_assignable, parse)

CLIENTS, SERVER = Placement.CLIENTS, Placement.SERVER
F32, I32 = TensorType("float32"), TensorType("int32")


# ---- printing and parsing -----------------------------------------------------------------------

@given(fst.types())
def test_printed_types_parse_back_equal(t):
    assert parse(str(t)) == t


@given(fst.types(max_depth=4, placed=False))
def test_deep_unplaced_types_parse_back_equal(t):
    assert parse(str(t)) == t


EXAMPLES = [
    (SequenceType(StructType((("x", TensorType("float32", (None, 64))), ("y", TensorType("int32", (None,)))))),
     "<x=float32[?,64],y=int32[?]>*"),
    (FunctionType(None, I32), "( -> int32)"),
    (FederatedType(F32, CLIENTS, False), "{float32}@CLIENTS"),
    (FederatedType(F32, CLIENTS, True), "float32@CLIENTS"),
    (FederatedType(F32, SERVER, True), "float32@SERVER"),
    (StructType(()), "<>"),
    (StructType(((None, F32), (None, I32))), "<float32,int32>"),
    (StructType((("a", F32), ("b", TensorType("int32", (2,))))), "<a=float32,b=int32[2]>"),
    (FunctionType(StructType((("a", F32), ("b", I32))), TensorType("bool")), "(<a=float32,b=int32> -> bool)"),
    (FederatedType(SequenceType(StructType((("x", TensorType("float32", (None, 64))),))), CLIENTS, False),
     "{<x=float32[?,64]>*}@CLIENTS"),
    (FunctionType(FederatedType(F32, CLIENTS, False), FederatedType(F32, SERVER, True)),
     "({float32}@CLIENTS -> float32@SERVER)"),
    (TensorType("uint8", (0, None, 3)), "uint8[0,?,3]"),
    (FunctionType(FunctionType(None, F32), F32), "(( -> float32) -> float32)"),
]


@pytest.mark.parametrize("t,text", EXAMPLES, ids=[text for _, text in EXAMPLES])
def test_printing_is_tffs_notation(t, text):
    assert str(t) == text
    assert parse(text) == t


@pytest.mark.parametrize("text", ["float32[ ?, 64 ]", " < x = float32 , y = int32[?] > * ", "{ float32 } @ CLIENTS"])
def test_notation_ignores_whitespace(text):
    assert str(parse(text)) == text.replace(" ", "")


def test_a_sequence_of_sequences_is_either_rejected_or_printed_parseably():
    # `T**` would lex as the `**` operator: a nested sequence must not exist, or print otherwise
    try:
        t = SequenceType(SequenceType(F32))
    except TypeConstructionError:
        return
    assert parse(str(t)) == t


_TYPE_TOKENS = ["float32", "int32", "bool", "string", "uint8", "[", "]", "?", "0", "3", "64", "<", ">", "=", ",",
                "a", "b", "x", "{", "}", "@", "CLIENTS", "SERVER", "*", "(", ")", "->", "-", ">", " ", "fn", "Foo",
                "9999999999999999999999", ".", "#", "\n", "\"s\""]


def _parses_or_fails_cleanly(text: str) -> None:
    try:
        t = parse(text)
    except FedlangError as error:
        assert error.diagnostics, "a FedlangError must carry its diagnostics"
        assert all(d.code[0] in "EW" for d in error.diagnostics)
        str(error)                                   # rendering never raises either
        event("rejected")
        return
    event("parsed")
    assert parse(str(t)) == t


@given(st.lists(st.sampled_from(_TYPE_TOKENS), max_size=25).map("".join))
def test_bad_notation_raises_only_fedlang_error(text):
    _parses_or_fails_cleanly(text)


@given(st.text(max_size=40))
def test_random_text_as_a_type_raises_only_fedlang_error(text):
    _parses_or_fails_cleanly(text)


@given(st.data())
def test_a_printed_type_with_one_character_changed_raises_only_fedlang_error(data):
    text = str(data.draw(fst.types()))
    i = data.draw(st.integers(0, len(text)))
    replacement = data.draw(st.sampled_from(["", "?", "@", "{", "}", "<", ">", ",", "*", "-", "=", "x", "0"]))
    _parses_or_fails_cleanly(text[:i] + replacement + text[i + 1:])


@pytest.mark.parametrize("text,code", [("{float32}@SERVER", "E051"), ("<a=int32,a=int32>", "E051"),
                                       ("Foo", "E034"), ("float32[", "E001"), ("float32 float32", "E001"),
                                       ("float32$", "E002")])
def test_invalid_types_are_diagnosed(text, code):
    with pytest.raises(FedlangError) as info:
        parse(text)
    assert [d.code for d in info.value.diagnostics] == [code]


@pytest.mark.parametrize("text", ["{float32@SERVER}@CLIENTS", "<a=int32@CLIENTS>@SERVER", "(float32 -> int32)@SERVER",
                                  "float32@CLIENTS*"])
def test_types_that_cannot_exist_are_one_diagnostic(text):
    with pytest.raises(FedlangError) as info:
        parse(text)
    assert len(info.value.diagnostics) == 1


# ---- assignability ------------------------------------------------------------------------------

@given(fst.types())
def test_assignability_is_reflexive(t):
    assert is_assignable(t, t)


@given(st.data())
def test_supertypes_accept_and_subtypes_are_accepted(data):
    t = data.draw(fst.types(), label="t")
    wider = data.draw(fst.supertypes(t), label="wider")
    narrower = data.draw(fst.subtypes(t), label="narrower")
    assert is_assignable(wider, t)
    assert is_assignable(t, narrower)


@given(st.data())
def test_assignability_is_transitive(data):
    # a <= b <= c built by widening twice (and z <= a by narrowing), so the
    # premises always hold and the conclusion is really tested.
    a = data.draw(fst.types(), label="a")
    b = data.draw(fst.supertypes(a), label="b")
    c = data.draw(fst.supertypes(b), label="c")
    z = data.draw(fst.subtypes(a), label="z")
    assert is_assignable(b, a) and is_assignable(c, b) and is_assignable(a, z)
    event("strict chain" if a != b != c else "chain with equal steps")
    assert is_assignable(c, a)
    assert is_assignable(c, z)
    assert is_assignable(b, z)


_TINY_TENSORS = st.builds(TensorType, st.just("float32"), st.sampled_from([(), (1,), (None,)]))
_TINY = {
    # a small universe (one dtype, dims 1 or ?, names a or none), one kind at a
    # time, where independent draws are often related: chains occur unbuilt
    "tensor": _TINY_TENSORS,
    "struct": st.builds(lambda n, t: StructType(((n, t),)), st.sampled_from([None, "a"]), _TINY_TENSORS),
    "federated": st.builds(lambda t, e: FederatedType(t, CLIENTS, e), _TINY_TENSORS, st.booleans()),
    "function": st.builds(FunctionType, _TINY_TENSORS, _TINY_TENSORS),
}


@given(st.data())
def test_assignability_is_transitive_on_independent_types(data):
    kind = data.draw(st.sampled_from(sorted(_TINY)), label="kind")
    a, b, c = (data.draw(_TINY[kind], label=label) for label in "abc")
    if is_assignable(b, a) and is_assignable(c, b):
        event("chain")
        assert is_assignable(c, a)
    if is_assignable(a, b) and is_assignable(b, a):
        assert a == b


@given(st.data())
def test_assignability_is_antisymmetric(data):
    a = data.draw(fst.types(), label="a")
    b = data.draw(fst.supertypes(a), label="b")
    # b accepts a; a accepts b back only when nothing was widened
    assert is_assignable(a, b) == (a == b)


@given(fst.types(placed=False, functions=False))
def test_all_equal_clients_is_assignable_to_clients_but_not_back(t):
    all_equal, per_client = FederatedType(t, CLIENTS, True), FederatedType(t, CLIENTS, False)
    assert is_assignable(per_client, all_equal)
    assert not is_assignable(all_equal, per_client)
    server = FederatedType(t, SERVER, True)
    for placed in (all_equal, per_client):          # no implicit placement change
        assert not is_assignable(server, placed)
        assert not is_assignable(placed, server)
        assert not is_assignable(t, placed)
        assert not is_assignable(placed, t)


@given(st.data())
def test_functions_are_contravariant_in_the_parameter(data):
    p = data.draw(fst.types(max_depth=2), label="p")
    r = data.draw(fst.types(max_depth=2), label="r")
    wider_p = data.draw(fst.supertypes(p), label="wider_p")
    wider_r = data.draw(fst.supertypes(r), label="wider_r")
    # a function that takes more and returns less fits where one taking p and returning wider_r is expected
    assert is_assignable(FunctionType(p, wider_r), FunctionType(wider_p, r))
    if wider_p != p:
        assert not is_assignable(FunctionType(wider_p, r), FunctionType(p, r))
    if wider_r != r:
        assert not is_assignable(FunctionType(p, r), FunctionType(p, wider_r))
    assert not is_assignable(FunctionType(None, r), FunctionType(p, r))
    assert not is_assignable(FunctionType(p, r), FunctionType(None, r))


def test_assignability_examples_from_the_language_reference():
    assert is_assignable(parse("float32[?]"), parse("float32[3]"))
    assert not is_assignable(parse("float32[3]"), parse("float32[?]"))
    assert not is_assignable(parse("float64"), parse("float32"))            # no dtype promotion
    assert is_assignable(parse("<a=float32,b=int32>"), parse("<float32,int32>"))
    assert not is_assignable(parse("<float32,int32>"), parse("<a=float32,b=int32>"))
    assert not is_assignable(parse("<a=float32>"), parse("<b=float32>"))
    assert not is_assignable(parse("<b=float32,a=float32>"), parse("<a=float32,b=float32>"))   # in order
    assert is_assignable(parse("{float32}@CLIENTS"), parse("float32@CLIENTS"))
    assert not is_assignable(parse("float32@SERVER"), parse("float32@CLIENTS"))
    assert is_assignable(parse("(float32[3] -> float32[?])"), parse("(float32[?] -> float32[3])"))
    assert not is_assignable(parse("(float32[?] -> float32)"), parse("(float32[3] -> float32)"))


@pytest.mark.parametrize("build", [
    lambda: FederatedType(FederatedType(F32, SERVER, True), CLIENTS, False),
    lambda: FederatedType(StructType((("a", FederatedType(F32, SERVER, True)),)), CLIENTS, True),
    lambda: FederatedType(FunctionType(None, F32), SERVER, True),
    lambda: FederatedType(F32, SERVER, False),
    lambda: SequenceType(FederatedType(F32, CLIENTS, True)),
    lambda: SequenceType(FunctionType(F32, F32)),
    lambda: SequenceType(StructType((("a", SequenceType(F32)),))),
    lambda: StructType((("a", F32), ("a", I32))),
    lambda: TensorType("float128"),
    lambda: TensorType("float32", (-1,)),
])
def test_impossible_types_cannot_be_built(build):
    with pytest.raises(TypeConstructionError):
        build()
