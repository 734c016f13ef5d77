"""CLIP tokenizers made offline, for small models: a vocabulary of single characters, or one
with merges that spell chosen words as one token (the demo model's)."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["byte_characters", "save_clip_tokenizer", "write_char_tokenizer"]


def byte_characters() -> list[str]:
    """The 256 printable characters byte-level BPE tokenizers (CLIP's) use for the 256 bytes:
    printable Latin-1 bytes stand for themselves, the others map to code points from 256 up."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("\u00a1"), ord("\u00ac") + 1))
    printable |= set(range(ord("\u00ae"), ord("\u00ff") + 1))
    chars = []
    extra = 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def save_clip_tokenizer(folder: Path, vocab: dict[str, int], merges: list[str], max_length: int) -> None:
    """Write ``vocab.json`` and ``merges.txt`` (``"a b"`` lines, in rank order) into ``folder``
    and save the ``CLIPTokenizer`` they make there with ``save_pretrained``."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{merge}\n" for merge in merges))
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)
    tokenizer.save_pretrained(str(folder))


def write_char_tokenizer(folder: Path) -> None:
    """A CLIP tokenizer whose vocabulary is single characters (no merges): small and offline."""
    chars = byte_characters()
    vocab: dict[str, int] = {}
    for char in chars:
        vocab[char] = len(vocab)
    for char in chars:
        vocab[char + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    save_clip_tokenizer(folder, vocab, [], max_length=32)
