"""Byte-level BPE tokenizer: `from tinyllm.tokenizer import Tokenizer`."""

from .bpe import ENDOFTEXT, Tokenizer, TokenizerFileError
from .patterns import GPT2_PATTERN, GPT4_PATTERN, O200K_PATTERN, PATTERNS

__all__ = ["Tokenizer", "TokenizerFileError", "ENDOFTEXT", "PATTERNS", "GPT2_PATTERN",
           "GPT4_PATTERN", "O200K_PATTERN"]
