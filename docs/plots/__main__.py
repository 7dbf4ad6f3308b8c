"""Draw every figure of the docs: run each script of this folder, each in its own process.

``python docs/plots`` (what ``nox -s docs`` runs before ``mkdocs build``) runs every
``docs/plots/*.py`` except ``__main__.py`` and helpers named ``_*.py``; each writes its
PNGs into ``docs/img/`` (generated at every build, not committed). It stops at the first
script that fails, naming it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
IMG = HERE.parent / "img"


def main() -> int:
    IMG.mkdir(exist_ok=True)
    scripts = sorted(p for p in HERE.glob("*.py") if not p.name.startswith("_"))
    env = {**os.environ, "MPLBACKEND": "Agg"}
    for script in scripts:
        start, stamp = time.perf_counter(), time.time()
        done = subprocess.run([sys.executable, str(script)], cwd=HERE, env=env, check=False)
        if done.returncode:
            print(f"docs/plots/{script.name} failed (exit {done.returncode})", file=sys.stderr)
            return done.returncode
        wrote = sorted(p.name for p in IMG.glob("*.png") if p.stat().st_mtime >= stamp)
        took = time.perf_counter() - start
        print(f"docs/plots/{script.name}: {took:.1f}s {', '.join(wrote) or '(no PNG written)'}")
    print(f"{len(scripts)} plot scripts, {len(list(IMG.glob('*.png')))} PNGs in docs/img/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
