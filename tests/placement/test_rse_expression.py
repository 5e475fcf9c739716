"""RSE expressions: syntax errors with positions, Rucio's semantics, and a property test
against a plain set-algebra model."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stashflow.placement.exceptions import InvalidRSEExpression
from stashflow.placement.models import RSEType
from stashflow.placement.rse_expression import RSEView, evaluate, evaluate_node, parse


def view(name: str, rse_type: RSEType = RSEType.DISK, **attributes: object) -> RSEView:
    return RSEView(id=name.lower(), rse=name,
                   columns={"rse": name, "rse_type": rse_type, "deterministic": True,
                            "city": "Geneva" if name.startswith("CERN") else None},
                   attributes={name: True, **attributes})


RSES = [
    view("CERN_DISK", tier="0", cloud="CH", freespace="100", type="DISK"),
    view("CERN_TAPE", RSEType.TAPE, tier="0", cloud="CH", freespace="5", istape=True),
    view("BNL_DISK", tier="1", cloud="US", freespace="50", country="US"),
    view("MWT2", tier="2", cloud="US", freespace="not-a-number", country="US"),
    view("DESY", tier="2", cloud="DE", freespace="20", city="Hamburg"),
]


def names(expression: str) -> set[str]:
    return {i.upper() for i in evaluate(expression, RSES)}


@pytest.mark.parametrize(("expression", "expected"), [
    ("*", {"CERN_DISK", "CERN_TAPE", "BNL_DISK", "MWT2", "DESY"}),
    ("MWT2", {"MWT2"}),
    ("tier=2", {"MWT2", "DESY"}),
    ("cloud=US|cloud=DE", {"BNL_DISK", "MWT2", "DESY"}),
    ("tier=2&cloud=US", {"MWT2"}),
    ("*\\cloud=US", {"CERN_DISK", "CERN_TAPE", "DESY"}),
    # No precedence: (tier=0 | tier=1) & cloud=US, not tier=0 | (tier=1 & cloud=US).
    ("tier=0|tier=1&cloud=US", {"BNL_DISK"}),
    ("tier=0|(tier=1&cloud=US)", {"CERN_DISK", "CERN_TAPE", "BNL_DISK"}),
    ("freespace>30", {"CERN_DISK", "BNL_DISK"}),  # MWT2's non-numeric value is skipped
    ("freespace<30", {"CERN_TAPE", "DESY"}),
    ("rse_type=TAPE", {"CERN_TAPE"}),  # a column, not an attribute
    ("city=Geneva", {"CERN_DISK", "CERN_TAPE"}),  # the column shadows DESY's attribute
    ("istape", {"CERN_TAPE"}),
    ("rse=DESY", {"DESY"}),
    ("deterministic=true", {"CERN_DISK", "CERN_TAPE", "BNL_DISK", "MWT2", "DESY"}),
    ("((MWT2))", {"MWT2"}),
])
def test_semantics(expression: str, expected: set[str]) -> None:
    assert names(expression) == expected


def test_empty_result_is_an_error() -> None:
    with pytest.raises(InvalidRSEExpression, match="resulted in an empty set"):
        evaluate("tier=9", RSES)


@pytest.mark.parametrize(("expression", "position", "why"), [
    ("tier=1&(MWT2", 7, "never closed"),
    ("MWT2)", 4, "closes nothing"),
    ("(MWT2))|DESY", 6, "closes nothing"),
    ("MWT2&", 5, "missing at the end"),
    ("MWT2 |DESY", 4, "unexpected character ' '"),
    ("tier<abc", 5, "needs a number"),
    ("tier=", 5, "value after '='"),
    ("", 0, "empty"),
    ("|MWT2", 0, "expected an RSE"),
    ("a.b", 1, "not a valid RSE or attribute name"),
    ("tier=1;DROP", 6, "unexpected character ';'"),
])
def test_errors_point_at_the_position(expression: str, position: int, why: str) -> None:
    with pytest.raises(InvalidRSEExpression) as info:
        parse(expression)
    assert f"at position {position}:" in info.value.message
    assert why in info.value.message


def test_deep_nesting_is_refused_not_a_crash() -> None:
    with pytest.raises(InvalidRSEExpression, match="nested too deeply"):
        parse("(" * 500 + "A" + ")" * 500)


# --- property: the evaluator agrees with a set-algebra model --------------------------

KEYS = ["tier", "cloud", "site"]
VALUES = ["0", "1", "2", "US", "DE"]
RSE_NAMES = [f"RSE{i}" for i in range(6)]


@dataclass(frozen=True)
class Prim:
    text: str
    kind: str
    key: str
    value: str


@st.composite
def catalogs(draw: st.DrawFn) -> list[RSEView]:
    out = []
    for name in RSE_NAMES:
        attrs: dict[str, object] = {name: True}
        for key in KEYS:
            if draw(st.booleans()):
                attrs[key] = draw(st.sampled_from(VALUES))
        if draw(st.booleans()):
            attrs["flag"] = True
        out.append(RSEView(id=name, rse=name, columns={"rse": name}, attributes=attrs))
    return out


primitives = st.one_of(
    st.just(Prim("*", "*", "", "")),
    st.sampled_from([*RSE_NAMES, "flag"]).map(lambda n: Prim(n, "bare", n, "")),
    st.tuples(st.sampled_from(KEYS), st.sampled_from(VALUES)).map(
        lambda kv: Prim(f"{kv[0]}={kv[1]}", "=", kv[0], kv[1])),
    st.tuples(st.sampled_from(KEYS), st.sampled_from(["0", "1", "2"]), st.sampled_from("<>"))
    .map(lambda t: Prim(f"{t[0]}{t[2]}{t[1]}", t[2], t[0], t[1])),
)

# An expression is a first operand and a list of (operator, operand); an operand is a
# primitive or a parenthesised expression.
expressions = st.recursive(
    st.tuples(primitives, st.lists(st.tuples(st.sampled_from("|&\\"), primitives),
                                   max_size=3)),
    lambda inner: st.tuples(st.one_of(primitives, inner),
                            st.lists(st.tuples(st.sampled_from("|&\\"),
                                               st.one_of(primitives, inner)), max_size=3)),
    max_leaves=12,
)


def render(expr: object) -> str:
    if isinstance(expr, Prim):
        return expr.text
    assert isinstance(expr, tuple)
    first, rest = expr
    def operand(x: object) -> str:
        return x.text if isinstance(x, Prim) else f"({render(x)})"
    return operand(first) + "".join(op + operand(x) for op, x in rest)


def model(expr: object, rses: list[RSEView]) -> set[str]:
    everything = {r.id for r in rses}
    if isinstance(expr, Prim):
        if expr.kind == "*":
            return everything
        if expr.kind == "bare":
            return {r.id for r in rses if r.attributes.get(expr.key) is True}
        hits = set()
        for r in rses:
            value = r.attributes.get(expr.key)
            if value is None:
                continue
            if expr.kind == "=" and str(value) == expr.value:
                hits.add(r.id)
            elif expr.kind in "<>" and str(value).lstrip("-").isdigit():
                number, bound = float(str(value)), float(expr.value)
                if (number < bound) if expr.kind == "<" else (number > bound):
                    hits.add(r.id)
        return hits
    assert isinstance(expr, tuple)
    first, rest = expr
    result = model(first, rses)
    for op, operand in rest:  # strictly left to right
        other = model(operand, rses)
        result = result | other if op == "|" else result & other if op == "&" else \
            result - other
    return result


@settings(max_examples=300, deadline=None)
@given(catalogs(), expressions)
def test_evaluator_matches_set_model(rses: list[RSEView], expr: object) -> None:
    text = render(expr)
    assert evaluate_node(parse(text), rses) == model(expr, rses), text


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="AB()|&\\=<>*1 ", max_size=20))
def test_arbitrary_text_parses_or_fails_cleanly(text: str) -> None:
    try:
        parse(text)
    except InvalidRSEExpression as exc:
        assert "at position" in exc.message
