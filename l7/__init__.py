"""The L7 seam: one module per L7 protocol, shared by the policy oracle and the proxy.

Each protocol module holds what both sides need to agree on: its rule type, request
normalization as the rules see it, the matching, the decision for one request against one rule
set, and the fields it adds to a flow record. This package imports neither `dataplane` (the
oracle) nor `proxy` (the enforcer): both of them import it, so the verdict one gives is by
construction the verdict the other gives. docs/l7.md describes the seam.

    l7.http      HTTP/1.1 requests: method, path, host and header rules
    l7.dns       DNS questions: matchName / matchPattern rules
    l7.protocol  what a protocol is, and the registry (every module defining PROTOCOL)
    l7.ruleset   L7RuleSet and L7Policy: the rules of each protocol for a peer and port
    l7.decide    one request through every applicable set: the verdict and its attribution
    l7.regex     RE2 as Envoy compiles it
"""
