"""The embedded corpus, its document split, the cached BPE tokenizer, and packing."""

import numpy as np
import pytest
import torch

from peer.data import TrainStream, Windows, load_corpus, load_data, validation_batches
from peer.data.tokenizer import EOS, bpe_cache_path, load_bpe
from peer.config import load_config
from peer.errors import DataError


def test_embedded_corpus_splits_by_document_deterministically():
    a = load_corpus("shakespeare", 0.1)
    b = load_corpus("shakespeare", 0.1)
    assert len(a.train) + len(a.validation) == 42 and len(a.validation) == 5
    assert a.train == b.train and a.validation == b.validation and a.fingerprint == b.fingerprint
    assert not set(a.train) & set(a.validation)
    assert load_corpus("shakespeare", 0.2).fingerprint != a.fingerprint


def test_tokenizer_is_trained_once_then_loaded_from_cache(tmp_path):
    corpus = load_corpus("shakespeare", 0.1)
    texts = corpus.train[:3]
    tok, trained = load_bpe(tmp_path, "fp-test", 400, lambda: texts)
    assert trained and tok.vocab_size == 400
    path = bpe_cache_path(tmp_path, "fp-test", 400)
    mtime = path.stat().st_mtime_ns

    def must_not_train():
        raise AssertionError("the cached tokenizer was not reused")

    again, trained_again = load_bpe(tmp_path, "fp-test", 400, must_not_train)
    assert not trained_again and path.stat().st_mtime_ns == mtime
    sample = "To be, or not to be: that is the question."
    assert again.encode_batch([sample]) == tok.encode_batch([sample])
    assert again.decode(again.encode_batch([sample])[0]) == sample
    assert again.eos_id == again.backend.token_to_id(EOS)


def test_token_streams_separate_documents_and_windows_shift_by_one(corpus):
    eos = corpus.tokenizer.eos_id
    assert corpus.train.dtype == np.int32 and (corpus.train == eos).sum() == 37
    assert corpus.vocab_size == 8192 and corpus.train.max() < 8192
    windows = Windows(corpus.train, 128)
    x, y = windows.batch(np.array([0, 5]))
    assert x.shape == y.shape == (2, 128) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(x[1], torch.from_numpy(corpus.train[5 * 128 : 6 * 128].astype(np.int64)))


def test_train_stream_is_reproducible_resumable_and_sharded(corpus):
    windows = Windows(corpus.train, 64)
    a, b = TrainStream(windows, 4, seed=1), TrainStream(windows, 4, seed=1)
    first = [a.next()[0] for _ in range(3)]
    state = a.state_dict()
    after = [a.next()[0] for _ in range(3)]
    assert all(torch.equal(p, q) for p, q in zip(first, [b.next()[0] for _ in range(3)], strict=True))
    b.load_state_dict(state)
    assert all(torch.equal(p, q) for p, q in zip(after, [b.next()[0] for _ in range(3)], strict=True))
    assert not torch.equal(TrainStream(windows, 4, seed=2).next()[0], first[0])
    s0, s1 = TrainStream(windows, 4, 1, shard=0, num_shards=2), TrainStream(windows, 4, 1, shard=1, num_shards=2)
    assert not set(s0._order.tolist()) & set(s1._order.tolist())


def test_stream_wraps_into_a_new_epoch():
    windows = Windows(np.arange(1 + 8 * 10, dtype=np.int32), 8)  # 10 windows
    stream = TrainStream(windows, 3, seed=0)
    seen = [stream.next()[0][:, 0] // 8 for _ in range(3)]
    assert stream.epoch == 0 and len(set(torch.cat(seen).tolist())) == 9
    stream.next()
    assert stream.epoch == 1 and stream.cursor == 3


def test_validation_batches_are_fixed(corpus):
    windows = Windows(corpus.validation, 128)
    a, b = validation_batches(windows, 4, 3), validation_batches(windows, 4, 3)
    assert len(a) == 3 and all(torch.equal(p[0], q[0]) for p, q in zip(a, b, strict=True))


def test_local_text_file_is_a_dataset(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("".join(f"paragraph {i}\nsecond line\n\n" for i in range(20)))
    corpus = load_corpus(str(path), 0.1)
    assert len(corpus.train) == 18 and len(corpus.validation) == 2
    assert corpus.train[0].startswith("paragraph ")
    (tmp_path / "one.txt").write_text("just one paragraph")
    with pytest.raises(DataError, match="at least 2 documents"):
        load_corpus(str(tmp_path / "one.txt"), 0.1)


def test_unknown_and_offline_hub_datasets_fail_with_one_clear_line(monkeypatch):
    with pytest.raises(DataError, match="unknown dataset 'nope'.*shakespeare"):
        load_corpus("nope", 0.1)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as err:
        load_corpus("wikitext-2-raw-v1", 0.1)
    message = str(err.value)
    assert "wikitext-2-raw-v1" in message and "--dataset shakespeare" in message and "\n" not in message


def test_hub_tokenizer_offline_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config({"tokenizer": "meta-llama/Llama-2-7b-hf"})
    with pytest.raises(DataError, match="cannot load tokenizer 'meta-llama/Llama-2-7b-hf'.*--tokenizer bpe"):
        load_data(cfg.data)
