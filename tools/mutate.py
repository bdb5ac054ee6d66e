"""Mutation check: plant each listed one-line bug, run the tests that guard it, expect a failure.

Every mutant lives in ``mutants/*.yaml`` as::

    - id: safe-pickle-allow-list          # short, unique
      file: src/robustlab/data/safe_pickle.py
      find: 'if (module, name) in _ALLOWED'   # exact text, must occur exactly once
      replace: 'if True'
      tests: [tests/data/test_hostile.py]      # pytest targets that must fail
      why: the allow-list is what stops a hostile pickle from importing os.system

Mutants run in a scratch copy of the tree (``src``, ``tests``, ``configs``, ``pyproject.toml``)
with ``PYTHONPATH`` pointing at the copy, so the working tree is never modified and other
work can go on beside it. A mutant is *killed* when its tests fail; a surviving mutant
means a bug of that shape would land unnoticed. Exit status 1 when any survives.

Usage: python tools/mutate.py [mutants/x.yaml ...] [--only ID ...] [--jobs N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("src", "tests", "configs", "pyproject.toml")


def load_mutants(files: list[Path]) -> list[dict]:
    mutants, seen = [], set()
    for f in files:
        for m in yaml.safe_load(f.read_text()) or []:
            missing = {"id", "file", "find", "replace", "tests"} - set(m)
            if missing:
                raise SystemExit(f"{f}: mutant {m.get('id', '?')} lacks {sorted(missing)}")
            if m["id"] in seen:
                raise SystemExit(f"{f}: duplicate mutant id {m['id']}")
            seen.add(m["id"])
            text = (ROOT / m["file"]).read_text()
            count = text.count(m["find"])
            if count != 1:
                raise SystemExit(
                    f"{f}: mutant {m['id']}: {m['find']!r} occurs {count} times in {m['file']}"
                )
            mutants.append(m)
    return mutants


def run_one(m: dict) -> tuple[str, bool, float, str]:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"mutant-{m['id']}-") as tmp:
        tmp_root = Path(tmp)
        for name in COPIED:
            src = ROOT / name
            if src.is_dir():
                shutil.copytree(src, tmp_root / name, ignore=shutil.ignore_patterns("__pycache__"))
            elif src.exists():
                shutil.copy2(src, tmp_root / name)
        target = tmp_root / m["file"]
        target.write_text(target.read_text().replace(m["find"], m["replace"], 1))
        env = dict(os.environ, PYTHONPATH=str(tmp_root / "src"), ROBUSTLAB_PROGRESS="0")
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
               "-m", "not slow", *m["tests"]]  # fmt: skip
        proc = subprocess.run(cmd, cwd=tmp_root, env=env, capture_output=True, text=True)
        # a collection error or failure both kill; exit 5 (no tests) does not
        killed = proc.returncode not in (0, 5)
        tail = (proc.stdout.strip().splitlines() or [""])[-1]
    return m["id"], killed, time.perf_counter() - t0, tail


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args()
    files = args.files or sorted((ROOT / "mutants").glob("*.yaml"))
    mutants = load_mutants(files)
    if args.only:
        mutants = [m for m in mutants if m["id"] in args.only]
    killed = 0
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for mid, dead, seconds, tail in pool.map(run_one, mutants):
            killed += dead
            verdict = "killed  " if dead else "SURVIVED"
            print(f"{verdict} {mid:<40} {seconds:6.1f} s  {tail}", flush=True)
    print(f"mutation score: {killed}/{len(mutants)} killed")
    return 0 if killed == len(mutants) else 1


if __name__ == "__main__":
    sys.exit(main())
