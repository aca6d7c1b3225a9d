"""One measurement per fresh process, for the bench scripts that time a cold start (startup.py,
profile_compile.py): the script runs itself again as ``--child <contender>``, with Inductor's cache in
a folder of the parent's choosing, and prints its result as one ``RESULT <json>`` line."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

_PREFIX = "RESULT "


def run(script: str, contender: str, flags: list[str], cache_dir: str) -> dict:
    """``python script --child contender *flags`` in a fresh process whose ``TORCHINDUCTOR_CACHE_DIR``
    is ``cache_dir``: the dict of its ``RESULT`` line plus ``process_s`` (wall clock, with Python's start
    and the imports), or ``{"contender": ..., "error": <the end of its stderr>}`` when it printed none."""
    cmd = [sys.executable, script, "--child", contender, *flags]
    start = time.perf_counter()
    done = subprocess.run(cmd, env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}, capture_output=True, text=True)
    wall = time.perf_counter() - start
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith(_PREFIX)), None)
    if line is None:
        return {"contender": contender, "error": done.stderr[-1000:]}
    result = json.loads(line[len(_PREFIX):])
    result["process_s"] = wall
    return result


def report(result: dict) -> None:
    """The child's side: print ``result`` as the line ``run`` reads."""
    print(_PREFIX + json.dumps(result))


def cpu_kind() -> str:
    """The CPU's name and the instruction set the int8 kernels get (and any ``ONEDNN_MAX_CPU_ISA`` limit)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.processor())
    flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
    isa = "AVX-512 VNNI" if "avx512_vnni" in flags else "AVX2 without VNNI" if "avx2" in flags else "unknown ISA"
    limited = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return f"{name} ({isa}{', kernels limited to ' + limited if limited else ''})"
