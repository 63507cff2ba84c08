"""`merv train --nproc N`: start N local processes with torchrun on the same config.

On several nodes run torchrun yourself, e.g.
  torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HEAD:29500 \\
      -m merv.train.trainer run/config.json
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any


def launch_torchrun(config: Any, nproc: int, extra_args: list[str] | None = None) -> int:
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "launch_config.json"
    cfg_path.write_text(json.dumps(config.to_json(), indent=1))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           *(extra_args or []), "-m", "merv.train.trainer", str(cfg_path)]
    return subprocess.call(cmd)
