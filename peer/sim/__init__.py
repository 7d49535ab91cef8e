"""A discrete-event simulator of SWARM at internet scale, driving the project's own routing and rebalancing.

``world`` (devices, links, who is there when), ``costs`` (what compute, transfers, rounds and downloads take),
``engine`` (the event loop), ``systems`` + ``dataplane`` (SWARM with and without rebalancing, static pipelines),
``oracle`` (the best static assignment), ``run`` (one simulation's figures), ``report`` (JSON and plots).
``swarm-peer simulate`` is its command; the README's "Simulator" section describes the model and its figures.
Standard library only (and matplotlib for the plots): no torch, no network.
"""
