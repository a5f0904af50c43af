"""Guardrails: what nobody does without a second look, whatever their grant.

`rules` (the rule model and its matchers), `index` (rules by verb, resource and namespace, so a
decision stays flat with thousands of rules), `bodies` (what a create/update/patch would produce and
the findings the body rules look at), `protobuf` (the few Pod fields of kubectl's protobuf bodies),
`stdin` (typed lines of an interactive exec session), `decide` (one call's outcome), `approval`
(the digest that binds a require-approval request to exactly one call).
Nothing here imports mitmproxy.
"""
