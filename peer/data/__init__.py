"""Data: the embedded corpus and Hub datasets, tokenizers, packing into training windows."""

from peer.data.corpus import Corpus, load_corpus
from peer.data.loader import TokenizedCorpus, TrainStream, Windows, load_data, load_tokenizer, validation_batches
from peer.data.tokenizer import TextTokenizer

__all__ = [
    "Corpus",
    "TextTokenizer",
    "TokenizedCorpus",
    "TrainStream",
    "Windows",
    "load_corpus",
    "load_data",
    "load_tokenizer",
    "validation_batches",
]
