"""keys_in, the bulk lookup every catalog operation uses: names travel as one parameter,
so they must come back byte for byte whatever characters they hold."""

from __future__ import annotations

from sqlalchemy import Column, MetaData, String, Table, select

from stashflow.placement.db import keys_in, make_engine

TRICKY = ["plain", 'with "quotes"', "back\\slash", "comma,brace{}", "", " spaced ",
          "ünïcode", "NULL", 'end\\"', "x" * 255]


def test_keys_in_matches_exactly_the_given_names(db_url: str) -> None:
    engine = make_engine(db_url)
    table = Table("keys_in_probe", MetaData(), Column("scope", String(25), primary_key=True),
                  Column("name", String(255), primary_key=True))
    try:
        table.create(engine)
        with engine.begin() as conn:
            conn.execute(table.insert(), [{"scope": scope, "name": name}
                                          for scope in ("a", "b") for name in TRICKY])
            conn.execute(table.insert(), [{"scope": "a", "name": "decoy"}])
        with engine.connect() as conn:
            for wanted in ([("a", n) for n in TRICKY], [("b", TRICKY[1]), ("a", TRICKY[2])],
                           [("a", "absent"), ("b", "plain")], []):
                found = conn.execute(select(table.c.scope, table.c.name).where(
                    keys_in(table.c.scope, table.c.name, wanted))).all()
                assert sorted(map(tuple, found)) == sorted(k for k in wanted if k[1] in TRICKY)
    finally:
        table.drop(engine)
        engine.dispose()
