"""Policy model: parse and validate NetworkPolicy / CiliumNetworkPolicy / CCNP, allocate
identities, resolve to the datapath's MapState, and judge flows (the oracle).

Modules: `api` (rule model), `parse` (parsing + validation), `selectors` (label selectors),
`identity` (identities, ipcache, peer selection), `l7` (HTTP/DNS rule matching, RE2),
`resolver` (policies -> MapState), `engine` (PolicyEngine, Flow, Decision, explain).
"""

from .api import Policy
from .engine import Decision, Flow, PolicyEngine, expected_outcomes, explain_text
from .l7 import L7Policy, L7RuleSet
from .parse import parse_documents, validate_policy_file

__all__ = ["Decision", "Flow", "L7Policy", "L7RuleSet", "Policy", "PolicyEngine", "expected_outcomes",
           "explain_text", "parse_documents", "validate_policy_file"]
