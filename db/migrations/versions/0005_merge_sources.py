"""Merged runs: a ``merge_sources`` table links a merged run to the runs (and kept checkpoints) it was merged from.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "merge_sources",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(length=64), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("source_run_id", sa.String(length=64), nullable=False),
        sa.Column("step", sa.Integer(), nullable=True),
        sa.Column("loss", sa.Float(), nullable=True),
        sa.Column("weight", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["source_run_id"], ["runs.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_merge_sources_run_id", "merge_sources", ["run_id"])
    op.create_index("ix_merge_sources_source_run_id", "merge_sources", ["source_run_id"])


def downgrade() -> None:
    op.drop_index("ix_merge_sources_source_run_id", table_name="merge_sources")
    op.drop_index("ix_merge_sources_run_id", table_name="merge_sources")
    op.drop_table("merge_sources")
