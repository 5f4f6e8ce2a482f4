"""Kinship modes: how a kinship value may be obtained, one typed place for every layer.

`exact` reads the weights (or stored deltas, or stored pair results of an earlier pass);
`fingerprint` estimates from cached task-vector sketches and never reads weights; `auto`
answers exactly from the cache when it can, else from fingerprints, else with a pass.
A result reports the mode it was obtained in (`ModeUsed`): `exact` or `fingerprint`, or
`none` for a population whose every value the caller gave.
"""

from __future__ import annotations

from typing import Final, Literal

KinshipMode = Literal["exact", "fingerprint", "auto"]
"""What a request asks for."""
ModeUsed = Literal["exact", "fingerprint", "none"]
"""How an answer was obtained."""

EXACT: Final = "exact"
FINGERPRINT: Final = "fingerprint"
AUTO: Final = "auto"
NONE: Final = "none"
"""`ModeUsed` when every value came from the caller and nothing was computed."""

MODES: Final[tuple[KinshipMode, ...]] = (EXACT, FINGERPRINT, AUTO)
