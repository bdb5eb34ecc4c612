import os

import pytest
import torch

# Small models train faster on one thread, and QEMU gets the other core.
torch.set_num_threads(1)
os.environ.setdefault("PYTHONHASHSEED", "0")


@pytest.fixture(scope="session")
def build_root(tmp_path_factory):
    return tmp_path_factory.mktemp("builds")


@pytest.fixture(scope="session")
def zoo_build(build_root):
    """Compile a zoo model once per test session; returns its build folder."""
    from edgeprune.compile import compile_model

    cache = {}

    def get(name: str, target: str = "cortex-m7"):
        key = (name, target)
        if key not in cache:
            out = build_root / f"{name}-{target}"
            compile_model(name, target, out, log=lambda *a: None)
            cache[key] = out
        return cache[key]

    return get
