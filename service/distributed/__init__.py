"""Heavy work on a Ray cluster (`KINSHIP_RAY_ADDRESS`): exact passes split by tensor range, merges on workers.

Nothing here imports `ray` unless the variable is set (`cluster.connect`).
"""
