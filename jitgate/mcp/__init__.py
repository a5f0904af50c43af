"""The MCP front: governs agents' Model Context Protocol traffic to MCP servers over Streamable HTTP.

`config` (the servers, trusted issuers, origins and rules the `mcp:` policy section describes),
`rules` (who may call which tool with which arguments: allow, deny, require-approval), `protocol`
(JSON-RPC messages and the two protocol generations' header rules), `resource` (the OAuth protected
resource: RFC 9728 metadata, `WWW-Authenticate`, audience-bound tokens, Origin checks), `sse`
(event-by-event splitting of `text/event-stream` bodies), `messages` (what the front does to each
server message: tools/list filtering, masking, annotation learning), `audit` (one JSON line per
message), `ratelimit` (token buckets per identity), `sessions` (session ids bound to their caller),
`front` (the decisions per HTTP exchange, in order).
Nothing here imports mitmproxy; the adapter is addons/mcp_gateway.py.
"""
