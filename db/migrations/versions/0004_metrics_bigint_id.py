"""Metrics get a 64-bit primary key: a 32-bit one runs out after 2**31 logged values.

SQLite is left as it is: its INTEGER primary key is the 64-bit rowid already, and a BIGINT one would no longer
number new rows. PostgreSQL widens the column and the sequence that numbers it (a SERIAL's sequence is 32-bit too).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def _sequence(bind: sa.Connection) -> str | None:
    return bind.execute(sa.text("SELECT pg_get_serial_sequence('metrics', 'id')")).scalar()


def _set_type(new: sa.types.TypeEngine, old: sa.types.TypeEngine, sequence_type: str) -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        return
    id_type = next(c["type"] for c in sa.inspect(bind).get_columns("metrics") if c["name"] == "id")
    if isinstance(id_type, sa.BigInteger) == isinstance(new, sa.BigInteger):
        return  # already this wide
    op.alter_column("metrics", "id", type_=new, existing_type=old, existing_nullable=False)
    if bind.dialect.name == "postgresql" and (sequence := _sequence(bind)) is not None:
        op.execute(sa.text(f"ALTER SEQUENCE {sequence} AS {sequence_type}"))


def upgrade() -> None:
    _set_type(sa.BigInteger(), sa.Integer(), "bigint")


def downgrade() -> None:
    _set_type(sa.Integer(), sa.BigInteger(), "integer")
