"""The engine: runs a model chunk by chunk under a policy, on a cache it owns, and times it.

``executor`` (forward passes, quality and latency passes), ``cache`` and ``batched`` (the caches, written in
place; ``storage`` their buffers, ``masks`` which slots a query sees, ``cache_protocol`` what both caches
offer), ``eviction`` (choosing victims), ``attention`` (kvcompare's attention function), ``recorder`` (the
signals a policy reads), ``rope`` (re-rotation and per-layer rotaries), ``budgets``, ``timing``, ``memory``,
``physics`` (the bytes a step reads) and ``fidelity`` (the probe that a model is reproduced exactly).

The engine imports only the contracts and base modules below it, never run, analysis or report
(tests/test_layers.py).
"""
