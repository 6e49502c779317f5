"""Text -> AST. Lark (LALR) parses; one transformer method per grammar rule
builds a frozen AST node with its span (cairo-lang's habit). Syntax errors
become diagnostics E001/E002; nothing here raises a Lark exception at a user.
"""

from __future__ import annotations

import functools
import itertools
import re
import threading
import importlib.resources
from typing import Any

import lark
from lark import Token
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from fedlang.diagnostics import Diagnostic, FedlangError, InternalCompilerError, Span
from fedlang.syntax import ast
from fedlang.syntax.lexer import FastLexer

KEYWORDS = frozenset(
    "import as type fn comp process let return if then else and or not true false CLIENTS SERVER".split())
DTYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "float16", "float32", "float64", "string")


_BUILDER_LOCK = threading.Lock()


@functools.cache
def _parser() -> tuple[lark.Lark, "_ToAst"]:
    """The LALR parser with the AST builder inlined as its callbacks.

    Callbacks build AST nodes while parsing (no parse tree, no second pass);
    `keep_all_tokens` hands them the punctuation too, so every node's span runs
    from its first token to its last one."""
    grammar = importlib.resources.files("fedlang.grammar").joinpath("fedlang.lark").read_text("utf-8")
    builder = _ToAst()
    parser = lark.Lark(grammar, parser="lalr", lexer=FastLexer, start=["module", "type_only"],
                       keep_all_tokens=True, maybe_placeholders=True, transformer=builder)
    _check_every_rule_has_a_method(parser, builder)
    return parser, builder


class SyntaxErrors(FedlangError):
    """The text does not parse; `diagnostics` says where."""


def parse_module(text: str, file: str) -> ast.Module:
    """Parse a module; on syntax errors, report every one (see _more_syntax_errors)."""
    try:
        return _parse(text, file, "module")
    except SyntaxErrors as error:
        first = error.diagnostics[0]
        raise SyntaxErrors([first, *_more_syntax_errors(text, file, first)]) from None


# A line that starts a top-level declaration: where parsing can resume.
_DECLARATION_START = re.compile(r"^(fn|comp|type|process|import)[ \t]+[A-Za-z_\"]", re.MULTILINE)


def _more_syntax_errors(text: str, file: str, error: Diagnostic, limit: int = 20) -> list[Diagnostic]:
    """Resume after a syntax error at the next line that starts a declaration.

    The text before the resume point is blanked (newlines kept), so positions
    of later errors stay exact. The module is not checked when any syntax
    error exists; this only tells the user about all of them at once."""
    found: list[Diagnostic] = []
    resumed_at = -1
    lines = text.split("\n")
    while len(found) < limit:
        # Resume at the error's own line when the error is the start of a declaration
        # (the one before it was cut short), else at the line after it.
        line = error.span.line - (1 if error.span.column == 1 else 0)
        offset = sum(len(l) + 1 for l in lines[:line])
        match = _DECLARATION_START.search(text, min(max(offset, resumed_at + 1), len(text)))
        if match is None:
            return found
        resumed_at = match.start()
        blanked = "".join(c if c == "\n" else " " for c in text[:match.start()]) + text[match.start():]
        try:
            _parse(blanked, file, "module")
            return found
        except SyntaxErrors as more:
            error = more.diagnostics[0]
            found.append(error)


def parse_type_expr(text: str, file: str = "<type>") -> ast.TypeExpr:
    return _parse(text, file, "type_only")


def _parse(text: str, file: str, start: str) -> Any:
    _, builder = _parser()
    with _BUILDER_LOCK:
        builder.file = file
        try:
            return _drive(text, start)
        except UnexpectedInput as error:
            raise SyntaxErrors([_syntax_diagnostic(error, text, file)]) from None


@functools.cache
def _tables():
    """Lark's LALR table, flattened for the driver below: per state, per symbol,
    (True, next state) to shift or (False, (callback, rule size, rule name)) to reduce."""
    parser, _ = _parser()
    inner = parser.parser.parser.parser
    table = {}
    for state, actions in inner.parse_table.states.items():
        row = {}
        for symbol, (action, arg) in actions.items():
            if action.name == "Shift":
                row[str(symbol)] = (True, arg)
            else:
                row[str(symbol)] = (False, (inner.callbacks[arg], len(arg.expansion), str(arg.origin.name)))
        table[state] = row
    return table, inner.parse_table.start_states, inner.parse_table.end_states, parser.parser.lexer.lexer


def _drive(text: str, start: str) -> Any:
    """Run Lark's LALR(1) table over our tokens, calling the AST callbacks on reduce.

    The same automaton as `Lark.parse`, in a loop without its per-token checks
    (about twice as fast, which is most of `fedlang check` on large files)."""
    table, starts, ends, lexer = _tables()
    end_state = ends[start]
    states, values = [starts[start]], []
    last = None
    for token in itertools.chain(lexer.lex(text), (None,)):
        if token is None:
            token = Token("$END", "", *(_end_position_of(last, text)))
        while True:
            row = table[states[-1]]
            entry = row.get(token.type)
            if entry is None:
                raise UnexpectedToken(token, {s for s in row if s.isupper()})
            shift, arg = entry
            if shift:
                states.append(arg)
                values.append(token)
                break
            callback, size, origin = arg
            if size:
                children = values[-size:]
                del states[-size:]
                del values[-size:]
            else:
                children = []
            values.append(callback(children))
            states.append(table[states[-1]][origin][1])
            if token.type == "$END" and states[-1] == end_state:
                return values[-1]
        last = token
    raise InternalCompilerError("the parser stopped before the end of the input")


def _end_position_of(last: Token | None, text: str) -> tuple:
    if last is None:
        return (0, 1, 1, 1, 1, 0)
    return (last.end_pos, last.end_line, last.end_column, last.end_line, last.end_column, last.end_pos)


def _check_only(text: str, start: str = "module") -> None:
    """Parse without keeping the result (syntax error recovery re-parses)."""
    _parse(text, "<recovery>", start)


# ---- syntax errors -------------------------------------------------------------

_READABLE = {
    "NAME": "a name", "INT": "an integer", "FLOAT": "a float", "STRING": "a string",
    "DTYPE": "a dtype", "TRUE": "`true`", "FALSE": "`false`", "CLIENTS": "`CLIENTS`",
    "SERVER": "`SERVER`", "$END": "end of file",
}


def _readable(terminal: str) -> str:
    if terminal in _READABLE:
        return _READABLE[terminal]
    definition = _parser()[0].get_terminal(terminal) if terminal in _terminal_names() else None
    if definition is not None and definition.pattern.type == "str":
        return f"`{definition.pattern.value}`"
    return terminal.lower()


@functools.cache
def _terminal_names() -> frozenset[str]:
    return frozenset(t.name for t in _parser()[0].terminals)


def _expected_help(expected: set[str] | frozenset[str]) -> str | None:
    if {"NAME", "INT", "FLOAT"} <= set(expected):
        return "expected an expression"
    if {"DTYPE", "LESSTHAN", "LBRACE"} <= set(expected):
        return "expected a type"
    names = sorted({_readable(t) for t in expected}, key=lambda n: (not n[0].isalpha(), n))
    if not names:
        return None
    if len(names) > 8:
        names = names[:8] + ["..."]
    return "expected " + ", ".join(names)


# Characters pasted from documents that look like fedlang's.
_LOOKALIKES = {
    "\u2212": "this is a Unicode minus sign; write -",
    "\u2013": "this is a dash; write -",
    "\u00d7": "this is a multiplication sign; write *",
    "\u201c": 'this is a curly quote; write "',
    "\u201d": 'this is a curly quote; write "',
    "\u2018": "this is a curly quote; strings use \"",
    "\u2019": "this is a curly quote; strings use \"",
    "\u2192": "this is an arrow character; write ->",
    "\u00a0": "this is a non-breaking space; write a plain space",
    "'": 'strings use double quotes: "..."',
}


def _point(file: str, line: int, column: int, width: int = 1) -> Span:
    return Span(file, line, column, line, column + max(width, 1))


def _syntax_diagnostic(error: UnexpectedInput, text: str, file: str) -> Diagnostic:
    if isinstance(error, UnexpectedCharacters):
        char = text[error.pos_in_stream] if 0 <= error.pos_in_stream < len(text) else "?"
        where = _point(file, error.line, error.column)
        if char == '"':
            return Diagnostic("E002", "this string is not closed", where, label="opens here",
                              help='close it with " on the same line')
        return Diagnostic("E002", f"unexpected character {char!r}", where, label="not part of fedlang",
                          help=_LOOKALIKES.get(char))
    if isinstance(error, UnexpectedToken):
        token = error.token
        if token.type == "$END":
            line, column = _end_position(text)
            return Diagnostic("E001", "unexpected end of file", _point(file, line, column),
                              label="the program stops here", help=_expected_help(error.expected))
        shown = str(token)
        what = f"keyword `{shown}`" if shown in KEYWORDS else f"`{shown}`"
        help_line = _expected_help(error.expected)
        if shown in KEYWORDS and "NAME" in error.expected and not {"INT", "DTYPE"} & set(error.expected):
            help_line = f"`{shown}` is a keyword and cannot be used as a name; " + (help_line or "")
        return Diagnostic("E001", f"unexpected {what}",
                          _point(file, token.line, token.column, len(shown)),
                          label="unexpected here", help=help_line)
    if isinstance(error, UnexpectedEOF):
        line, column = _end_position(text)
        return Diagnostic("E001", "unexpected end of file", _point(file, line, column),
                          label="the program stops here", help=_expected_help(set(error.expected)))
    raise InternalCompilerError(f"unknown Lark error {error!r}")


def _end_position(text: str) -> tuple[int, int]:
    lines = text.split("\n")
    return len(lines), len(lines[-1]) + 1


# ---- tree -> AST ---------------------------------------------------------------

def _token_span(file: str, token: Token) -> Span:
    return Span(file, token.line, token.column, token.end_line, token.end_column)


# Terminals whose tokens are values (names, literals); the others are punctuation
# and keywords, which only give nodes their spans.
_VALUE_TERMINALS = frozenset({"NAME", "INT", "FLOAT", "STRING", "DTYPE", "TRUE", "FALSE", "CLIENTS", "SERVER"})


def _rule(method):
    """Adapt a rule method to Lark's inline callbacks: compute the span from the
    first and last positioned child, drop punctuation, call method(span, children)."""
    @functools.wraps(method)
    def callback(self, children):
        first = last = None
        for c in children:
            if isinstance(c, (Token, ast.Node)):
                first = c
                break
        if first is None:
            span = Span(self.file, 1, 1, 1, 1)
        else:
            for c in reversed(children):
                if isinstance(c, (Token, ast.Node)):
                    last = c
                    break
            if isinstance(first, Token):
                line, column = first.line, first.column
            else:
                line, column = first.span.line, first.span.column
            if isinstance(last, Token):
                end_line, end_column = last.end_line, last.end_column
            else:
                end_line, end_column = last.span.end_line, last.span.end_column
            span = Span(self.file, line, column, end_line, end_column)
        kept = [c for c in children if not (isinstance(c, Token) and c.type not in _VALUE_TERMINALS)]
        return method(self, span, kept)
    return callback


class _ToAst:
    """One method per grammar rule, each building a frozen AST node with its span.

    A rule without a method is a bug: Lark refuses to build the parser."""

    file = "<input>"

    def _span(self, span: Span) -> Span:
        return span

    def _tok(self, token: Token) -> Span:
        return _token_span(self.file, token)

    # -- module and declarations
    def module(self, meta, decls):
        return ast.Module(self._span(meta), tuple(decls))

    def import_decl(self, meta, children):
        (dotted, path, target_span), alias = children
        return ast.Import(self._span(meta), str(alias), self._tok(alias), dotted, path, target_span)

    def module_path(self, meta, children):
        (child,) = children
        if isinstance(child, Token):        # STRING
            return (None, _unquote(child, self.file), self._tok(child))
        parts, span = child
        return (tuple(parts), None, span)

    def dotted_name(self, meta, names):
        return [str(n) for n in names], self._span(meta)

    def type_decl(self, meta, children):
        name, type_expr = children
        return ast.TypeDecl(self._span(meta), str(name), self._tok(name), type_expr)

    def fn_decl(self, meta, children):
        return self._function(meta, children, federated=False)

    def comp_decl(self, meta, children):
        return self._function(meta, children, federated=True)

    def _function(self, meta, children, federated):
        name, params, result, body = children
        return ast.FunctionDecl(self._span(meta), str(name), self._tok(name), federated, params, result, body)

    def process_decl(self, meta, children):
        name, *fields = children
        return ast.ProcessDecl(self._span(meta), str(name), self._tok(name), tuple(fields))

    def process_field(self, meta, children):
        key, value = children
        return (str(key), self._tok(key), value)

    def param_list(self, meta, children):
        return tuple(p for p in children if p is not None)

    def param(self, meta, children):
        name, type_expr = children
        return ast.Param(self._span(meta), str(name), type_expr)

    def body(self, meta, children):
        return children[0]           # `= expr`

    def block(self, meta, children):
        *lets, result = children
        return ast.Block(self._span(meta), tuple(lets), result)

    def let_stmt(self, meta, children):
        (names, destructure), value = children
        return ast.Let(self._span(meta), names, destructure, value)

    def name_pattern(self, meta, children):
        return (str(children[0]),), False

    def tuple_pattern(self, meta, children):
        return tuple(str(c) for c in children), True

    # -- types
    def type_only(self, meta, children):
        return children[0]

    def sequence_type(self, meta, children):
        return ast.SequenceTypeExpr(self._span(meta), children[0])

    def all_equal_type(self, meta, children):
        member, placement = children
        return ast.FederatedTypeExpr(self._span(meta), member, placement, all_equal=True)

    def federated_type(self, meta, children):
        member, placement = children
        return ast.FederatedTypeExpr(self._span(meta), member, placement, all_equal=False)

    def placement(self, meta, children):
        return children[0]           # the CLIENTS/SERVER token: a str that keeps its position

    def tensor_type(self, meta, children):
        dtype, *dims = children
        return ast.TensorTypeExpr(self._span(meta), str(dtype), tuple(dims))

    def dim(self, meta, children):
        return int(children[0]) if children else None

    def struct_type(self, meta, children):
        return ast.StructTypeExpr(self._span(meta), tuple(f for f in children if f is not None))

    def named_type_field(self, meta, children):
        name, type_expr = children
        return (str(name), type_expr)

    def unnamed_type_field(self, meta, children):
        return (None, children[0])

    def function_type(self, meta, children):
        parameter, result = children
        return ast.FunctionTypeExpr(self._span(meta), parameter, result)

    def named_type(self, meta, children):
        if len(children) == 2 and children[1] is not None:
            return ast.NamedTypeExpr(self._span(meta), str(children[0]), str(children[1]))
        return ast.NamedTypeExpr(self._span(meta), None, str(children[0]))

    # -- expressions
    def lambda_expr(self, meta, children):
        params, *optional, body = children       # `["->" type]`: a placeholder per symbol when absent
        result = next((c for c in optional if c is not None), None)
        return ast.Lambda(self._span(meta), params, result, body)

    def if_expr(self, meta, children):
        return ast.If(self._span(meta), *children)

    def _binary(op):
        def method(self, meta, children):
            left, right = children
            return ast.BinOp(self._span(meta), op, left, right)
        return method

    or_ = _binary("or")
    and_ = _binary("and")
    eq = _binary("==")
    ne = _binary("!=")
    lt = _binary("<")
    le = _binary("<=")
    gt = _binary(">")
    ge = _binary(">=")
    add = _binary("+")
    sub = _binary("-")
    mul = _binary("*")
    div = _binary("/")
    mod = _binary("%")
    pow = _binary("**")
    del _binary

    def not_(self, meta, children):
        return ast.UnaryOp(self._span(meta), "not", children[0])

    def neg(self, meta, children):
        return ast.UnaryOp(self._span(meta), "-", children[0])

    def call(self, meta, children):
        func, args = children
        return ast.Call(self._span(meta), func, args)

    def select(self, meta, children):
        base, name = children
        return ast.Select(self._span(meta), base, str(name), self._tok(name))

    def index(self, meta, children):
        base, index = children
        return ast.Index(self._span(meta), base, index)

    def name(self, meta, children):
        return ast.Name(self._span(meta), str(children[0]))

    def int_lit(self, meta, children):
        return ast.IntLit(self._span(meta), int(children[0]))

    def float_lit(self, meta, children):
        return ast.FloatLit(self._span(meta), float(children[0]), str(children[0]))

    def true_lit(self, meta, children):
        return ast.BoolLit(self._span(meta), True)

    def false_lit(self, meta, children):
        return ast.BoolLit(self._span(meta), False)

    def string_lit(self, meta, children):
        return ast.StringLit(self._span(meta), _unquote(children[0], self.file))

    def dtype_lit(self, meta, children):
        return ast.DTypeLit(self._span(meta), str(children[0]))

    def placement_lit(self, meta, children):
        return ast.PlacementLit(self._span(meta), str(children[0]))

    def empty_struct(self, meta, children):
        return ast.StructLit(self._span(meta), ())

    def paren(self, meta, children):
        return children[0]

    def struct_lit(self, meta, children):
        return ast.StructLit(self._span(meta), tuple(children))

    def named_struct_one(self, meta, children):
        name, value = children
        return ast.StructLit(self._span(meta), ((str(name), value),))

    def named_field(self, meta, children):
        name, value = children
        return (str(name), value)

    def unnamed_field(self, meta, children):
        return (None, children[0])

    def list_lit(self, meta, children):
        return ast.ListLit(self._span(meta), tuple(c for c in children if c is not None))

    def arg_list(self, meta, children):
        return tuple(a for a in children if a is not None)

    def keyword_arg(self, meta, children):
        name, value = children
        return ast.Arg(self._span(meta), str(name), value)

    def positional_arg(self, meta, children):
        return ast.Arg(self._span(meta), None, children[0])


for _name, _method in list(vars(_ToAst).items()):
    if callable(_method) and not _name.startswith("_"):
        setattr(_ToAst, _name, _rule(_method))


def _check_every_rule_has_a_method(parser: lark.Lark, builder: _ToAst) -> None:
    for rule in parser.rules:
        name = rule.alias or rule.origin.name
        inlined = rule.options.expand1 and len(rule.expansion) == 1 and not rule.alias
        if not inlined and not name.startswith("_") and not hasattr(builder, name):
            raise InternalCompilerError(f"grammar rule {name!r} has no AST method")


_ESCAPES = {"\\": "\\", '"': '"', "n": "\n", "t": "\t"}


def _unquote(token: Token, file: str) -> str:
    """The text of a string literal; escapes: \\\\ \\" \\n \\t."""
    body, out, i = str(token)[1:-1], [], 0
    while i < len(body):
        if body[i] == "\\":
            char = body[i + 1]
            if char not in _ESCAPES:
                column = token.column + 1 + i
                raise SyntaxErrors([Diagnostic(
                    "E002", f"unknown escape `\\{char}` in a string",
                    Span(file, token.line, column, token.line, column + 2),
                    help='strings know the escapes \\\\ \\" \\n \\t')])
            out.append(_ESCAPES[char])
            i += 2
        else:
            out.append(body[i])
            i += 1
    return "".join(out)
