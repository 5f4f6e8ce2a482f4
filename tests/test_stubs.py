"""The committed stubs are exactly what the protos generate."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_committed_stubs_match_the_protos():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr + "\nRun: python scripts/gen_proto.py"


def test_client_imports_without_torch():
    code = "import sys, kinship_client, kinship_client.cli; assert 'torch' not in sys.modules, 'client pulled in torch'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
