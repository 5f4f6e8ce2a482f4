"""Exact passes started by RankCandidates and ShouldStop are counted in the metrics, like those of Kinship.

A real server with its metrics endpoint on a loopback port; real checkpoints from the
`family` fixture. The expected byte count is each file's data section (every tensor is
compared, so every data byte is read once), computed here from the files themselves.
"""

from __future__ import annotations

import json
import struct
import urllib.request
from pathlib import Path

from kinship_client import KinshipClient
from kinship_client.population import Member

from .free_ports import free_port


def _metric(port: int, line_prefix: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_prefix + " ")]
    assert len(values) <= 1, f"{line_prefix} appears {len(values)} times"
    return values[0] if values else 0.0


def _data_bytes(checkpoint_dir: str) -> int:
    """Bytes of the tensor data of a single-file checkpoint (file size minus the safetensors header)."""
    path = Path(checkpoint_dir) / "model.safetensors"
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    return sum(e["data_offsets"][1] - e["data_offsets"][0] for name, e in header.items() if name != "__metadata__")


def test_rank_candidates_and_should_stop_passes_reach_the_metrics(server_factory, family) -> None:
    port = free_port()
    server = server_factory(metrics_port=port)
    paths = {k: str(v) for k, v in family["paths"].items()}
    read = "kinship_checkpoint_bytes_read_total"
    passes = 'kinship_exact_pass_seconds_count{device="cpu"}'
    tensors = "kinship_tensors_compared_total"
    members = [Member(name=f"m{i}", score=0.5 + i / 10, checkpoint=paths[f"m{i}"]) for i in range(3)]
    with KinshipClient(server.address, timeout=120) as client:
        before = (_metric(port, read), _metric(port, passes), _metric(port, tensors))
        ranking = client.rank_candidates(members[:2], top_k=2, base=paths["base"], mode="exact")
        assert ranking.mode == "exact"
        after_rank = (_metric(port, read), _metric(port, passes), _metric(port, tensors))
        assert after_rank[0] - before[0] == sum(_data_bytes(paths[k]) for k in ("base", "m0", "m1"))
        assert after_rank[1] - before[1] == 1
        assert after_rank[2] > before[2]

        decision = client.should_stop(members[1:], top_k=2, base=paths["base"], mode="exact")
        assert decision.mode == "exact"
        after_stop = (_metric(port, read), _metric(port, passes))
        assert after_stop[0] - after_rank[0] == sum(_data_bytes(paths[k]) for k in ("base", "m1", "m2"))
        assert after_stop[1] - after_rank[1] == 1

        # answered again from the stored pair results: no pass, nothing read
        client.should_stop(members[1:], top_k=2, base=paths["base"], mode="exact")
        assert (_metric(port, read), _metric(port, passes)) == after_stop
