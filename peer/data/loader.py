"""Token streams, packing and batching.

Each split's documents are tokenized, joined with end-of-text tokens into one stream
and cut into windows of ``seq_len + 1`` tokens that overlap by one token (input
``w[:-1]``, target ``w[1:]``), so every token is a target exactly once per epoch.
Training draws windows in a seeded random order, epoch after epoch, forever; its
position (epoch, cursor) is part of a checkpoint so a resumed run sees the same
batches. Validation uses the first windows of the validation stream, in order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock

from peer.config import DataConfig
from peer.data.corpus import Corpus, load_corpus
from peer.data.tokenizer import TextTokenizer, load_bpe, load_hub_tokenizer
from peer.errors import DataError

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TokenizedCorpus:
    tokenizer: TextTokenizer
    train: np.ndarray  # (N_train,) token ids, int32
    validation: np.ndarray  # (N_val,) token ids, int32

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


def load_tokenizer(cfg: DataConfig, corpus: Corpus | None = None) -> TextTokenizer:
    """The tokenizer of ``cfg``: a trained ``bpe`` (it needs the corpus: loaded unless given), or a Hub one."""
    if cfg.tokenizer == "bpe":
        corpus = corpus or load_corpus(cfg.dataset, cfg.val_fraction)
        return load_bpe(cfg.cache_dir, corpus.fingerprint, cfg.vocab_size, lambda: corpus.train)[0]
    return load_hub_tokenizer(cfg.tokenizer)


def load_data(cfg: DataConfig) -> TokenizedCorpus:
    """Corpus -> tokenizer -> token streams, each cached under ``cfg.cache_dir``."""
    corpus = load_corpus(cfg.dataset, cfg.val_fraction)
    tokenizer = load_tokenizer(cfg, corpus)
    return TokenizedCorpus(
        tokenizer,
        _cached_tokens(cfg.cache_dir, corpus, tokenizer, "train"),
        _cached_tokens(cfg.cache_dir, corpus, tokenizer, "validation"),
    )


def _cached_tokens(cache_dir: Path, corpus: Corpus, tokenizer: TextTokenizer, split: str) -> np.ndarray:
    key = hashlib.sha256(f"{corpus.fingerprint}|{tokenizer.fingerprint}|{split}".encode()).hexdigest()[:16]
    path = Path(cache_dir) / "tokens" / f"{split}-{key}.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock", timeout=600):
        if path.exists():
            return np.load(path)
        docs = getattr(corpus, split)
        ids = tokenizer.encode_batch(docs)
        stream = np.fromiter(
            (t for doc in ids for t in (*doc, tokenizer.eos_id)), dtype=np.int32, count=sum(len(d) + 1 for d in ids)
        )
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, stream)
        tmp.replace(path)
        return stream


class Windows:
    """A token stream viewed as ``len(self)`` windows of ``seq_len + 1`` tokens (no copy)."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        count = (len(tokens) - 1) // seq_len
        if count < 1:
            raise DataError(f"the stream has {len(tokens)} tokens, fewer than one sequence of {seq_len + 1}")
        self.seq_len = seq_len
        stride = tokens.strides[0]
        self.view = np.lib.stride_tricks.as_strided(
            tokens, shape=(count, seq_len + 1), strides=(seq_len * stride, stride), writeable=False
        )

    def __len__(self) -> int:
        return self.view.shape[0]

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """:returns: inputs and targets, each (B, T) int64"""
        rows = torch.from_numpy(self.view[indices].astype(np.int64))  # (B, T + 1)
        return rows[:, :-1], rows[:, 1:]


class TrainStream:
    """Endless, seeded, resumable micro-batches of training windows.

    ``shard``/``num_shards`` give disjoint slices of every epoch to several data owners.
    """

    def __init__(self, windows: Windows, microbatch_size: int, seed: int, shard: int = 0, num_shards: int = 1):
        if len(windows) // num_shards < microbatch_size:
            raise DataError(
                f"training split has {len(windows)} sequences, fewer than {num_shards} x {microbatch_size} needed"
            )
        self.windows, self.microbatch_size, self.seed = windows, microbatch_size, seed
        self.shard, self.num_shards = shard, num_shards
        self.epoch, self.cursor = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.windows))
        return perm[self.shard :: self.num_shards]

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next micro-batch: inputs and targets, each (microbatch_size, seq_len) int64."""
        if self.cursor + self.microbatch_size > len(self._order):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        idx = self._order[self.cursor : self.cursor + self.microbatch_size]
        self.cursor += self.microbatch_size
        return self.windows.batch(idx)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "shard": self.shard}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._epoch_order(self.epoch)


def validation_batches(windows: Windows, microbatch_size: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``count`` micro-batches of the validation windows, always the same ones."""
    count = min(count, max(1, len(windows) // microbatch_size))
    size = min(microbatch_size, len(windows))
    return [windows.batch(np.arange(i * size, (i + 1) * size)) for i in range(count)]
