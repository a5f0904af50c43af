"""Response masking: no secret value leaves the gateway unless a grant reveals it.

`detectors` (named patterns and secret-name words), `objects` (Kubernetes objects in every shape:
Secrets, lists, Tables, watch events, last-applied annotations, env, ConfigMaps) and `streams`
(incremental maskers with bounded memory for watch streams, logs and exec/attach frames).
Plain Python: the mitmproxy adapter is addons/masking.py.
"""
