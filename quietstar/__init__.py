"""Quiet-STaR in raw PyTorch."""

from quietstar.loading import Tokenizer, load_pretrained, load_tokenizer
from quietstar.model import ModelConfig, Transformer
from quietstar.thinker import QuietStar, ThoughtConfig
from quietstar import sequential  # noqa: F401  (registers thought.impl=sequential_dense)

__all__ = ["ModelConfig", "QuietStar", "ThoughtConfig", "Tokenizer", "Transformer", "load_pretrained",
           "load_tokenizer"]
