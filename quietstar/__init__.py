"""Quiet-STaR in raw PyTorch."""

from quietstar.loading import Tokenizer, load_pretrained, load_tokenizer

__all__ = ["Tokenizer", "load_pretrained", "load_tokenizer"]
