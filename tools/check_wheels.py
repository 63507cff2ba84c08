"""Does the base install resolve to wheels only on each platform users run?

For Linux x86_64, Linux aarch64 (GH200-class machines) and macOS arm64, pip resolves the base
dependencies of pyproject.toml with `--only-binary=:all:` for that platform (`pip install
--dry-run --report`, nothing is installed) and the script prints one JSON line per platform: ok,
the number of packages, and pip's last lines when it cannot. Run: `make check-wheels`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

PLATFORMS = {
    "linux-x86_64": ["manylinux2014_x86_64", "manylinux_2_28_x86_64"],
    "linux-aarch64": ["manylinux2014_aarch64", "manylinux_2_28_aarch64"],
    "macos-arm64": ["macosx_14_0_arm64", "macosx_13_0_arm64", "macosx_12_0_arm64", "macosx_11_0_arm64"],
}


def check(name: str, tags: list[str], requirements: Path, python: str) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
               "--only-binary=:all:", "--python-version", python, "--implementation", "cp", "--target", tmp,
               "--report", str(report), "-r", str(requirements)]
        for tag in tags:
            cmd += ["--platform", tag]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING: Location")]
            return {"platform": name, "ok": False, "pip": lines[-8:]}
        packages = json.loads(report.read_text())["install"]
        return {"platform": name, "ok": True, "packages": len(packages)}


def main() -> int:
    root = Path(__file__).resolve().parents[1]
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as fh:
        fh.write("\n".join(deps) + "\n")
    results = [check(name, tags, Path(fh.name), python) for name, tags in PLATFORMS.items()]
    for result in results:
        print(json.dumps(result))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
