"""Training text through HF ``datasets``: the embedded corpus, a local file, or a Hub dataset.

The embedded default (Shakespeare's works, see ATTRIBUTION.md beside this file) is
split into train / validation by whole documents: documents are ordered by a hash of
their title and the first ``val_fraction`` of them are held out. The split does not
depend on any seed, so runs with different seeds see the same validation text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from pathlib import Path

from peer.data.hub import env_offline, first_line, offline_reason
from peer.errors import DataError

logger = logging.getLogger(__name__)

EMBEDDED = Path(__file__).with_name("shakespeare.jsonl.xz")
OFFLINE_HINT = "the default --dataset shakespeare is embedded in the package and needs no network"


@dataclasses.dataclass(frozen=True)
class HubDataset:
    path: str
    name: str | None
    text_field: str
    has_validation: bool
    max_docs: int | None = None  # for huge datasets: stream this many documents


HUB_DATASETS = {
    "wikitext-2-raw-v1": HubDataset("Salesforce/wikitext", "wikitext-2-raw-v1", "text", has_validation=True),
    "fineweb-edu": HubDataset("HuggingFaceFW/fineweb-edu", "sample-10BT", "text", has_validation=False, max_docs=20000),
}


@dataclasses.dataclass
class Corpus:
    """Documents of the train and validation splits, and a fingerprint that names their content."""

    train: list[str]
    validation: list[str]
    fingerprint: str


def load_corpus(dataset: str, val_fraction: float) -> Corpus:
    """Load ``dataset`` (``shakespeare``, a Hub name from :data:`HUB_DATASETS`, or a local file).

    :raises DataError: one line naming the dataset and the offline default
    """
    if dataset == "shakespeare":
        return _split_documents(_load_local(EMBEDDED), val_fraction, _file_digest(EMBEDDED))
    if dataset in HUB_DATASETS:
        return _load_hub(dataset, HUB_DATASETS[dataset], val_fraction)
    path = Path(dataset).expanduser()
    if path.is_file():
        return _split_documents(_load_local(path), val_fraction, _file_digest(path))
    known = ", ".join(["shakespeare", *HUB_DATASETS])
    raise DataError(f"unknown dataset {dataset!r}: use one of {known}, or the path of a .jsonl/.txt file")


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _load_local(path: Path) -> list[tuple[str, str]]:
    """(title, text) pairs from a JSON-lines file with a ``text`` field, or a plain text file
    (whose blank-line separated paragraphs are its documents)."""
    import datasets

    name = path.name.removesuffix(".xz").removesuffix(".gz")
    builder = "json" if name.endswith((".jsonl", ".json")) else "text"
    kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as e:  # datasets raises many types for unreadable files
        raise DataError(f"cannot read {path} with the datasets {builder!r} builder: {e}") from None
    if "text" not in ds.column_names:
        raise DataError(f"{path} has no 'text' field (columns: {', '.join(ds.column_names)})")
    titles = ds["title"] if "title" in ds.column_names else [f"{path.name}#{i}" for i in range(len(ds))]
    return list(zip(titles, ds["text"], strict=True))


def _split_documents(docs: list[tuple[str, str]], val_fraction: float, digest: str) -> Corpus:
    if len(docs) < 2:
        raise DataError("need at least 2 documents (paragraphs of a .txt file) to split train/validation, "
                        f"got {len(docs)}")
    order = sorted(range(len(docs)), key=lambda i: hashlib.sha256(f"{docs[i][0]}|{i}".encode()).hexdigest())
    n_val = min(len(docs) - 1, max(1, math.ceil(val_fraction * len(docs))))
    val = set(order[:n_val])
    train = [docs[i][1] for i in range(len(docs)) if i not in val]
    validation = [docs[i][1] for i in range(len(docs)) if i in val]
    return Corpus(train, validation, f"{digest}-val{val_fraction:g}")


def _load_hub(key: str, spec: HubDataset, val_fraction: float) -> Corpus:
    import datasets

    reason = offline_reason()
    where = f"cannot load dataset {key!r} ({spec.path}) from the Hugging Face Hub"
    if reason and not env_offline():
        raise DataError(f"{where}: {reason} (set HF_HUB_OFFLINE=1 to use a cached copy); {OFFLINE_HINT}")
    if env_offline():
        datasets.config.HF_HUB_OFFLINE = True  # the library read the variable at import; make sure it holds
    try:
        if spec.max_docs is None:
            dsd = datasets.load_dataset(spec.path, spec.name)
            # rows are lines of one running text (wikitext): keep each split as one document
            train = ["".join(dsd["train"][spec.text_field])]
            validation = ["".join(dsd["validation"][spec.text_field])] if spec.has_validation else None
        else:
            stream = datasets.load_dataset(spec.path, spec.name, split="train", streaming=True)
            train = [row[spec.text_field] for row in stream.take(spec.max_docs)]
            validation = None
    except Exception as e:  # offline, missing, gated: all end the same way for the user
        raise DataError(f"{where}: {first_line(e)}; {OFFLINE_HINT}") from None
    if validation is None:
        return _split_documents([(str(i), t) for i, t in enumerate(train)], val_fraction, f"hub-{key}")
    return Corpus(train, validation, f"hub-{key}")
