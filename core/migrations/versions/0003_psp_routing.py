"""PSP routing: per-merchant routing rules, card tokens at every PSP

Revision ID: 0003_psp_routing
Revises: 0002_refunds_disputes
Create Date: 2026-11-26 06:30:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0003_psp_routing"
down_revision: str | Sequence[str] | None = "0002_refunds_disputes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # server defaults fill the existing rows: no rules (the default order), no extra tokens (the
    # primary psp/psp_token columns keep working for cards saved before routing)
    with op.batch_alter_table("merchants", schema=None) as batch_op:
        batch_op.add_column(sa.Column("routing_rules", sa.JSON(), nullable=False, server_default="[]"))
    with op.batch_alter_table("payment_methods", schema=None) as batch_op:
        batch_op.add_column(sa.Column("psp_tokens", sa.JSON(), nullable=False, server_default="{}"))


def downgrade() -> None:
    with op.batch_alter_table("payment_methods", schema=None) as batch_op:
        batch_op.drop_column("psp_tokens")
    with op.batch_alter_table("merchants", schema=None) as batch_op:
        batch_op.drop_column("routing_rules")
