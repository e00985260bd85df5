"""The L7 HTTP proxy that runs inside a lab's node namespace (`python -m proxy`).

Connections the datapath REDIRECTs arrive on a transparent listener; every request is parsed
strictly (`http`, `stream`), judged against the lab's Cilium HTTP rules by the decision the
oracle uses too (`state`, over the `l7` package), then answered 403 or forwarded re-serialized to
the original destination with the from-proxy mark (`server`, `marks`); DNS questions likewise on
UDP (`dns`); one L7 record per request (`events`). Handlers reach the process through `context`
and are listed in `handlers`. Contract and decisions: docs/proxy.md, docs/l7.md.
"""
