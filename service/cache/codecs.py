"""Byte formats of cached fingerprints and pair results, and Similarities rebuilt from pair results.

Pure functions, no I/O. A fingerprint is a small JSON head (tensor set, layer-group
statistics, skipped tensors) then the float32 sketch, 8-byte aligned; a pair record is
JSON. Whatever reads them treats ValueError, KeyError, TypeError and IndexError as a
damaged entry (dropped and recomputed).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypedDict

import torch

from kinship_service.kinship.fingerprint import Fingerprint, GroupStats
from kinship_service.kinship.similarity import Similarities

_LEN = struct.Struct("<I")


def fingerprint_to_parts(fp: Fingerprint) -> list[bytes | memoryview]:
    """A fingerprint as buffers (JSON head, then the raw sketch), without joining them."""
    meta = {
        "version": fp.version,
        "width": fp.width,
        "seed": fp.seed,
        "tensors": [[name, list(shape)] for name, shape in fp.tensors],
        "groups": {g: [s.count, s.sum, s.sum_squares] for g, s in fp.groups.items()},
        "skipped": [list(s) for s in fp.skipped],
    }
    head = json.dumps(meta).encode()
    head += b" " * (-(len(head) + _LEN.size) % 8)
    sketch = fp.sketch.to(torch.float32).contiguous()
    return [_LEN.pack(len(head)) + head, sketch.view(torch.uint8).numpy().data]


def fingerprint_from_bytes(payload: memoryview) -> Fingerprint:
    """Parse what `fingerprint_to_parts` wrote; ValueError when the sketch has the wrong size."""
    (length,) = _LEN.unpack_from(payload)
    meta = json.loads(bytes(payload[_LEN.size : _LEN.size + length]))
    offset = _LEN.size + length
    width = int(meta["width"])
    if len(payload) - offset != 4 * width:
        raise ValueError("fingerprint sketch has the wrong size")
    sketch = torch.frombuffer(payload, dtype=torch.uint8, count=4 * width, offset=offset).view(torch.float32).clone()
    skipped: list[tuple[str, str, str]] = [(name, reason, detail) for name, reason, detail in meta.get("skipped", [])]
    return Fingerprint(
        sketch=sketch,
        groups={g: GroupStats(int(v[0]), float(v[1]), float(v[2])) for g, v in meta["groups"].items()},
        tensors=[(name, tuple(int(d) for d in shape)) for name, shape in meta["tensors"]],
        width=width,
        seed=int(meta["seed"]),
        version=int(meta["version"]),
        skipped=skipped,
    )


class PairEntry(TypedDict):
    """The exact similarities of one pair (a, b) over one layer group (or `*`, every tensor)."""

    count: int
    pcc: float
    cosine: float
    euclidean: float
    norms: list[float]
    """[a, b]"""
    means: list[float]
    """[a, b]"""


@dataclass
class PairRecord:
    """Exact similarities of one pair over one tensor set: overall and per layer group."""

    ids: tuple[str, str]
    groups: dict[str, PairEntry]
    """group (and `*` for overall) -> its entry, norms and means in the order of `ids`."""

    def to_bytes(self) -> bytes:
        return json.dumps({"ids": list(self.ids), "groups": self.groups}).encode()

    @classmethod
    def from_bytes(cls, payload: memoryview) -> PairRecord:
        doc = json.loads(bytes(payload))
        return cls(ids=(doc["ids"][0], doc["ids"][1]), groups=doc["groups"])


def pair_entry(sims: Similarities, i: int, j: int) -> PairEntry:
    """The entry of models i and j of `sims`."""
    return {
        "count": sims.count,
        "pcc": sims.pcc[i][j],
        "cosine": sims.cosine[i][j],
        "euclidean": sims.euclidean[i][j],
        "norms": [sims.norms[i], sims.norms[j]],
        "means": [sims.means[i], sims.means[j]],
    }


def swapped(entry: PairEntry) -> PairEntry:
    """The same entry for the pair (b, a)."""
    out = entry.copy()
    out["norms"] = list(reversed(entry["norms"]))
    out["means"] = list(reversed(entry["means"]))
    return out


def similarities_of_pairs(entries: Mapping[tuple[int, int], PairEntry], n: int) -> Similarities:
    """Similarities of n models from per-pair entries (i < j), keyed by request indices."""
    pcc = [[math.nan] * n for _ in range(n)]
    cosine = [[math.nan] * n for _ in range(n)]
    euclid = [[0.0] * n for _ in range(n)]
    norms = [math.nan] * n
    means = [math.nan] * n
    count = 0
    for (i, j), e in entries.items():
        count = int(e["count"])
        for a, b, side in ((i, j, 0), (j, i, 1)):
            pcc[a][b] = float(e["pcc"])
            cosine[a][b] = float(e["cosine"])
            euclid[a][b] = float(e["euclidean"])
            norms[a] = float(e["norms"][side])
            means[a] = float(e["means"][side])
    for i in range(n):
        if norms[i] > 0:
            cosine[i][i] = 1.0
        if any(not math.isnan(pcc[i][j]) for j in range(n) if j != i) or n == 1:
            pcc[i][i] = 1.0
    return Similarities(pcc=pcc, cosine=cosine, euclidean=euclid, norms=norms, means=means, count=count)
