"""The sanvisor CLI against one lab (its own SANVISOR_LAB_HOME), for tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


class LabCli:
    def __init__(self, root: Path, name: str = "sv") -> None:
        self.root, self.name = root, name
        self.env = dict(os.environ, SANVISOR_LAB_HOME=str(root))

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "sanvisor", *args]

    def sv(self, *args: str, check: bool = True, timeout: float = 300
           ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "sanvisor", *args], capture_output=True,
                              text=True, env=self.env, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"sanvisor {' '.join(args)}: {proc.stderr}{proc.stdout}")
        return proc

    def js(self, *args: str) -> Any:
        return json.loads(self.sv("--json", *args).stdout)
