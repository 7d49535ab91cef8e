"""The control plane on the hivemind DHT: peer records, announce/read helpers, bootstrap, inspector.

It imports nothing from ``peer``; the records and helpers arrive with the control-plane issue.
"""
