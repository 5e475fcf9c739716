"""Rucio's RSE expression language: parser and evaluator.

    expression := operand (OP operand)*            OP is '|' (union), '&' (intersection),
    operand    := '(' expression ')' | primitive         '\\' (difference)
    primitive  := '*' | KEY '=' VALUE | KEY '<' NUMBER | KEY '>' NUMBER | NAME

Operators have no precedence: they apply strictly left to right, so `A|B&C` is `(A|B)&C`,
as in Rucio. A bare NAME means "attribute NAME is True", which every RSE has for its own
name. In `KEY=VALUE` the key is looked up among the RSE's columns first (rse_type, city,
deterministic, ...) and only then among its attributes, so columns shadow attributes.
Errors carry the 0-based position of the offending character.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from stashflow.placement.exceptions import InvalidRSEExpression

_NAME = re.compile(r"[A-Za-z0-9]+(?:[_-][A-Za-z0-9]+)*")
_KEY = re.compile(r"[A-Za-z0-9._-]+")
_VALUE = re.compile(r"[A-Za-z0-9_-]+")
_OPERATORS = {"|", "&", "\\"}

EMPTY_SET_MESSAGE = "RSE Expression resulted in an empty set."


@dataclass(frozen=True)
class Term:
    """A primitive: kind is '*', '=', '<', '>' or 'bare'."""

    kind: str
    key: str = ""
    value: str = ""


@dataclass(frozen=True)
class Combine:
    operator: str
    left: Node
    right: Node


Node = Term | Combine


@dataclass
class RSEView:
    """What the evaluator needs to know about one RSE."""

    id: str
    rse: str
    columns: Mapping[str, Any] = field(default_factory=dict)
    attributes: Mapping[str, Any] = field(default_factory=dict)


def _error(expression: str, position: int, why: str) -> InvalidRSEExpression:
    pointer = f"{expression}\n{' ' * position}^" if len(expression) <= 200 else ""
    shown = expression if len(expression) <= 200 else expression[:200] + "..."
    message = f"Invalid RSE expression '{shown}' at position {position}: {why}"
    exc = InvalidRSEExpression(message)
    exc.position = position
    exc.pointer = pointer
    return exc


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def parse(self) -> Node:
        if not self.text:
            raise _error(self.text, 0, "the expression is empty")
        node = self._expression(depth=0)
        if self.pos != len(self.text):
            char = self.text[self.pos]
            why = ("unbalanced parenthesis: ')' closes nothing" if char == ")"
                   else f"unexpected character {char!r}")
            raise _error(self.text, self.pos, why)
        return node

    def _expression(self, depth: int) -> Node:
        node = self._operand(depth)
        while self.pos < len(self.text) and self.text[self.pos] in _OPERATORS:
            operator = self.text[self.pos]
            self.pos += 1
            node = Combine(operator, node, self._operand(depth))
        return node

    def _operand(self, depth: int) -> Node:
        text, start = self.text, self.pos
        if start >= len(text):
            raise _error(text, start, "an RSE, attribute or '(' is missing at the end")
        if text[start] == "(":
            if depth > 100:
                raise _error(text, start, "parentheses nested too deeply")
            self.pos += 1
            node = self._expression(depth + 1)
            if self.pos >= len(text) or text[self.pos] != ")":
                raise _error(text, start, "unbalanced parenthesis: this '(' is never closed")
            self.pos += 1
            return node
        if text[start] == "*":
            self.pos += 1
            return Term("*")
        key = _KEY.match(text, start)
        if key is None:
            raise _error(text, start, f"expected an RSE, an attribute or '(' but found "
                                      f"{text[start]!r}")
        end = key.end()
        if end < len(text) and text[end] in "=<>":
            operator = text[end]
            value = _VALUE.match(text, end + 1)
            if value is None:
                raise _error(text, end + 1, f"the value after '{operator}' is missing or "
                                            f"contains a character not allowed in values")
            if operator != "=":
                try:
                    float(value.group())
                except ValueError:
                    raise _error(text, end + 1, f"'{operator}' needs a number, not "
                                                f"{value.group()!r}") from None
            self.pos = value.end()
            return Term(operator, key.group(), value.group())
        bare = _NAME.match(text, start)
        if bare is None or bare.end() != end:
            bad = start if bare is None else bare.end()
            raise _error(text, bad, f"{key.group()!r} is not a valid RSE or attribute name")
        self.pos = end
        return Term("bare", key.group())


def parse(expression: str) -> Node:
    return _Parser(expression).parse()


def _truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.lower() == "true")


def _equals(stored: Any, wanted: str) -> bool:
    if isinstance(stored, bool):
        return stored == (wanted.lower() in ("true", "1"))
    if hasattr(stored, "value") and not isinstance(stored, int | float):  # an enum column
        stored = stored.value
    if isinstance(stored, float) and stored.is_integer():
        return wanted in (str(stored), str(int(stored)))
    return str(stored) == wanted


def _lookup(rse: RSEView, key: str) -> tuple[bool, Any]:
    if key in rse.columns:
        return True, rse.columns[key]
    if key in rse.attributes:
        return True, rse.attributes[key]
    return False, None


def _matches(term: Term, rse: RSEView) -> bool:
    if term.kind == "*":
        return True
    if term.kind == "bare":
        return _truthy(rse.attributes.get(term.key))
    found, stored = _lookup(rse, term.key)
    if not found or stored is None:
        return False
    if term.kind == "=":
        return _equals(stored, term.value)
    try:
        number = float(stored)
    except (TypeError, ValueError):
        return False  # non-numeric values are skipped silently, as in Rucio
    return number < float(term.value) if term.kind == "<" else number > float(term.value)


def evaluate_node(node: Node, rses: Iterable[RSEView]) -> set[str]:
    """The ids of the RSEs the expression selects (possibly empty)."""
    pool = list(rses)
    return _evaluate(node, pool)


def _evaluate(node: Node, pool: list[RSEView]) -> set[str]:
    if isinstance(node, Term):
        return {rse.id for rse in pool if _matches(node, rse)}
    left = _evaluate(node.left, pool)
    right = _evaluate(node.right, pool)
    if node.operator == "|":
        return left | right
    if node.operator == "&":
        return left & right
    return left - right


def evaluate(expression: str, rses: Iterable[RSEView]) -> set[str]:
    """Parse and evaluate; an empty result is an error, as in Rucio."""
    result = evaluate_node(parse(expression), rses)
    if not result:
        raise InvalidRSEExpression(EMPTY_SET_MESSAGE)
    return result
