"""Console logging of every swarm-peer process (the CLI and the processes it starts): one compact line per
record, ``HH:MM:SS L module | message``, our loggers at INFO (DEBUG with ``--debug``), noisy libraries at ERROR."""

from __future__ import annotations

import logging
import sys


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        record.short = record.name.removeprefix("peer.").removeprefix("dht.")
        return super().format(record)


def setup_logging(debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    fmt = "%(asctime)s %(levelname).1s %(short)s | %(message)s"
    handler.setFormatter(_Formatter(fmt, datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    for name in ("peer", "dht", "__main__"):
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.INFO)
    for noisy in ("datasets", "transformers", "filelock", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
