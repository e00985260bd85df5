/* from_container.c - tc ingress on the node side of pod veths and world links: every packet
 * leaving a pod or a world host. All policy between pods is decided here, in one pass: the
 * source's EGRESS policy and, for a local destination, the destination's INGRESS policy
 * (bpf_sk_assign, needed for the L7 redirect, only works at tc ingress).
 *
 *   parse (drop what is malformed; later fragments get their first fragment's ports or drop)
 *     -> anti-spoofing -> conntrack
 *     established/reply: pass (redirected flows: back to the proxy socket)
 *     new: identities -> egress + ingress policy -> DROP / FORWARD (+ct) / REDIRECT (+ct)
 *   every pass of a first fragment records its datagram (frag_record) for the later ones;
 *   a later fragment of a redirected flow drops (REASON_FRAGMENT).
 *
 * Included by bpf/datapath.c, which defines the program symbol "from_container".
 */

static __always_inline int fc_drop(struct __sk_buff *skb, const struct pkt *p,
				   const struct flow_info *fi, const struct decision *d)
{
	count_packet(VERDICT_DROP, d->reason, d->direction, p->len);
	emit_event(skb, p, fi, d);
	return TC_ACT_SHOT;
}

static __always_inline u32 identity_of(__be32 addr, const struct endpoint_info *ep)
{
	struct ipcache_key k = { .prefixlen = 32, .addr = addr };
	struct ipcache_value *v;

	if (ep)
		return ep->identity;
	v = ipcache_lookup(&k);
	return v ? v->identity : IDENTITY_WORLD;
}

static __always_inline int handle_from_container(struct __sk_buff *skb)
{
	struct pkt p;
	struct flow_info fi;
	struct decision d, eg, in;
	struct ct_entry *ct = 0;
	int rc;

	__builtin_memset(&p, 0, sizeof(p));
	__builtin_memset(&fi, 0, sizeof(fi));
	__builtin_memset(&d, 0, sizeof(d));
	fi.hook = HOOK_FROM_CONTAINER;
	d.direction = DIR_EGRESS;

	rc = parse_packet(skb, &p);
	if (rc == PARSE_ARP) {
		count_packet(VERDICT_FORWARD, REASON_NONE, DIR_EGRESS, p.len);
		return TC_ACT_OK;
	}
	if (rc != PARSE_IPV4) {
		d.verdict = VERDICT_DROP;
		d.reason = rc;
		return fc_drop(skb, &p, &fi, &d);
	}

	struct endpoint_info *src_ep = endpoints_lookup(&p.saddr);
	struct endpoint_info *dst_ep = endpoints_lookup(&p.daddr);
	fi.src_endpoint = src_ep ? src_ep->endpoint_id : 0;
	fi.dst_endpoint = dst_ep ? dst_ep->endpoint_id : 0;

	/* Anti-spoofing: a pod interface may only send its own address; a world link may not
	 * claim a local endpoint's address. Unbound interfaces are not checked. */
	u32 ifindex = skb->ingress_ifindex;
	struct if_binding *bind = if_bind_lookup(&ifindex);
	if (bind && (bind->endpoint_id ? (!src_ep || src_ep->endpoint_id != bind->endpoint_id)
				       : src_ep != 0)) {
		d.verdict = VERDICT_DROP;
		d.reason = REASON_SOURCE_SPOOFED;
		d.endpoint_id = bind->endpoint_id;
		return fc_drop(skb, &p, &fi, &d);
	}

	/* Delivered to a local endpoint counts as ingress, anything else as egress. */
	u8 fwd_dir = dst_ep ? DIR_INGRESS : DIR_EGRESS;
	int ctr = ct_lookup(&p, &ct);
	if (ctr != CT_NEW && ct) {
		if (ctr == CT_ESTABLISHED && ct->proxy_port) {
			/* A redirected flow: every packet goes to the proxy, or nowhere. A later
			 * fragment cannot go (the proxy path takes no fragments): REASON_FRAGMENT. */
			rc = p.frag == PKT_FRAG_LATER ? REASON_FRAGMENT
						      : proxy_redirect(skb, &p, ct->proxy_port);
			if (rc != REASON_NONE) {
				fi.src_identity = identity_of(p.saddr, src_ep);
				fi.dst_identity = identity_of(p.daddr, dst_ep);
				d.verdict = VERDICT_DROP;
				d.reason = rc;
				d.direction = fwd_dir;
				d.proxy_port = ct->proxy_port;
				d.rule_id = ct->rule_id;
				return fc_drop(skb, &p, &fi, &d);
			}
			frag_record(&p);
			count_packet(VERDICT_REDIRECT, REASON_NONE, fwd_dir, p.len);
			return TC_ACT_OK;
		}
		frag_record(&p);
		skb->mark = MARK_MAGIC_DECIDED;
		count_packet(VERDICT_FORWARD, REASON_NONE, fwd_dir, p.len);
		return TC_ACT_OK;
	}

	/* A new flow: both policies, in one pass. */
	fi.src_identity = identity_of(p.saddr, src_ep);
	fi.dst_identity = identity_of(p.daddr, dst_ep);
	__builtin_memset(&eg, 0, sizeof(eg));
	eg.direction = DIR_EGRESS;      /* a world source has no egress policy: forward */
	if (src_ep)
		policy_decide(src_ep, DIR_EGRESS, fi.dst_identity, &p, &eg);
	if (dst_ep) {
		policy_decide(dst_ep, DIR_INGRESS, fi.src_identity, &p, &in);
		decision_combine(&d, &eg, &in);
	} else {
		d = eg;
	}

	if (d.verdict == VERDICT_DROP)
		return fc_drop(skb, &p, &fi, &d);
	if (d.verdict == VERDICT_REDIRECT) {
		rc = p.frag == PKT_FRAG_LATER ? REASON_FRAGMENT : proxy_redirect(skb, &p, d.proxy_port);
		if (rc != REASON_NONE) {
			d.verdict = VERDICT_DROP;   /* fail closed, audit mode or not */
			d.reason = rc;
			return fc_drop(skb, &p, &fi, &d);
		}
		ct_create(&p, fi.src_identity, d.rule_id, d.proxy_port, 0);
		frag_record(&p);
		count_packet(VERDICT_REDIRECT, REASON_NONE, d.direction, p.len);
		emit_event(skb, &p, &fi, &d);
		return TC_ACT_OK;
	}
	/* FORWARD, or AUDIT (a would-be drop that passes: tracked so it is reported once). */
	ct_create(&p, fi.src_identity, d.rule_id, 0, 0);
	frag_record(&p);
	skb->mark = MARK_MAGIC_DECIDED;
	count_packet(d.verdict, d.reason, d.direction, p.len);
	emit_event(skb, &p, &fi, &d);
	return TC_ACT_OK;
}
