"""Every bound on user input, in one place.

Scenario and policy files, and the text `apply` sends to a running lab, come from users who may
be careless or hostile, and every l7lab command runs as root. Each input is therefore bounded
before it can cost much memory or time: a file is measured before it is parsed, the YAML parser
stops at the first value past a bound (never after building it), and each list a scenario or a
policy declares has a bound of its own. Each bound is far above what a real lab needs; a
violation is an input error (exit 1) naming the file, the line, the field and the bound.
docs/scenarios.md ("Limits") lists them for users; the scenario JSON Schema repeats the list
bounds as maxItems (a unit test keeps the two equal).
"""

from __future__ import annotations

# ---------------------------------------------------------------------------- any YAML file

# Bytes of one file, read before parsing (at most this many plus one are ever read). The
# largest real input, a policy of thousands of rules, is well under 1 MiB.
MAX_FILE_BYTES = 4 * 1024 * 1024

# Bytes of YAML one `apply` sends to a lab in one change, all files together.
MAX_CHANGE_BYTES = MAX_FILE_BYTES

# YAML documents (`---` separated) in one file: a policy file with one policy per document.
MAX_DOCUMENTS = 1_000

# Nesting of lists and mappings. The deepest real manifest (a List of Cilium policies with
# headerMatches) nests 12 levels; 64 leaves room and keeps every recursive walk far from
# Python's stack limit.
MAX_DEPTH = 64

# Values (scalars, lists and mappings) in one file, and in a scenario with every policy file it
# names together. A policy of 3,000 rules that each carry an HTTP rule is about 85,000 values
# (one with 5,000 plain L3/L4 rules about 40,000). Parsing 100,000 values takes about half a
# second and 35 MB, so even input built to reach the bound is refused quickly.
MAX_NODES = 100_000

# Entries of any one list or mapping, whatever the field (fields below have their own bound).
MAX_COLLECTION_ITEMS = 10_000

# Characters of any one scalar (names, descriptions, request bodies, regexes, ...).
MAX_SCALAR_CHARS = 64 * 1024

# YAML anchors and aliases (&a / *a) are refused outright: one alias can stand for a whole
# subtree, so a few hundred bytes expand to billions of values ("billion laughs"); scenarios
# and policies never need them.

# ---------------------------------------------------------------------------- scenarios

# Pods: each is a network namespace, a veth pair and a server process.
MAX_PODS = 1_024
MAX_NAMESPACES = 1_024
# World hosts: each is a network namespace, a veth pair and a server process, as a pod.
MAX_WORLD_HOSTS = 512
MAX_DNS_NAMES = 64  # per world host
# Services: each is a ClusterIP with a few BPF map entries per port and backend.
MAX_SERVICES = 512
# Ports a pod or world host declares: each is a listening server.
MAX_DECLARED_PORTS = 64
MAX_STEPS = 1_000
MAX_PROBES = 1_000  # per step
MAX_RELABELS = 1_000  # per step
MAX_DELETES = 1_000  # per step
MAX_LABELS = 256  # labels of a pod or namespace, and of one selector's matchLabels
MAX_POLICY_FILES = 256  # distinct files a scenario's `file:` references name

# ---------------------------------------------------------------------------- policies

# Policies in one file, one change, or one scenario (its start policies and every step's
# `apply` together); a `kind: List` counts its items.
MAX_POLICIES = 1_000
MAX_SPECS = 1_000  # `specs` of one Cilium policy
MAX_RULES = 5_000  # rules in one ingress/egress(/Deny) section ("thousands of rules")
MAX_PEERS = 1_000  # peers of one rule (from/to, fromEndpoints, toCIDRSet, toFQDNs, ...)
MAX_EXCEPTS = 1_000  # `except` CIDRs of one ipBlock / CIDR set
MAX_PORT_RULES = 1_000  # NetworkPolicy `ports`, Cilium `toPorts` of one rule
MAX_PORTS_PER_PORT_RULE = 40  # `toPorts[].ports`: Cilium's own CRD allows at most 40
MAX_ICMP_FIELDS = 40  # `icmps[].fields`: Cilium's own CRD allows at most 40
MAX_L7_RULES = 1_000  # HTTP or DNS rules of one port rule
MAX_HEADERS = 100  # headers + headerMatches of one HTTP rule
MAX_EXPRESSIONS = 100  # matchExpressions of one selector
MAX_EXPRESSION_VALUES = 1_000  # values of one In / NotIn expression

# Regular expressions (HTTP method, path, host) are RE2, which runs in linear time; their size
# is still bounded so that thousands of rules cannot pin gigabytes of compiled programs.
MAX_REGEX_CHARS = 1_024
# RE2's program size (instructions). Envoy refuses regexes over 100 by default; real path
# patterns are 10-60. 1,000 leaves room while `(a{1000}){1000}`-style patterns are refused.
MAX_REGEX_PROGRAM_SIZE = 1_000
# Entries the policies of a lab resolve to (endpoints x remote identities x ports x protocols):
# the size of the datapath's policy map, which cannot hold more. A few kilobytes of YAML can
# name millions (every pod to every pod on a thousand ports); resolution stops at the bound.
MAX_POLICY_ENTRIES = 262_144
MAX_DNS_NAME_CHARS = 255  # matchName / matchPattern (a DNS name is at most 253)
MAX_HEADER_NAME_CHARS = 256
MAX_HEADER_VALUE_CHARS = 8_192  # what common HTTP servers accept for one header line
