"""Tokenizers: a byte-level BPE trained on the corpus (cached on disk), or a Hub tokenizer.

The trained tokenizer is stored as ``<cache_dir>/tokenizers/bpe-<key>.json`` where the
key hashes the corpus fingerprint and the vocabulary size; a file lock makes peers that
start together train it once.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Callable, Sequence

from filelock import FileLock

from peer.data.hub import first_line, offline_reason
from peer.errors import DataError

logger = logging.getLogger(__name__)

EOS = "<|endoftext|>"
BPE_VERSION = "bpe-v1"  # bump when the training recipe changes, so old caches are not reused


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` with the end-of-text id used to separate documents."""

    def __init__(self, backend, name: str, eos_id: int, fingerprint: str):
        self.backend, self.name, self.eos_id, self.fingerprint = backend, name, eos_id, fingerprint

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [enc.ids for enc in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids))


def bpe_cache_path(cache_dir: Path, corpus_fingerprint: str, vocab_size: int) -> Path:
    key = hashlib.sha256(f"{BPE_VERSION}|{corpus_fingerprint}|{vocab_size}".encode()).hexdigest()[:16]
    return Path(cache_dir) / "tokenizers" / f"bpe-{key}.json"


def train_bpe(texts: Sequence[str], vocab_size: int):
    """A byte-level BPE (GPT-2 style pre-tokenisation, no unknown tokens) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def load_bpe(cache_dir: Path, corpus_fingerprint: str, vocab_size: int, train_texts: Callable[[], Sequence[str]]):
    """The cached BPE for this corpus and size, training (once, under a lock) if it is missing.

    :returns: (tokenizer, trained) where ``trained`` says whether this call trained it
    """
    from tokenizers import Tokenizer

    path = bpe_cache_path(cache_dir, corpus_fingerprint, vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock", timeout=600):
        if path.exists():
            try:
                tok, trained = Tokenizer.from_file(str(path)), False
            except Exception as e:
                logger.warning("cached tokenizer %s is unreadable (%s); training a new one", path, e)
                path.unlink()
        if not path.exists():
            logger.info("training a %d-token byte-level BPE on the corpus (cached at %s)", vocab_size, path)
            tok, trained = train_bpe(train_texts(), vocab_size), True
            tmp = path.with_suffix(".tmp")
            tok.save(str(tmp))
            tmp.replace(path)
    fingerprint = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return TextTokenizer(tok, f"bpe-{vocab_size}", tok.token_to_id(EOS), fingerprint), trained


def load_hub_tokenizer(name: str) -> TextTokenizer:
    """A Hub tokenizer by name (from the local HF cache if it is there, else downloaded)."""
    from transformers import AutoTokenizer

    hint = "the default --tokenizer bpe is trained locally and needs no network"
    try:
        hf = AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception:
        reason = offline_reason()
        if reason:
            raise DataError(f"cannot load tokenizer {name!r}: not in the local Hugging Face cache and {reason}; "
                            f"{hint}") from None
        try:
            hf = AutoTokenizer.from_pretrained(name)
        except Exception as e:
            raise DataError(f"cannot load tokenizer {name!r} from the Hugging Face Hub: {first_line(e)}; "
                            f"{hint}") from None
    backend = getattr(hf, "backend_tokenizer", None) or getattr(hf, "_tokenizer", None)
    if backend is None:
        raise DataError(f"tokenizer {name!r} has no fast (Rust) backend; use a tokenizer with tokenizer.json")
    eos_id = hf.eos_token_id if hf.eos_token_id is not None else hf.sep_token_id
    if eos_id is None:
        raise DataError(f"tokenizer {name!r} has no end-of-text token to separate documents")
    fingerprint = hashlib.sha256(backend.to_str().encode()).hexdigest()[:16]
    return TextTokenizer(backend, name, eos_id, fingerprint)
