/* conntrack.h - a small stateful table so that only the first packet of a flow is checked.
 *
 * One LRU entry per flow, keyed by the tuple of the packet that created it. A packet whose
 * tuple matches an entry is ESTABLISHED (same direction) or REPLY (reversed tuple) and passes
 * without a policy lookup; anything else is NEW and is checked, including a "reply" for which
 * no entry exists (a SYN-ACK nobody asked for is judged like a new connection).
 * Lifetimes: TCP after the handshake CT_LIFETIME_TCP_S, everything else CT_LIFETIME_OTHER_S,
 * CT_LIFETIME_CLOSE_S once a FIN or RST was seen; an expired entry counts as absent (the LRU
 * reclaims it later). A SYN (without ACK) on a closing entry starts a new flow: port reuse.
 * An ICMP echo reply is the REPLY of the echo request with the same id (parse.h puts the id in
 * the request's dport and the reply's sport); an echo reply without its request is NEW and
 * judged by policy as ICMP type 0, and an echo request is never anyone's reply.
 * An ICMP error (unreachable, time exceeded, parameter problem) quoting a packet of a live
 * flow is RELATED and passes like a reply: a UDP datagram to a closed port gets its port
 * unreachable back even where policy would not allow a new ICMP flow (Cilium CT_RELATED).
 */
#ifndef L7LAB_CONNTRACK_H
#define L7LAB_CONNTRACK_H

#define CT_NEW         0
#define CT_ESTABLISHED 1
#define CT_REPLY       2
#define CT_RELATED     3  /* an ICMP error about a tracked flow (as Cilium's CT_RELATED) */

#define NSEC 1000000000ULL

static __always_inline void ct_tuple(const struct pkt *p, struct ct_key *k, int reverse)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->proto = p->proto;
	if (reverse) {
		k->saddr = p->daddr;
		k->daddr = p->saddr;
		k->sport = p->dport;
		k->dport = p->sport;
	} else {
		k->saddr = p->saddr;
		k->daddr = p->daddr;
		k->sport = p->sport;
		k->dport = p->dport;
	}
}

static __always_inline u64 ct_lifetime(const struct pkt *p, u8 flags, int established)
{
	if (flags & CT_F_CLOSING)
		return CT_LIFETIME_CLOSE_S * NSEC;
	if (p->proto == IPPROTO_TCP && established)
		return CT_LIFETIME_TCP_S * NSEC;
	return CT_LIFETIME_OTHER_S * NSEC;
}

/* Refresh a live entry for this packet; returns 0 if the entry must be treated as absent. */
static __always_inline int ct_touch(struct ct_entry *e, const struct pkt *p, int reply, u64 now)
{
	if (e->expires_ns < now)
		return 0;
	if (!reply && (e->flags & CT_F_CLOSING) &&
	    (p->tcp_flags & (TCPF_SYN | TCPF_ACK)) == TCPF_SYN)
		return 0;
	if (p->tcp_flags & (TCPF_FIN | TCPF_RST))
		e->flags |= CT_F_CLOSING;
	/* A reply, or any ACK, means the TCP handshake got somewhere: use the long lifetime. */
	e->expires_ns = now + ct_lifetime(p, e->flags, reply || (p->tcp_flags & TCPF_ACK));
	e->packets += 1;
	return 1;
}

/* Classify the packet; *entry is set for ESTABLISHED and REPLY. */
static __always_inline int ct_lookup(const struct pkt *p, struct ct_entry **entry)
{
	struct ct_key k;
	struct ct_entry *e;
	u64 now = bpf_ktime_get_ns();

	ct_tuple(p, &k, 0);
	e = ct_lookup_raw(&k);
	if (e && ct_touch(e, p, 0, now)) {
		*entry = e;
		return CT_ESTABLISHED;
	}
	ct_tuple(p, &k, 1);
	e = ct_lookup_raw(&k);
	if (e && ct_touch(e, p, 1, now)) {
		*entry = e;
		return CT_REPLY;
	}
	/* An ICMP error travels back to the sender of the packet it quotes; it belongs to that
	 * packet's flow, whichever direction of the flow the quoted packet went. The entry is
	 * not refreshed: errors do not keep a flow alive. */
	if (p->icmp_error && p->in_saddr == p->daddr) {
		__builtin_memset(&k, 0, sizeof(k));
		k.proto = p->in_proto;
		k.saddr = p->in_saddr;
		k.daddr = p->in_daddr;
		k.sport = p->in_sport;
		k.dport = p->in_dport;
		e = ct_lookup_raw(&k);
		if (!e) {
			k.saddr = p->in_daddr;
			k.daddr = p->in_saddr;
			k.sport = p->in_dport;
			k.dport = p->in_sport;
			e = ct_lookup_raw(&k);
		}
		if (e && e->expires_ns >= now) {
			*entry = e;
			return CT_RELATED;
		}
	}
	return CT_NEW;
}

static __always_inline void ct_create(const struct trace_ctx *t, const struct pkt *p, u32 src_identity,
				      u32 rule_id, u16 proxy_port, u8 flags)
{
	struct ct_key k;
	struct ct_entry e;

	__builtin_memset(&e, 0, sizeof(e));
	ct_tuple(p, &k, 0);
	if (p->tcp_flags & (TCPF_FIN | TCPF_RST))
		flags |= CT_F_CLOSING;
	e.expires_ns = bpf_ktime_get_ns() + ct_lifetime(p, flags, p->tcp_flags & TCPF_ACK);
	e.packets = 1;
	e.src_identity = src_identity;
	e.rule_id = rule_id;
	e.proxy_port = proxy_port;
	e.flags = flags;
	e.rev_nat_index = p->rev_nat_index;
	ct_update_raw(&k, &e);
	TRACE(t, TRACE_CT_CREATE, src_identity, rule_id, proxy_port, flags, 0);
}

#endif
