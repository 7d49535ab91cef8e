"""swarm-peer: a volunteer client for SWARM-parallel training of transformers."""

__version__ = "0.1.0"
