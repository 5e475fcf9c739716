"""identifier columns compared byte by byte; contents without foreign keys

On PostgreSQL every scope, name, account, RSE id and rule id column gets COLLATE "C":
index lookups and inserts compare these keys, and the server's default locale-aware
collation made each comparison several times dearer (SQLite compares bytes already).
The two foreign keys of contents to dids are dropped on both databases: checked row by
row, they were most of the cost of attaching files in bulk, and attach guarantees what
they guaranteed (see the comment on Attachment in placement/models.py).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

# (table, column, length): every identifier column of revision 0001.
KEYS = [
    ('accounts', 'account', 25), ('account_attributes', 'account', 25),
    ('account_global_limits', 'account', 25), ('account_limits', 'account', 25),
    ('account_limits', 'rse_id', 32), ('account_usage', 'account', 25),
    ('account_usage', 'rse_id', 32), ('contents', 'scope', 25), ('contents', 'name', 255),
    ('contents', 'child_scope', 25), ('contents', 'child_name', 255),
    ('deleted_dids', 'scope', 25), ('deleted_dids', 'name', 255),
    ('dids', 'scope', 25), ('dids', 'name', 255), ('dids', 'account', 25),
    ('distances', 'src_rse_id', 32), ('distances', 'dest_rse_id', 32),
    ('identity_account_map', 'account', 25), ('locks', 'rule_id', 32),
    ('locks', 'scope', 25), ('locks', 'name', 255), ('locks', 'rse_id', 32),
    ('locks', 'account', 25), ('replicas', 'rse_id', 32), ('replicas', 'scope', 25),
    ('replicas', 'name', 255), ('requests', 'id', 32), ('requests', 'scope', 25),
    ('requests', 'name', 255), ('requests', 'dest_rse_id', 32),
    ('requests', 'source_rse_id', 32), ('requests', 'rule_id', 32), ('rses', 'id', 32),
    ('rse_attributes', 'rse_id', 32), ('rse_limits', 'rse_id', 32),
    ('rse_protocols', 'rse_id', 32), ('rse_usage', 'rse_id', 32), ('rules', 'id', 32),
    ('rules', 'account', 25), ('rules', 'scope', 25), ('rules', 'name', 255),
    ('rules', 'child_rule_id', 32), ('rules', 'subscription_id', 32),
    ('scopes', 'scope', 25), ('scopes', 'account', 25), ('subscriptions', 'id', 32),
    ('subscriptions', 'account', 25), ('tokens', 'account', 25),
]
CONTENTS_FKS = [('fk_contents_scope_dids', ['scope', 'name']),
                ('fk_contents_child_scope_dids', ['child_scope', 'child_name'])]


def _collate(collation: str | None) -> None:
    # One statement per table: PostgreSQL rebuilds a table's indexes once per ALTER.
    tables: dict[str, list[tuple[str, int]]] = {}
    for table, column, length in KEYS:
        tables.setdefault(table, []).append((column, length))
    for table, columns in tables.items():
        clauses = ", ".join(
            f'ALTER COLUMN "{column}" TYPE VARCHAR({length})'
            + (f' COLLATE "{collation}"' if collation else ' COLLATE "default"')
            for column, length in columns)
        op.execute(f'ALTER TABLE "{table}" {clauses}')


def upgrade() -> None:
    with op.batch_alter_table('contents', schema=None) as batch_op:
        for name, _columns in CONTENTS_FKS:
            batch_op.drop_constraint(name, type_='foreignkey')
    if op.get_bind().dialect.name == 'postgresql':
        _collate('C')


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        _collate(None)
    with op.batch_alter_table('contents', schema=None) as batch_op:
        for name, columns in CONTENTS_FKS:
            batch_op.create_foreign_key(name, 'dids', columns, ['scope', 'name'],
                                        ondelete='CASCADE')
