"""The exact instruction-count plugin for QEMU, built on first use into the user cache."""

import hashlib
import os
import subprocess
from pathlib import Path

from ..errors import EdgepruneError

SOURCE = Path(__file__).with_name("icount.c")


def plugin_path() -> Path:
    """Path of libicount.so, compiling it (once per source version) with the host gcc."""
    src = SOURCE.read_bytes()
    digest = hashlib.sha256(src).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgeprune"
    so = cache / f"libicount-{digest}.so"
    if so.exists():
        return so
    cache.mkdir(parents=True, exist_ok=True)
    tmp = so.with_suffix(f".{os.getpid()}.tmp")
    cmd = ["gcc", "-O2", "-shared", "-fPIC", "-fvisibility=hidden", "-o", str(tmp), str(SOURCE)]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise EdgepruneError("gcc is not installed; it builds the QEMU counting plugin (make setup)")
    except subprocess.CalledProcessError as e:
        raise EdgepruneError(f"building the QEMU plugin failed:\n{e.stderr}")
    tmp.replace(so)
    return so
