"""The L7 HTTP proxy that runs inside a lab's node namespace (`python -m proxy`).

Connections the datapath REDIRECTs arrive on a transparent listener; every request is parsed
strictly (`http`, `stream`), judged against the lab's Cilium HTTP rules exactly as the oracle
judges it (`state`), then answered 403 or forwarded re-serialized to the original destination
with the from-proxy mark (`server`, `marks`); one L7 record per request (`events`). Contract and
decisions: docs/proxy.md.
"""
