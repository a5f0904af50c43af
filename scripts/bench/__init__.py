"""The jitgate performance benchmark (issue #4): `scripts/benchmark` runs `scripts/bench/run.py`.

Modules: `bodies` (canned Kubernetes and OIDC documents), `upstream` (nginx, the idle-watch server,
STS), `proxies` (bare mitmdump and the gateway, with /proc accounting), `load` (wrk, hey and a
pure-Python client), `curves` (in-process scaling curves), `report` (markdown table and plots).
"""
