"""Policy model: parse and validate NetworkPolicy / CiliumNetworkPolicy / CCNP, allocate
identities, resolve to the datapath's MapState, and judge flows (the oracle).

Modules: `api` (rule model), `parse` (parsing + validation), `selectors` (label selectors),
`identity` (identities, ipcache, peer selection), `resolver` (policies -> MapState), `engine`
(PolicyEngine, Flow, Decision, explain). The L7 rule types and their matching are the `l7`
package's, shared with the proxy (docs/l7.md).
"""

from l7.ruleset import L7Policy, L7RuleSet

from .api import Policy
from .engine import Decision, Flow, PolicyEngine, explain_text
from .parse import parse_documents, validate_policy_file

__all__ = ["Decision", "Flow", "L7Policy", "L7RuleSet", "Policy", "PolicyEngine",
           "explain_text", "parse_documents", "validate_policy_file"]
