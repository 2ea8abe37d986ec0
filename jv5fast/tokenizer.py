"""Text → token ids with the checkpoint's own ``tokenizer.json`` (HF tokenizers, Rust, thread-safe).

Truncation keeps the special tokens the post-processor appends (nano's EOS 128001 survives: the
sequence becomes max_length-1 content ids + EOS), as HF does. Lone surrogates, which the Rust
tokenizer cannot take, become U+FFFD first (tiktoken's convention); other control characters pass
through unchanged. Truncation is configured once at load and never mutated afterwards, so concurrent
calls never hit "Already borrowed".
"""
from __future__ import annotations

import os
import re

_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(s: str) -> str:
    """Replace lone surrogates with U+FFFD; leave everything else as given."""
    if _SURROGATE.search(s) is None:
        return s
    return s.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


class Tokenizer:
    def __init__(self, folder: str, max_length: int):
        from tokenizers import Tokenizer as HFTokenizer

        path = os.path.join(folder, "tokenizer.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"missing file: {path}")
        try:
            tok = HFTokenizer.from_file(path)
        except Exception as e:
            raise ValueError(f"corrupt tokenizer file {path}: {e}") from None
        tok.no_padding()
        tok.enable_truncation(max_length=max_length, strategy="longest_first", direction="right", stride=0)
        self._tok, self.max_length, self.path = tok, max_length, path
        self._full = None

    def encode(self, texts):
        """list[str] -> (list of id lists, list of bools: was the text truncated)."""
        encs = self._tok.encode_batch([clean_text(t) for t in texts], add_special_tokens=True)
        return [e.ids for e in encs], [bool(e.overflowing) for e in encs]

    def untruncated(self):
        """The same tokenizer without truncation (a separate HF object built on first use and never mutated
        afterwards, so the shared one is never touched): error messages and overflow='chunk'."""
        if self._full is None:
            from tokenizers import Tokenizer as HFTokenizer
            full = HFTokenizer.from_file(self.path)
            full.no_truncation()
            full.no_padding()
            self._full = full
        return self._full

    def count_untruncated(self, text: str) -> int:
        """Token count of ``text`` without truncation (used only to word an error). ``encode_batch``, not
        ``encode``: only the batch call releases the GIL, and a megabyte text takes seconds."""
        return len(self.untruncated().encode_batch([clean_text(text)], add_special_tokens=True)[0].ids)
