"""Shared state for several replicas (`KINSHIP_STATE_URL`): PostgreSQL connections, migrations, the routed cache store."""
