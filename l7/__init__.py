"""The L7 seam: one module per L7 protocol, shared by the policy oracle and the proxy.

Each protocol module holds what both sides need to agree on: its rule type, the parsing of
those rules, request normalization, the matching, and the fields it adds to a flow record.
This package imports neither `dataplane.policy` (the oracle) nor `proxy` (the enforcer): both
of them import it, so the verdict one gives is by construction the verdict the other gives.

    l7.http   HTTP/1.1 requests: method, path, host and header rules
    l7.dns    DNS questions: matchName / matchPattern rules
"""
