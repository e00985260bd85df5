/* trace.h - per-flow trace events: the life of one traced flow, step by step, as the programs
 * took it (what `l7lab trace` prints, dataplane/trace.py).
 *
 * Tracing is per flow and off by default. The loader puts the flows to trace in the
 * trace_flows map (key: saddr, daddr, sport, dport, proto; sport 0 = any source port) and the
 * number of entries in trace_switch[0]. A program reads trace_switch first: while it is 0 the
 * only cost of tracing is that one array lookup. A packet belongs to a traced flow when its
 * tuple, or its reversed tuple (the replies), is in trace_flows, exactly or with sport 0.
 *
 * Each trace point is emitted from exactly one place per hook, with __LINE__, so that the
 * trace can point at the code that performed the step. The arguments a0..a4 of each point
 * are listed next to it; dataplane/abi.py (TracePoint) mirrors this enum.
 *
 * TRACING (a -D tunable, 1 by default) compiles the trace points in; 0 leaves them out, which
 * is how benchmarks/test_verdict_latency.py measures what tracing costs while it is off.
 */
#ifndef L7LAB_TRACE_H
#define L7LAB_TRACE_H

enum trace_point {
	TRACE_HOOK = 1,            /* a program saw a packet of a traced flow. a0 skb->mark on entry, a1 length */
	TRACE_PARSE = 2,           /* parsed as IPv4. a0 fragment kind (PKT_FRAG_*), a1 policy port (ICMP: type) */
	TRACE_MARK_PASS = 3,       /* to_container passed it on its DECIDED mark, no lookup. a0 mark */
	TRACE_SPOOF_CHECK = 4,     /* anti-spoofing of a bound interface. a0 bound endpoint id (0: world link), a1 1 passed / 0 spoofed */
	TRACE_CONNTRACK = 5,       /* a0 result (CT_*), a1 entry proxy_port, a2 entry flags, a3 entry src_identity, a4 entry rule_id */
	TRACE_IDENTITY = 6,        /* a0 side (TRACE_SIDE_*), a1 identity, a2 origin (TRACE_ID_FROM_*), a3 endpoint id (0: none) */
	TRACE_POLICY_LOOKUP = 7,   /* one policy map lookup. a0 endpoint_id | direction << 16 | step (1..4) << 24,
	                            * a1 key identity, a2 key protocol | key port << 16 (host order),
	                            * a3 result (POLICY_*; POLICY_NONE = miss) | entry proxy_port << 16, a4 entry rule_id */
	TRACE_POLICY_DECISION = 8, /* one endpoint's policy in one direction. a0 verdict | reason << 8 | direction << 16 |
	                            * enforced << 24, a1 endpoint_id, a2 rule_id, a3 proxy_port, a4 1 if audit turned a drop */
	TRACE_DECISION = 9,        /* the packet's decision (egress and ingress combined); layout of TRACE_POLICY_DECISION */
	TRACE_PROXY_ASSIGN = 10,   /* bpf_sk_assign. a0 result (REASON_NONE or the drop reason), a1 socket (TRACE_SK_*),
	                            * a2 skb->mark set, a3 proxy port */
	TRACE_CT_CREATE = 11,      /* a new conntrack entry. a0 src_identity, a1 rule_id, a2 proxy_port, a3 flags (CT_F_*) */
	TRACE_FROM_PROXY = 12,     /* to_container: the L7 proxy's upstream. a0 identity read from the mark, a1 mark */
	TRACE_RESULT = 13,         /* what the program returned. a0 TC action (TC_ACT_OK 0 / TC_ACT_SHOT 2),
	                            * a1 verdict (VERDICT_*), a2 reason (REASON_*), a3 skb->mark on return */
};

/* TRACE_IDENTITY a0 */
#define TRACE_SIDE_SOURCE      0
#define TRACE_SIDE_DESTINATION 1

/* TRACE_IDENTITY a2: where the identity came from */
#define TRACE_ID_FROM_ENDPOINT 1   /* the endpoints map (a local endpoint) */
#define TRACE_ID_FROM_IPCACHE  2   /* the ipcache (longest prefix match) */
#define TRACE_ID_FROM_WORLD    3   /* in neither: world */
#define TRACE_ID_FROM_MARK     4   /* the from-proxy skb->mark (identity-in-mark) */
#define TRACE_ID_FROM_NODE     5   /* sent by the node's own stack: host */

/* TRACE_PROXY_ASSIGN a1: which socket the lookup found */
#define TRACE_SK_NONE     0
#define TRACE_SK_FLOW     1   /* the proxy's accepted socket of this flow (TCP, not a listener) */
#define TRACE_SK_LISTENER 2   /* the proxy listener on 127.0.0.1:proxy_port */

/* What every event of one program run shares: filled by trace_begin() once the packet is parsed.
 * id 0: the packet belongs to no traced flow, and TRACE() emits nothing. */
struct trace_ctx {
	u32 id;                 /* trace id (trace_flows value); 0: not traced */
	u32 packet_id;          /* one random value per program run */
	u32 ifindex;            /* the interface the program runs on */
	__be32 saddr;
	__be32 daddr;
	u16 sport;              /* host order */
	u16 dport;
	u8 hook;                /* HOOK_* */
	u8 proto;
	u8 tcp_flags;
	u8 pad;
};

#if TRACING

/* How many flows are traced (trace_switch[0]); 0 when none, and then nothing else is done. */
static __always_inline u32 trace_flow_count(void)
{
	u32 *n = trace_switch_lookup();

	return n ? *n : 0;
}

static __always_inline struct trace_value *trace_match(struct trace_key *k, __be32 saddr, __be32 daddr,
						       __be16 sport, __be16 dport)
{
	struct trace_value *v;

	k->saddr = saddr;
	k->daddr = daddr;
	k->sport = sport;
	k->dport = dport;
	v = trace_flows_lookup(k);
	if (v)
		return v;
	k->sport = 0;           /* the flow traced with any source port */
	return trace_flows_lookup(k);
}

/* Is this packet one of a traced flow? Its tuple, then the reversed tuple (a reply matches its
 * flow's entry reversed), each exactly and with source port 0. Sets t->id (0: not traced). */
static __always_inline void trace_begin(struct trace_ctx *t, struct __sk_buff *skb, const struct pkt *p, u8 hook)
{
	struct trace_key k;
	struct trace_value *v;

	t->id = 0;
	if (!trace_flow_count())
		return;
	__builtin_memset(&k, 0, sizeof(k));
	k.proto = p->proto;
	v = trace_match(&k, p->saddr, p->daddr, p->sport, p->dport);
	if (!v)
		v = trace_match(&k, p->daddr, p->saddr, p->dport, p->sport);
	if (!v || !v->trace_id)
		return;
	t->id = v->trace_id;
	t->packet_id = bpf_get_prandom_u32();
	t->ifindex = skb->ifindex;
	t->saddr = p->saddr;
	t->daddr = p->daddr;
	t->sport = bpf_ntohs(p->sport);
	t->dport = bpf_ntohs(p->dport);
	t->hook = hook;
	t->proto = p->proto;
	t->tcp_flags = p->tcp_flags;
}

static __always_inline void trace_emit(const struct trace_ctx *t, u16 point, u16 line, u32 a0, u32 a1, u32 a2,
				       u32 a3, u32 a4)
{
	struct trace_event e;

	__builtin_memset(&e, 0, sizeof(e));
	e.ts_ns = bpf_ktime_get_ns();
	e.trace_id = t->id;
	e.packet_id = t->packet_id;
	e.point = point;
	e.line = line;
	e.hook = t->hook;
	e.proto = t->proto;
	e.tcp_flags = t->tcp_flags;
	e.ifindex = t->ifindex;
	e.saddr = t->saddr;
	e.daddr = t->daddr;
	e.sport = t->sport;
	e.dport = t->dport;
	e.arg[0] = a0;
	e.arg[1] = a1;
	e.arg[2] = a2;
	e.arg[3] = a3;
	e.arg[4] = a4;
	traces_output(&e);     /* a full ring buffer loses the event, never the packet */
}

/* One trace point. Write each call on ONE line, naming its point in full (TRACE_HOOK, ...):
 * __LINE__ is that line, and the line is how a trace finds the code that emitted the step. */
#define TRACE(t, point, a0, a1, a2, a3, a4) \
	do { if ((t)->id) trace_emit((t), (point), __LINE__, (a0), (a1), (a2), (a3), (a4)); } while (0)

#else  /* TRACING == 0: trace points and trace_begin compile to nothing */

static __always_inline u32 trace_flow_count(void) { return 0; }
static __always_inline void trace_begin(struct trace_ctx *t, struct __sk_buff *skb, const struct pkt *p, u8 hook) {}
#define TRACE(t, point, a0, a1, a2, a3, a4) do { } while (0)

#endif

#endif
