"""The import contracts in pyproject.toml ([tool.importlinter]), checked by import-linter: one-way
layers, training never importing the node, no import circles (imports inside functions count)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT


def test_import_contracts_are_kept():
    lint_imports = Path(sys.executable).with_name("lint-imports")
    run = subprocess.run([str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]


def test_serve_never_imports_the_training_code(tmp_path):
    probe = (
        "import sys, node.service\n"
        "node.service.NodeService.run = lambda self: None\n"
        "from ichnode.cli import main\n"
        "main(['serve', '--workers', '0'])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'training'))\n"
    )
    run = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "ICHNODE_DATA_DIR": str(tmp_path), "ICHNODE_CONFIG": ""})
    assert run.returncode == 0 and run.stdout.strip().endswith("[]"), run.stdout + run.stderr
