"""DNS-based policy (`toFQDNs`): what lookups taught the lab, and how it is kept.

- `cache`: the per-endpoint caches of names and addresses learned from DNS answers, with their
  TTLs, the per-name cap and expiry (pure);
- `lookup`: how a client in a pod turns a name into an address (search path, ndots), and the
  oracle's model of a lookup through the policy;
- `learner`: the lab's learner, which the L7 proxy asks before it releases an answer.
"""
