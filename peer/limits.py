"""Data-plane limits whose default more than one module needs: the config (flags), the stage servicer that
receives hops and the client that sends them. One value each, here."""

ATTEMPT_TIMEOUT_S = 10.0
"""Seconds a peer may take to acknowledge a microbatch before the sender bans it and tries another
(``--attempt-timeout``): how fast a hung peer is found out."""

MAX_PAYLOAD_BYTES = 256 << 20
"""Largest tensor payload of one hop, in either direction: a stage peer refuses bigger inputs, a sender bigger
replies (256 MiB: a 4096-wide fp32 activation of 16 x 1024 tokens)."""
