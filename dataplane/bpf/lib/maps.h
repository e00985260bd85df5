/* maps.h - map key/value layouts and the accessor functions every other header uses.
 *
 * The maps themselves are declared in bpf/datapath.c, and so are the accessors' bodies: BCC
 * rewrites map syntax (map.lookup()) only in the main file of a compile, so headers call these
 * forward-declared wrappers instead. Layouts are packed by hand (explicit padding); Python
 * declares each struct once, field by field with its offset, in dataplane/abi.py, and
 * tests/kernel/test_abi_compiled.py compares every field (name, type, byte order, offset, size) with
 * what the compiler makes of this file.
 */
#ifndef L7LAB_MAPS_H
#define L7LAB_MAPS_H

/* ipcache: LPM trie on IPv4, prefixlen 0..32 over addr (network byte order).
 * key 8 bytes, value 8 bytes. */
struct ipcache_key {
	u32 prefixlen;
	__be32 addr;
};
struct ipcache_value {
	u32 identity;
	u32 flags;              /* reserved, 0 */
};

/* endpoints: hash by IPv4 address (network byte order) -> local endpoint. value 8 bytes. */
struct endpoint_info {
	u32 identity;
	u16 endpoint_id;
	u8 flags;               /* EP_F_* */
	u8 pad;
};

/* policy: LPM trie. The 64 bits before the port are always matched in full, so an entry's
 * prefixlen is 64 + its port prefix (0..16), and a lookup uses prefixlen 80. The port is big
 * endian so that its high bits come first, as LPM requires.
 *
 *   offset  0  u32 prefixlen        (not part of the data)
 *   offset  4  u32 identity         remote identity, 0 = any
 *   offset  8  u16 endpoint_id
 *   offset 10  u8  direction        DIR_INGRESS / DIR_EGRESS
 *   offset 11  u8  protocol         0 = any (then port and port prefix are 0)
 *   offset 12  be16 port            first port of the aligned block (ICMP: the ICMP type)
 *   offset 14  u16 pad              0
 * value 8 bytes. */
struct policy_key {
	u32 prefixlen;
	u32 identity;
	u16 endpoint_id;
	u8 direction;
	u8 protocol;
	__be16 port;
	u16 pad;
};
#define POLICY_FIXED_PREFIX 64
#define POLICY_FULL_PREFIX  80
struct policy_value {
	u8 verdict;             /* POLICY_ALLOW / POLICY_REDIRECT / POLICY_DENY */
	u8 pad;
	u16 proxy_port;         /* host byte order, REDIRECT only */
	u32 rule_id;            /* first attribution id of the entry, 0 if none */
};

/* conntrack: LRU hash. Entries are stored in the direction of the packet that created them;
 * a lookup tries the tuple as is (ESTABLISHED) and reversed (REPLY). */
struct ct_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	u8 proto;
	u8 pad[3];
};
struct ct_entry {
	u64 expires_ns;         /* bpf_ktime_get_ns() deadline; an expired entry counts as absent */
	u64 packets;
	u32 src_identity;
	u32 rule_id;
	u16 proxy_port;         /* != 0: a redirected flow; every packet goes to the proxy */
	u8 flags;               /* CT_F_* */
	u8 pad;
	u16 rev_nat_index;      /* != 0: a flow to a service (lib/lb.h); replies leave as lb_revnat[index] */
	u16 pad2;
};
#define CT_F_CLOSING    0x01
#define CT_F_FROM_PROXY 0x02

/* fragments: LRU hash. The first fragment of a datagram (MF set, offset 0) that is passed
 * records its datagram here, so that the later fragments (offset > 0, no L4 header) carry on
 * with the ports of their flow (as Cilium's ipv4_frag_datagrams map). key 12 bytes, value 16. */
struct frag_key {
	__be32 saddr;
	__be32 daddr;
	__be16 id;              /* IPv4 identification */
	u8 proto;
	u8 pad;
};
struct frag_entry {
	u64 expires_ns;         /* bpf_ktime_get_ns() deadline (FRAG_LIFETIME_S, as ipfrag_time) */
	__be16 sport;           /* the first fragment's struct pkt ports */
	__be16 dport;
	u16 policy_port;        /* host order, as struct pkt (ICMP: the type) */
	u8 tcp_flags;           /* the segment's flags: later fragments touch conntrack alike */
	u8 pad;
};

/* metrics: per-CPU hash (verdict, reason, direction) -> counters. */
struct metrics_key {
	u8 verdict;
	u8 reason;
	u8 direction;
	u8 pad;
};
struct metrics_value {
	u64 packets;
	u64 bytes;
};

/* if_bind: hash ifindex -> which endpoint may send from that interface (anti-spoofing).
 * endpoint_id 0 marks a world link: its sources must not be local endpoint addresses.
 * Interfaces not in the map are not checked. */
struct if_binding {
	u16 endpoint_id;
	u16 pad;
};

/* events: ring buffer of these, 56 bytes. Addresses in network order, ports in host order. */
struct flow_event {
	u64 ts_ns;
	__be32 saddr;
	__be32 daddr;
	u16 sport;
	u16 dport;
	u8 proto;
	u8 verdict;             /* enum flow_verdict */
	u8 reason;              /* enum drop_reason */
	u8 direction;           /* DIR_* of the policy that decided (see docs/datapath.md) */
	u32 src_identity;
	u32 dst_identity;
	u16 src_endpoint;       /* 0: not a local endpoint */
	u16 dst_endpoint;
	u32 rule_id;
	u16 proxy_port;
	u8 tcp_flags;
	u8 hook;                /* HOOK_* */
	u32 ifindex;
	u32 pkt_len;
	u8 flags;               /* FLOW_EVENT_F_* */
	u8 icmp_type;           /* ICMP: type and code of the packet (Hubble's l4.ICMPv4); else 0 */
	u8 icmp_code;
	u8 pad;
	u32 other_rule_id;      /* the rule that allowed the flow in the other direction; 0 if none */
	u32 pad2;
};
/* The L7 proxy's upstream connection: passed without a policy decision (a trace, not a verdict). */
#define FLOW_EVENT_F_FROM_PROXY 0x01

/* trace_flows: hash of the flows being traced (lib/trace.h) -> trace id. sport 0 = any. */
struct trace_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	u8 proto;
	u8 pad[3];
};
struct trace_value {
	u32 trace_id;
	u32 pad;
};

/* traces: ring buffer of these, 64 bytes: one step of a traced flow (enum trace_point). */
struct trace_event {
	u64 ts_ns;
	u32 trace_id;
	u32 packet_id;          /* one value per program run: groups the events of one packet */
	u16 point;              /* enum trace_point */
	u16 line;               /* __LINE__ of the call that emitted it */
	u8 hook;                /* HOOK_* */
	u8 proto;
	u8 tcp_flags;
	u8 pad;
	u32 ifindex;
	__be32 saddr;
	__be32 daddr;
	u16 sport;              /* host order */
	u16 dport;
	u32 arg[5];             /* per point, see lib/trace.h */
	u32 pad2;
};

/* Services (lib/lb.h), the layout of Cilium's lb4 maps made small.
 *
 * lb_services: hash (ClusterIP, port, protocol, slot) -> service. Slot 0 describes the service
 * (backend count, flags, rev-NAT index); slots 1..count name its backends, in the order the
 * loader chose. key 12 bytes, value 12 bytes. */
struct lb_service_key {
	__be32 addr;            /* the ClusterIP */
	__be16 port;            /* the service port */
	u8 proto;
	u8 pad;
	u16 slot;               /* 0: the service itself; 1..count: its backends */
	u16 pad2;
};
struct lb_service {
	u32 backend_id;         /* slots 1..count: an lb_backends key; slot 0: 0 */
	u16 count;              /* slot 0: how many backends; 0 drops (REASON_NO_SERVICE_BACKEND) */
	u16 rev_nat_index;      /* slot 0: the lb_revnat key replies are translated by */
	u8 flags;               /* slot 0: LB_F_* */
	u8 pad[3];
};
#define LB_F_AFFINITY 0x01      /* sessionAffinity ClientIP: the backend is chosen by client address alone */

/* lb_backends: hash backend id -> the backend's address and target port. A backend id is the
 * backend pod's endpoint id << 16 | its target port, stable while the pod lives. value 8 bytes. */
struct lb_backend {
	__be32 addr;
	__be16 port;
	u16 pad;
};

/* lb_revnat: hash rev-NAT index -> the service address replies of a translated flow carry as
 * their source. value 8 bytes. */
struct lb_revnat {
	__be32 addr;
	__be16 port;
	u16 pad;
};

/* lb_flows: LRU hash, the service's conntrack: the tuple a client sent (to the ClusterIP) ->
 * the backend it was given, so that every later packet of the flow goes to the same backend
 * (Cilium's CT_SERVICE entries). value 16 bytes. */
struct lb_flow {
	u64 expires_ns;         /* bpf_ktime_get_ns() deadline, refreshed as conntrack's */
	u32 backend_id;
	u16 rev_nat_index;
	u16 pad;
};

/* Accessors, defined in bpf/datapath.c. */
static __always_inline struct ipcache_value *ipcache_lookup(struct ipcache_key *k);
static __always_inline struct endpoint_info *endpoints_lookup(__be32 *addr);
static __always_inline struct policy_value *policy_lookup_raw(struct policy_key *k);
static __always_inline struct ct_entry *ct_lookup_raw(struct ct_key *k);
static __always_inline int ct_update_raw(struct ct_key *k, struct ct_entry *v);
static __always_inline int ct_delete_raw(struct ct_key *k);
static __always_inline struct frag_entry *frag_lookup_raw(struct frag_key *k);
static __always_inline int frag_update_raw(struct frag_key *k, struct frag_entry *v);
static __always_inline struct metrics_value *metrics_lookup(struct metrics_key *k);
static __always_inline int metrics_insert(struct metrics_key *k, struct metrics_value *v);
static __always_inline struct if_binding *if_bind_lookup(u32 *ifindex);
static __always_inline int events_output(struct flow_event *e);
static __always_inline void trace_drop(u32 reason, u32 direction, u32 endpoint_id);  /* DEBUG only */
static __always_inline struct trace_value *trace_flows_lookup(struct trace_key *k);
static __always_inline u32 *trace_switch_lookup(void);
static __always_inline int traces_output(struct trace_event *e);
static __always_inline struct lb_service *lb_service_lookup(struct lb_service_key *k);
static __always_inline struct lb_backend *lb_backend_lookup(u32 *id);
static __always_inline struct lb_revnat *lb_revnat_lookup(u32 *index);
static __always_inline struct lb_flow *lb_flow_lookup(struct ct_key *k);
static __always_inline int lb_flow_update(struct ct_key *k, struct lb_flow *v);

#endif
