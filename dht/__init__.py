"""The control plane on the hivemind DHT: peer records, announce/read helpers, bootstrap, inspector.

Modules, one responsibility each (``dht`` imports nothing from ``peer``):

* :mod:`dht.keys` - key names ``{run}_stage_{k}`` and ``{run}_config`` (no hivemind import)
* :mod:`dht.records` - the records as pydantic models: :class:`~dht.records.PeerRecord`,
  :class:`~dht.records.RunConfigRecord`, :func:`~dht.records.config_hash` (no hivemind import)
* :mod:`dht.schema` - the pydantic.v1 schema for hivemind's ``SchemaValidator``, derived from the records
* :mod:`dht.signing` - owner subkeys, RSA keys, a multi-key signature validator
* :mod:`dht.node` - :class:`~dht.node.SwarmNode`: a DHT node with the run's validators
* :mod:`dht.announce` - :class:`~dht.announce.Announcer`: a peer's record, refreshed, OFFLINE on stop
* :mod:`dht.peers` - :func:`~dht.peers.live_peers` and friends: the peers of each stage
* :mod:`dht.runconfig` - publish / fetch / check the run's config record
* :mod:`dht.bootstrap`, :mod:`dht.inspector` - the two commands that use the DHT alone

This package imports hivemind lazily (only the modules that need it do), because importing
hivemind installs uvloop's event-loop policy.
"""
