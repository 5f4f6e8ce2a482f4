"""A merge started with `base` is registered in the cache before it succeeds: kinship about it reads no weights."""

from __future__ import annotations

import numpy as np
from safetensors.torch import load_file

from kinship_service.checkpoints.synthetic import make_base, make_family, save_checkpoint

from .conftest import SMALL


def _flat_delta(directory, base) -> np.ndarray:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return np.concatenate([(tensors[k].double() - base[k].double()).numpy().ravel() for k in sorted(base)])


def test_merged_model_is_registered_before_success(server_factory, model_root, tmp_path):
    merges = tmp_path / "merges"
    server = server_factory(allowed_roots=(model_root, merges), output_root=merges)
    base = make_base(SMALL, seed=50)
    a, b, c = make_family(base, 3, rho=0.5, seed=51)
    dirs = {name: save_checkpoint(t, model_root / name) for name, t in (("base", base), ("a", a), ("b", b), ("c", c))}
    from kinship_client import KinshipClient

    with KinshipClient(server.address, timeout=120) as client:
        client.register_checkpoint(str(dirs["c"]), str(dirs["base"]))
        job = client.merge(str(dirs["a"]), str(dirs["b"]), t=0.5, output_path="ab", base=str(dirs["base"])).wait(timeout=120)
        assert job.state == "succeeded", job
        result = client.kinship(str(dirs["base"]), [job.output_path, str(dirs["c"])], mode="fingerprint")
        assert result.mode == "fingerprint"
        assert result.bytes_read == 0
        merged = _flat_delta(merges / "ab", {k: v for k, v in base.items()})
        other = _flat_delta(dirs["c"], base)
        expected = float(np.corrcoef(merged, other)[0, 1])
        assert abs(result.pairs[0].values.pcc - expected) < 0.01
