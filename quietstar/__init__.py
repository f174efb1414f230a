"""Quiet-STaR in raw PyTorch."""

from quietstar.loading import Tokenizer, load_pretrained, load_tokenizer
from quietstar.model import ModelConfig, Transformer
from quietstar.thinker import QuietStar, ThoughtConfig

__all__ = ["ModelConfig", "QuietStar", "ThoughtConfig", "Tokenizer", "Transformer", "load_pretrained",
           "load_tokenizer"]
