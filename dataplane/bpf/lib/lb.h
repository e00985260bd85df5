/* lb.h - Services: a pod's connection to a ClusterIP goes to one of the service's backends.
 *
 * The shape of Cilium's bpf/lib/lb.h, made small (maps in lib/maps.h, written by the loader):
 *
 *   lb_translate   from_container, before identities and policy: a packet to (ClusterIP, port,
 *                  protocol) of lb_services gets its destination rewritten to a backend's
 *                  (address, target port). The backend of a new flow is slot 1 + hash % count;
 *                  the hash covers the whole tuple, or with sessionAffinity ClientIP (LB_F_AFFINITY)
 *                  the client address and the service alone, so one client always meets one
 *                  backend while the backend set stays the same. The choice is remembered in
 *                  lb_flows under the tuple the client sent (the service's conntrack), so every
 *                  later packet of the flow goes to the same backend even when the service's
 *                  backends change, as long as that backend still exists. Policy then judges
 *                  the packet as addressed to the backend: its identity, its target port.
 *                  The packet's rev_nat_index goes into the conntrack entry ct_create makes.
 *   lb_rev_nat     a reply (conntrack REPLY of an entry with a rev_nat_index), in from_container
 *                  (the backend answers) and to_container (the L7 proxy answers for a redirected
 *                  flow): its source becomes the service address again, as the client expects.
 *
 * Checksums are fixed with bpf_l3_csum_replace / bpf_l4_csum_replace (the address is part of
 * the L4 pseudo-header; a UDP checksum of 0 stays 0: BPF_F_MARK_MANGLED_0). TCP and UDP only:
 * the service ports a scenario can declare. A service with no backends drops
 * (REASON_NO_SERVICE_BACKEND). Not translated: later IPv4 fragments of a service flow (their
 * datagram is recorded under the backend's address, so they drop as REASON_FRAGMENT_UNKNOWN)
 * and ICMP errors quoting a translated packet.
 */
#ifndef L7LAB_LB_H
#define L7LAB_LB_H

/* The hash that picks a backend; dataplane/services.py backend_hash() is its Python twin (the
 * oracle and the probes compute which backend a flow meets). Host-order inputs. */
static __always_inline u32 lb_mix(u32 h, u32 v)
{
	h ^= v;
	h *= 0x9e3779b1;
	h ^= h >> 15;
	return h;
}

static __always_inline u32 lb_hash(const struct pkt *p, u8 affinity)
{
	u32 h = 0x811c9dc5;

	h = lb_mix(h, bpf_ntohl(p->saddr));
	if (!affinity)
		h = lb_mix(h, (u32)bpf_ntohs(p->sport) << 16 | bpf_ntohs(p->dport));
	h = lb_mix(h, bpf_ntohl(p->daddr));
	h = lb_mix(h, p->proto);
	return h;
}

/* Rewrite the packet's destination (src == 0) or source (src == 1) address and port, fixing the
 * IPv4 and the L4 checksum. Returns 0, or < 0 when the packet could not be written. */
static __always_inline int lb_rewrite(struct __sk_buff *skb, const struct pkt *p, int src,
				      __be32 new_addr, __be16 new_port)
{
	u8 vihl;
	u32 l4, csum_off;
	u64 l4_flags = 0;
	__be32 old_addr = src ? p->saddr : p->daddr;
	__be16 old_port = src ? p->sport : p->dport;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &vihl, 1) < 0)
		return -1;
	l4 = ETH_HLEN + (vihl & 0x0f) * 4;
	if (p->proto == IPPROTO_TCP) {
		csum_off = l4 + __builtin_offsetof(struct tcphdr, check);
	} else {
		csum_off = l4 + __builtin_offsetof(struct udphdr, check);
		l4_flags = BPF_F_MARK_MANGLED_0;
	}
	if (bpf_l4_csum_replace(skb, csum_off, old_addr, new_addr, l4_flags | BPF_F_PSEUDO_HDR | sizeof(new_addr)) < 0)
		return -1;
	if (bpf_l3_csum_replace(skb, ETH_HLEN + __builtin_offsetof(struct iphdr, check), old_addr, new_addr, sizeof(new_addr)) < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, ETH_HLEN + (src ? __builtin_offsetof(struct iphdr, saddr) : __builtin_offsetof(struct iphdr, daddr)),
				&new_addr, sizeof(new_addr), 0) < 0)
		return -1;
	if (old_port == new_port)
		return 0;
	if (bpf_l4_csum_replace(skb, csum_off, old_port, new_port, l4_flags | sizeof(new_port)) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, l4 + (src ? 0 : 2), &new_port, sizeof(new_port), 0);
}

/* A packet to a service address: translate it to a backend (see above) and update *p to
 * match. Returns REASON_NONE (translated, or not to a service) or the drop reason. */
static __always_inline int lb_translate(struct __sk_buff *skb, struct pkt *p)
{
	struct lb_service_key sk;
	struct lb_service *svc, *slot;
	struct lb_backend *be = 0;
	struct lb_flow *flow, fresh;
	struct ct_key k;
	u64 now;
	u32 backend_id;

	if ((p->proto != IPPROTO_TCP && p->proto != IPPROTO_UDP) || p->frag == PKT_FRAG_LATER)
		return REASON_NONE;
	__builtin_memset(&sk, 0, sizeof(sk));
	sk.addr = p->daddr;
	sk.port = p->dport;
	sk.proto = p->proto;
	svc = lb_service_lookup(&sk);
	if (!svc)
		return REASON_NONE;
	if (svc->count == 0)
		return REASON_NO_SERVICE_BACKEND;

	/* A flow that has its backend keeps it, while the backend exists. */
	now = bpf_ktime_get_ns();
	ct_tuple(p, &k, 0);
	flow = lb_flow_lookup(&k);
	if (flow && flow->expires_ns >= now && flow->rev_nat_index == svc->rev_nat_index) {
		backend_id = flow->backend_id;
		be = lb_backend_lookup(&backend_id);
	}
	if (!be) {
		sk.slot = 1 + lb_hash(p, svc->flags & LB_F_AFFINITY) % svc->count;
		slot = lb_service_lookup(&sk);
		if (!slot)
			return REASON_NO_SERVICE_BACKEND;
		backend_id = slot->backend_id;
		be = lb_backend_lookup(&backend_id);
		if (!be)
			return REASON_NO_SERVICE_BACKEND;
	}
	__builtin_memset(&fresh, 0, sizeof(fresh));
	fresh.expires_ns = now + ct_lifetime(p, p->tcp_flags & (TCPF_FIN | TCPF_RST) ? CT_F_CLOSING : 0,
					     p->tcp_flags & TCPF_ACK);
	fresh.backend_id = backend_id;
	fresh.rev_nat_index = svc->rev_nat_index;
	lb_flow_update(&k, &fresh);

	if (lb_rewrite(skb, p, 0, be->addr, be->port) < 0)
		return REASON_MALFORMED_L4;
	p->daddr = be->addr;
	p->dport = be->port;
	p->policy_port = bpf_ntohs(be->port);
	p->rev_nat_index = svc->rev_nat_index;
	return REASON_NONE;
}

/* A reply of a translated flow (conntrack REPLY of an entry with a rev-NAT index): its source
 * becomes the service address and port again. *p is updated to match. */
static __always_inline void lb_rev_nat(struct __sk_buff *skb, struct pkt *p, const struct ct_entry *ct)
{
	u32 index;
	struct lb_revnat *rn;

	if (!ct || !ct->rev_nat_index || (p->proto != IPPROTO_TCP && p->proto != IPPROTO_UDP) ||
	    p->frag == PKT_FRAG_LATER)
		return;
	index = ct->rev_nat_index;
	rn = lb_revnat_lookup(&index);
	if (!rn || lb_rewrite(skb, p, 1, rn->addr, rn->port) < 0)
		return;
	p->saddr = rn->addr;
	p->sport = rn->port;
}

#endif
