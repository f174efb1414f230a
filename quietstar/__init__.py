"""Quiet-STaR in raw PyTorch.

The only top-level name the project installs is `quietstar`. Its public names (`from quietstar import
QuietStar, ThoughtConfig, Transformer, ModelConfig, load_pretrained, ...`) load on first use.

The Triton kernels in the checkout's kernels/ folder import as `quietstar.kernels`: an install copies the
folder into the package (pyproject's package-dir), and from a checkout `_checkout_kernels` below points the
subpackage at it. The folder has no __init__.py, so that `import kernels` from the repository root stays
Hugging Face's `kernels` package.
"""

import importlib.machinery
import importlib.util
import sys
from pathlib import Path


def _checkout_kernels() -> None:
    """Register the checkout's kernels/ folder as `quietstar.kernels` unless an install already ships it."""
    name = __name__ + ".kernels"
    if name in sys.modules or importlib.util.find_spec(name) is not None:
        return
    folder = Path(__file__).resolve().parent.parent / "kernels"
    if not (folder / "thought_attention.py").is_file():
        return
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [str(folder)]
    sys.modules[name] = globals()["kernels"] = importlib.util.module_from_spec(spec)


_checkout_kernels()

# The public names, imported when first used: `import quietstar.model` loads the core alone, no method.
_PUBLIC = {"ModelConfig": "quietstar.model", "Transformer": "quietstar.model", "Tokenizer": "quietstar.tokenizer",
           "load_pretrained": "quietstar.loading", "load_tokenizer": "quietstar.loading",
           "QuietStar": "quietstar.methods.quietstar.thinker", "ThoughtConfig": "quietstar.methods.quietstar.config"}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'quietstar' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
