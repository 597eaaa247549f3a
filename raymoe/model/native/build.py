"""Build raymoe's C kernels on first use and load them with ctypes.

Each `<name>.c` beside this file compiles to a shared library in the cache folder
(`raymoe.model.builtin.cache_dir`), named by a hash of its source (with the headers and the other
sources, which it may include), the flags, the compiler and this machine's CPU, so a changed kernel
or another CPU builds anew and every process after the first loads it at once (processes racing to
build each write their own file and rename it in place).
`-march=native`: the kernels are built where they run.

No compiler, a failed build or `RAYMOE_NATIVE=0` in the environment: `library` returns None once
logged, and callers keep their torch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from raymoe.model.builtin import cache_dir

logger = logging.getLogger(__name__)

ENV = "RAYMOE_NATIVE"  # "0": never build or load, the torch paths run
FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast", "-shared", "-fPIC"]
SOURCE_DIR = Path(__file__).parent


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


def compiler() -> str | None:
    """The C compiler the kernels build with: `$CC`, else `cc` or `gcc` on PATH; None if none."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


@functools.cache
def library(name: str) -> ctypes.CDLL | None:
    """`<name>.c` built and loaded; None where it cannot be (logged once)."""
    if not enabled():
        return None
    cc = compiler()
    if cc is None:
        logger.warning("no C compiler (cc or gcc) found: raymoe's %s kernel is off, torch's path runs", name)
        return None
    source = b"".join(path.read_bytes() for path in [SOURCE_DIR / f"{name}.c", *_shared_sources(name)])
    try:
        return ctypes.CDLL(str(_built(name, source, cc)))
    except subprocess.CalledProcessError as e:
        why = (e.stderr or b"").decode(errors="replace").strip()[-500:] or f"exit status {e.returncode}"
    except (OSError, subprocess.SubprocessError) as e:
        why = str(e)
    logger.warning("raymoe's %s kernel did not build with %s (%s): torch's path runs", name, cc, why)
    return None


def _shared_sources(name: str) -> list[Path]:
    """What `<name>.c` may include: the headers, and the other kernels' sources (`layer.c` is built
    as one unit with them)."""
    return sorted(p for p in SOURCE_DIR.glob("*.[ch]") if p.name != f"{name}.c")


def _built(name: str, source: bytes, compiler: str) -> Path:
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), compiler.encode(), _cpu().encode()]))
    base = cache_dir() / "kernels"
    final = base / f"{name}-{key.hexdigest()[:16]}.so"
    if final.is_file():
        return final
    base.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".so", dir=base)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, str(SOURCE_DIR / f"{name}.c"), "-o", tmp], check=True,
                       capture_output=True, timeout=120)
        os.replace(tmp, final)  # atomic: a reader sees no file or a whole one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return final


def _cpu() -> str:
    """This machine's CPU model and flags (what `-march=native` compiles for)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine() + platform.processor()
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
    return platform.machine() + "\n".join(sorted(set(lines)))


def bind(name: str, symbol: str, argtypes: list, restype=ctypes.c_int) -> ctypes._CFuncPtr | None:
    """`symbol` of `<name>.c` with its argument and result types set, or None (not built)."""
    lib = library(name)
    if lib is None:
        return None
    fn = getattr(lib, symbol)
    if fn.argtypes is None:
        fn.argtypes, fn.restype = argtypes, restype
    return fn
