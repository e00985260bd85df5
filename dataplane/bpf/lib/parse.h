/* parse.h - bounds-checked parsing of Ethernet / IPv4 / TCP / UDP / ICMP / SCTP.
 *
 * Every header is checked against data_end before it is read, and against the lengths the
 * packet itself claims (IPv4 ihl and tot_len, TCP doff), so that nothing truncated or
 * inconsistent reaches a policy decision: such packets are dropped with a MALFORMED_* reason.
 * IPv4 options are skipped using ihl. IPv6 is not supported by the lab and is dropped
 * (REASON_UNSUPPORTED_L3); ARP passes.
 *
 * Fragments (as Cilium's ipv4_handle_fragmentation): a first fragment (MF, offset 0) carries
 * the L4 header and is parsed like any packet; it must hold the whole header (else
 * MALFORMED_L4: a tiny first fragment cannot hide flags or ports in a later one). When a hook
 * passes it, frag_record() remembers its datagram in the `fragments` LRU map,
 * {saddr, daddr, IP id, proto} -> ports. A later fragment (offset > 0) has no L4 header: its
 * ports are the recorded ones, and it carries on exactly as a packet of that flow (conntrack
 * finds the entry the first fragment made). A later fragment of no recorded datagram (first
 * fragment never seen, dropped, or recorded more than FRAG_LIFETIME_S ago) is dropped with
 * REASON_FRAGMENT_UNKNOWN; a later TCP fragment starting inside the 20-byte minimal TCP header
 * (offset < 3, RFC 1858 overlap) with MALFORMED_L4. Ports are never guessed.
 */
#ifndef L7LAB_PARSE_H
#define L7LAB_PARSE_H

#define PARSE_IPV4 0
#define PARSE_ARP  (-1)

/* Longest headers we ever read: Ethernet + IPv4 with options + TCP with options. */
#define PARSE_PULL_LEN (ETH_HLEN + 60 + 60)

struct pkt {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;           /* conntrack tuple ports; ICMP echo: see parse_packet */
	__be16 dport;
	u16 policy_port;        /* host order: TCP/UDP/SCTP destination port, ICMP type, else 0 */
	u8 proto;
	u8 tcp_flags;           /* FIN 0x01 SYN 0x02 RST 0x04 PSH 0x08 ACK 0x10 ... */
	u32 len;                /* skb->len */
	/* ICMP errors (destination unreachable, time exceeded, parameter problem): the tuple of
	 * the packet that caused the error, as quoted in the ICMP payload, so that conntrack can
	 * find the flow it belongs to (RELATED). icmp_error is 0 when nothing usable is quoted. */
	__be32 in_saddr;
	__be32 in_daddr;
	__be16 in_sport;
	__be16 in_dport;
	u8 in_proto;
	u8 icmp_error;
	/* IPv4 fragmentation: PKT_FRAG_* and the IP identification (network order). */
	u8 frag;
	u8 icmp_code;           /* ICMP: the code (policy_port holds the type); else 0 */
	__be16 ip_id;
	/* Set by lb_translate (lib/lb.h) on a packet it translated to a service backend: the
	 * conntrack entry the flow creates carries it, so that its replies are translated back. */
	u16 rev_nat_index;
};

#define PKT_FRAG_NONE  0    /* not a fragment */
#define PKT_FRAG_FIRST 1    /* MF set, offset 0: has the L4 header */
#define PKT_FRAG_LATER 2    /* offset > 0: ports from the fragments map */

#define FRAG_IP_MF         0x2000   /* in host-order frag_off */
#define FRAG_OFFSET_MASK   0x1fff   /* in 8-byte units */

static __always_inline void frag_key_of(const struct pkt *p, struct frag_key *k)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->saddr = p->saddr;
	k->daddr = p->daddr;
	k->id = p->ip_id;
	k->proto = p->proto;
}

/* A first fragment that a hook passes (forwarded, audited or redirected): remember its
 * datagram so that its later fragments get its ports. Call on every path that returns
 * TC_ACT_OK for a parsed IPv4 packet; a no-op for anything but a first fragment. */
static __always_inline void frag_record(const struct pkt *p)
{
	struct frag_key k;
	struct frag_entry e;

	if (p->frag != PKT_FRAG_FIRST)
		return;
	frag_key_of(p, &k);
	__builtin_memset(&e, 0, sizeof(e));
	e.expires_ns = bpf_ktime_get_ns() + FRAG_LIFETIME_S * 1000000000ULL;
	e.sport = p->sport;
	e.dport = p->dport;
	e.policy_port = p->policy_port;
	e.tcp_flags = p->tcp_flags;
	frag_update_raw(&k, &e);
}

#define TCPF_FIN 0x01
#define TCPF_SYN 0x02
#define TCPF_RST 0x04
#define TCPF_PSH 0x08
#define TCPF_ACK 0x10

/* Returns PARSE_IPV4 (p filled), PARSE_ARP, or a drop reason (> 0). */
static __always_inline int parse_packet(struct __sk_buff *skb, struct pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	u32 want = PARSE_PULL_LEN;

	p->len = skb->len;
	/* Headers may sit in paged data (GRO on veth): make them linear before reading. */
	if (want > skb->len)
		want = skb->len;
	if (data + want > data_end) {
		bpf_skb_pull_data(skb, want);
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
	}

	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return REASON_MALFORMED_L2;
	if (eth->h_proto == bpf_htons(ETH_P_ARP))
		return PARSE_ARP;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return REASON_UNSUPPORTED_L3;   /* IPv6, VLAN, anything else */

	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return REASON_MALFORMED_L3;
	if (ip->version != 4 || ip->ihl < 5)
		return REASON_MALFORMED_L3;
	u32 hlen = ip->ihl * 4;
	if ((void *)ip + hlen > data_end)
		return REASON_MALFORMED_L3;
	u32 tot = bpf_ntohs(ip->tot_len);
	/* tot_len must cover the header and fit in the frame (Ethernet padding may follow). */
	if (tot < hlen || tot + ETH_HLEN > skb->len)
		return REASON_MALFORMED_L3;
	p->saddr = ip->saddr;
	p->daddr = ip->daddr;
	p->proto = ip->protocol;
	p->sport = 0;
	p->dport = 0;
	p->policy_port = 0;
	p->tcp_flags = 0;
	p->ip_id = ip->id;
	p->frag = PKT_FRAG_NONE;
	p->icmp_code = 0;

	u16 frag_off = bpf_ntohs(ip->frag_off);
	u16 frag_offset = frag_off & FRAG_OFFSET_MASK;
	if (frag_offset) {
		/* A later fragment: no L4 header, the ports of its datagram's first fragment. */
		struct frag_key fk;
		struct frag_entry *fe;

		p->frag = PKT_FRAG_LATER;
		if (p->proto == IPPROTO_TCP && frag_offset < 3)
			return REASON_MALFORMED_L4;     /* would overlap the TCP header (RFC 1858) */
		frag_key_of(p, &fk);
		fe = frag_lookup_raw(&fk);
		if (!fe || fe->expires_ns < bpf_ktime_get_ns())
			return REASON_FRAGMENT_UNKNOWN;
		p->sport = fe->sport;
		p->dport = fe->dport;
		p->policy_port = fe->policy_port;
		p->tcp_flags = fe->tcp_flags;
		return PARSE_IPV4;
	}
	if (frag_off & FRAG_IP_MF)
		p->frag = PKT_FRAG_FIRST;   /* parsed in full below: it must hold the L4 header */

	u32 l4len = tot - hlen;
	void *l4 = (void *)ip + hlen;
	if (p->proto == IPPROTO_TCP) {
		struct tcphdr *th = l4;
		if ((void *)(th + 1) > data_end || l4len < sizeof(*th))
			return REASON_MALFORMED_L4;
		if (th->doff < 5 || l4len < th->doff * 4)
			return REASON_MALFORMED_L4;
		p->sport = th->source;
		p->dport = th->dest;
		p->tcp_flags = ((u8 *)th)[13];
	} else if (p->proto == IPPROTO_UDP) {
		struct udphdr *uh = l4;
		if ((void *)(uh + 1) > data_end || l4len < sizeof(*uh))
			return REASON_MALFORMED_L4;
		p->sport = uh->source;
		p->dport = uh->dest;
	} else if (p->proto == IPPROTO_SCTP) {
		__be16 *ports = l4;     /* SCTP common header: 12 bytes, ports first */
		if (l4 + 12 > data_end || l4len < 12)
			return REASON_MALFORMED_L4;
		p->sport = ports[0];
		p->dport = ports[1];
	} else if (p->proto == IPPROTO_ICMP) {
		struct icmphdr *ih = l4;
		if ((void *)(ih + 1) > data_end || l4len < sizeof(*ih))
			return REASON_MALFORMED_L4;
		p->policy_port = ih->type;
		p->icmp_code = ih->code;
		/* The echo id goes where a reply finds its request's conntrack entry reversed, and
		 * only a reply: a request carries it as dport, a reply as sport (Cilium's
		 * lib/conntrack.h). With the id in both ports, an echo request from B to A would
		 * find A's earlier request to B reversed and pass as its "reply" without a policy
		 * check (Cilium GHSA-c66w-hq56-4q97). Other ICMP has ports 0. */
		if (ih->type == ICMP_ECHO)
			p->dport = ih->un.echo.id;
		else if (ih->type == ICMP_ECHOREPLY)
			p->sport = ih->un.echo.id;
		if (ih->type == ICMP_DEST_UNREACH || ih->type == ICMP_TIME_EXCEEDED ||
		    ih->type == ICMP_PARAMETERPROB) {
			/* The quoted packet: its IPv4 header and at least the first 8 bytes of L4. */
			struct iphdr *qip = (void *)(ih + 1);
			if ((void *)(qip + 1) > data_end || qip->version != 4 || qip->ihl < 5)
				return PARSE_IPV4;
			__be16 *qports = (void *)qip + (qip->ihl & 0xf) * 4;
			if ((void *)(qports + 2) > data_end)
				return PARSE_IPV4;
			p->in_saddr = qip->saddr;
			p->in_daddr = qip->daddr;
			p->in_proto = qip->protocol;
			if (qip->protocol == IPPROTO_TCP || qip->protocol == IPPROTO_UDP ||
			    qip->protocol == IPPROTO_SCTP) {
				p->in_sport = qports[0];
				p->in_dport = qports[1];
			}
			p->icmp_error = 1;
		}
		return PARSE_IPV4;
	}
	p->policy_port = bpf_ntohs(p->dport);
	return PARSE_IPV4;
}

#endif
