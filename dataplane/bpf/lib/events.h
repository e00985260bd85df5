/* events.h - metrics (every packet) and flow events (new-flow verdicts and drops).
 *
 * Metrics: per-CPU counters keyed by (verdict, reason, direction); every packet either hook
 * sees is counted exactly once. Events: one per new-flow verdict (a conntrack miss that went
 * through policy) and one per drop; packets of established flows produce none. A full ring
 * buffer loses events, never packets.
 */
#ifndef L7LAB_EVENTS_H
#define L7LAB_EVENTS_H

static __always_inline void count_packet(u8 verdict, u8 reason, u8 direction, u32 len)
{
	struct metrics_key k = { .verdict = verdict, .reason = reason, .direction = direction };
	struct metrics_value *v = metrics_lookup(&k);

	if (!v) {
		struct metrics_value zero = {};
		metrics_insert(&k, &zero);
		v = metrics_lookup(&k);
		if (!v)
			return;
	}
	v->packets += 1;        /* per-CPU slot: no atomics needed */
	v->bytes += len;
}

/* Everything an event says beyond the packet itself. */
struct flow_info {
	u32 src_identity;
	u32 dst_identity;
	u16 src_endpoint;
	u16 dst_endpoint;
	u8 hook;
	u8 flags;               /* FLOW_EVENT_F_* */
	u32 other_rule_id;      /* a new flow: the rule of the direction not reported that allowed it */
};

static __always_inline void emit_event(struct __sk_buff *skb, const struct pkt *p,
				       const struct flow_info *fi, const struct decision *d)
{
	struct flow_event e;

	__builtin_memset(&e, 0, sizeof(e));
	e.ts_ns = bpf_ktime_get_ns();
	e.saddr = p->saddr;
	e.daddr = p->daddr;
	e.sport = bpf_ntohs(p->sport);
	e.dport = bpf_ntohs(p->dport);
	e.proto = p->proto;
	e.verdict = d->verdict;
	e.reason = d->reason;
	e.direction = d->direction;
	e.src_identity = fi->src_identity;
	e.dst_identity = fi->dst_identity;
	e.src_endpoint = fi->src_endpoint;
	e.dst_endpoint = fi->dst_endpoint;
	e.rule_id = d->rule_id;
	e.proxy_port = d->proxy_port;
	e.tcp_flags = p->tcp_flags;
	e.hook = fi->hook;
	e.ifindex = skb->ingress_ifindex ? skb->ingress_ifindex : skb->ifindex;
	e.pkt_len = p->len;
	e.flags = fi->flags;
	e.other_rule_id = fi->other_rule_id;
	if (p->proto == IPPROTO_ICMP) {
		e.icmp_type = p->policy_port;
		e.icmp_code = p->icmp_code;
	}
	events_output(&e);
#if DEBUG
	if (d->verdict == VERDICT_DROP)
		trace_drop(d->reason, d->direction, d->endpoint_id);
#endif
}

#endif
