"""The `kinship` CLI and the Prometheus endpoint, against a real server."""

from __future__ import annotations

import json
import urllib.request

from kinship_client.cli import main as cli_main

from .free_ports import free_port


def test_cli_table_and_json(server, family, capsys):
    paths = family["paths"]
    args = ["--target", server.address, "kinship", "--base", str(paths["base"]), str(paths["m0"]), str(paths["m1"])]
    assert cli_main(args) == 0
    table = capsys.readouterr().out
    assert "PCC" in table and "mean over pairs" in table
    assert cli_main([*args, "--json", "--per-layer"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["mode"] == "exact"
    assert len(data["pairs"]) == 1 and {"pcc", "cosine", "euclidean"} <= set(data["pairs"][0])
    assert {layer["group"] for layer in data["layers"]} >= {"layers.0", "layers.1"}


def test_cli_reports_errors_with_code(server, family, capsys):
    paths = family["paths"]
    code = cli_main(["--target", server.address, "kinship", "--base", str(paths["base"]), "/etc", str(paths["m0"])])
    assert code == 1
    assert "PERMISSION_DENIED" in capsys.readouterr().err


def test_metrics_endpoint(server_factory, family):
    port = free_port()
    server = server_factory(metrics_port=port)
    from kinship_client import KinshipClient, KinshipRpcError

    paths = family["paths"]
    with KinshipClient(server.address) as client:
        client.kinship(str(paths["base"]), [str(paths["m0"]), str(paths["m1"])], mode="exact")
        try:
            client.kinship(str(paths["base"]), [str(paths["m0"])])
        except KinshipRpcError:
            pass
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'grpc_server_handled_total{grpc_code="OK",grpc_method="Kinship",grpc_service="kinship.v1.KinshipService",grpc_type="unary"}' in text
    assert 'grpc_code="InvalidArgument",grpc_method="Kinship"' in text
    assert "grpc_server_handling_seconds_bucket" in text
    assert "kinship_checkpoint_bytes_read_total" in text
    assert "kinship_tensors_compared_total" in text
