"""Session recordings: every call kept per session, masked, without credentials, in files people's
tools read (mitmproxy flow files for mitmweb, HAR 1.2, asciicast v2 for exec and attach).

Plain modules (no mitmproxy): `sessions` (which session a call belongs to), `scrub` (credentials
out of every stored header, query and body), `flowfile` (the bytes of mitmproxy flow files), `har`
(a HAR file that is valid after every write), `cast` (asciicast v2 of exec/attach, typed input
masked), `index` (the SQLite index the CLI reads), `recorder` (the recordings folder and its open
sessions), `retention` (age and size limits, deletions recorded). addons/recording.py adapts them
to mitmproxy; jitgate/cli/sessions.py reads them for `jitgate sessions`.
"""
