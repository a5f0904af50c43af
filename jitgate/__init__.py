"""jitgate: just-in-time access gateway for the Kubernetes API.

Plain modules here hold the Kubernetes and policy knowledge and import nothing from
mitmproxy; the mitmproxy addons in ../addons are thin adapters over them.
"""
