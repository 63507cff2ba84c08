"""Does the base install resolve to wheels only on each platform users run?

For Linux x86_64, Linux aarch64 (GH200-class machines) and macOS arm64, `uv pip compile` resolves
the base dependencies of pyproject.toml with `--only-binary :all:` for that target (uv evaluates
environment markers for the target platform; pip's `--platform` keeps the host's markers and so
cannot answer this) and the script prints one JSON line per platform: ok, the number of pinned
packages and the torch / av versions chosen, or uv's last lines. Nothing is installed.
Run: `make check-wheels` (needs the package index).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib

PLATFORMS = {"linux-x86_64": "x86_64-manylinux_2_28", "linux-aarch64": "aarch64-manylinux_2_28",
             "macos-arm64": "aarch64-apple-darwin"}


def check(name: str, target: str, requirements: Path, python: str, uv: str) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        lock = Path(tmp) / "lock.txt"
        proc = subprocess.run([uv, "pip", "compile", str(requirements), "--python-platform", target, "--python-version",
                               python, "--only-binary", ":all:", "--no-header", "--quiet", "-o", str(lock)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            return {"platform": name, "ok": False, "uv": proc.stderr.strip().splitlines()[-8:]}
        pins = dict(line.split("==", 1) for line in lock.read_text().splitlines() if "==" in line and not line.startswith(" "))
        return {"platform": name, "ok": True, "packages": len(pins), "torch": pins.get("torch"), "av": pins.get("av"),
                "decord": pins.get("decord")}


def main() -> int:
    uv = shutil.which("uv") or str(Path(sys.executable).with_name("uv"))
    if not Path(uv).exists():
        print("error: uv is needed (pip install uv; it is in merv[dev])", file=sys.stderr)
        return 2
    root = Path(__file__).resolve().parents[1]
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as fh:
        fh.write("\n".join(deps) + "\n")
    results = [check(name, target, Path(fh.name), python, uv) for name, target in PLATFORMS.items()]
    for result in results:
        print(json.dumps(result))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
