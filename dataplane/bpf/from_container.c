/* from_container.c - tc ingress on the node side of pod veths and world links: every packet
 * leaving a pod or a world host. All policy between pods is decided here, in one pass: the
 * source's EGRESS policy and, for a local destination, the destination's INGRESS policy
 * (bpf_sk_assign, needed for the L7 redirect, only works at tc ingress).
 *
 *   parse (drop what is malformed; later fragments get their first fragment's ports or drop)
 *     -> anti-spoofing -> to a service address: translated to a backend (lib/lb.h) -> conntrack
 *     established/reply: pass (redirected flows: back to the proxy socket; a reply of a
 *       translated flow leaves with the service address as its source)
 *     new: identities -> egress + ingress policy -> DROP / FORWARD (+ct) / REDIRECT (+ct)
 *   every pass of a first fragment records its datagram (frag_record) for the later ones;
 *   a later fragment of a redirected flow drops (REASON_FRAGMENT).
 *
 * A packet of a traced flow (lib/trace.h) reports each step as it is taken: HOOK, PARSE,
 * SPOOF_CHECK, CONNTRACK, then for a new flow IDENTITY (source, destination), the
 * POLICY_LOOKUPs and POLICY_DECISION of each direction, DECISION, PROXY_ASSIGN, CT_CREATE; and
 * RESULT, which handle_from_container emits for every path. Tracing decides nothing.
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

static __always_inline u32 identity_of(const struct trace_ctx *t, u32 side, __be32 addr,
				       const struct endpoint_info *ep)
{
	struct ipcache_key k = { .prefixlen = 32, .addr = addr };
	struct ipcache_value *v = 0;
	u32 identity = IDENTITY_WORLD, origin = TRACE_ID_FROM_WORLD;

	if (ep) {
		identity = ep->identity;
		origin = TRACE_ID_FROM_ENDPOINT;
	} else {
		v = ipcache_lookup(&k);
		if (v) {
			identity = v->identity;
			origin = TRACE_ID_FROM_IPCACHE;
		}
	}
	TRACE(t, TRACE_IDENTITY, side, identity, origin, ep ? ep->endpoint_id : 0, 0);
	return identity;
}

/* The program's decision; *d ends up saying what it did (verdict, reason) for the RESULT. */
static __always_inline int from_container_run(struct __sk_buff *skb, struct trace_ctx *t, struct decision *d)
{
	struct pkt p;
	struct flow_info fi;
	struct decision eg, in;
	struct ct_entry *ct = 0;
	int rc;

	__builtin_memset(&p, 0, sizeof(p));
	__builtin_memset(&fi, 0, sizeof(fi));
	fi.hook = HOOK_FROM_CONTAINER;
	d->direction = DIR_EGRESS;

	rc = parse_packet(skb, &p);
	if (rc == PARSE_ARP) {
		count_packet(VERDICT_FORWARD, REASON_NONE, DIR_EGRESS, p.len);
		return TC_ACT_OK;
	}
	if (rc != PARSE_IPV4) {
		d->verdict = VERDICT_DROP;
		d->reason = rc;
		return fc_drop(skb, &p, &fi, d);
	}
	trace_begin(t, skb, &p, HOOK_FROM_CONTAINER);
	TRACE(t, TRACE_HOOK, skb->mark, skb->len, 0, 0, 0);
	TRACE(t, TRACE_PARSE, p.frag, p.policy_port, 0, 0, 0);

	struct endpoint_info *src_ep = endpoints_lookup(&p.saddr);
	struct endpoint_info *dst_ep = endpoints_lookup(&p.daddr);
	fi.src_endpoint = src_ep ? src_ep->endpoint_id : 0;
	fi.dst_endpoint = dst_ep ? dst_ep->endpoint_id : 0;

	/* Anti-spoofing: a pod interface may only send its own address; a world link may not
	 * claim a local endpoint's address. Unbound interfaces are not checked. */
	u32 ifindex = skb->ingress_ifindex;
	struct if_binding *bind = if_bind_lookup(&ifindex);
	if (bind) {
		/* fi.src_endpoint is 0 exactly when the source is no local endpoint (ids start at 1). */
		u32 spoofed = bind->endpoint_id ? fi.src_endpoint != bind->endpoint_id : fi.src_endpoint != 0;
		TRACE(t, TRACE_SPOOF_CHECK, bind->endpoint_id, !spoofed, 0, 0, 0);
		if (spoofed) {
			d->verdict = VERDICT_DROP;
			d->reason = REASON_SOURCE_SPOOFED;
			d->endpoint_id = bind->endpoint_id;
			return fc_drop(skb, &p, &fi, d);
		}
	}

	/* To a service address: from here on the packet is addressed to the backend (lib/lb.h). */
	rc = lb_translate(skb, &p);
	if (rc != REASON_NONE) {
		fi.src_identity = identity_of(t, TRACE_SIDE_SOURCE, p.saddr, src_ep);
		d->verdict = VERDICT_DROP;
		d->reason = rc;
		d->endpoint_id = fi.src_endpoint;
		return fc_drop(skb, &p, &fi, d);
	}
	if (p.rev_nat_index) {
		dst_ep = endpoints_lookup(&p.daddr);
		fi.dst_endpoint = dst_ep ? dst_ep->endpoint_id : 0;
	}

	/* Delivered to a local endpoint counts as ingress, anything else as egress. */
	u8 fwd_dir = dst_ep ? DIR_INGRESS : DIR_EGRESS;
	int ctr = ct_lookup(&p, &ct);
	TRACE(t, TRACE_CONNTRACK, ctr, ct ? ct->proxy_port : 0, ct ? ct->flags : 0, ct ? ct->src_identity : 0, ct ? ct->rule_id : 0);
	if (ctr != CT_NEW && ct) {
		d->direction = fwd_dir;
		if (ctr == CT_REPLY)
			lb_rev_nat(skb, &p, ct);        /* a backend's answer leaves as the service's */
		if (ctr == CT_ESTABLISHED && ct->proxy_port) {
			/* A redirected flow: every packet goes to the proxy, or nowhere. A later
			 * fragment cannot go (the proxy path takes no fragments): REASON_FRAGMENT. */
			rc = p.frag == PKT_FRAG_LATER ? REASON_FRAGMENT
						      : proxy_redirect(t, skb, &p, ct->proxy_port);
			d->proxy_port = ct->proxy_port;
			d->rule_id = ct->rule_id;
			if (rc != REASON_NONE) {
				fi.src_identity = identity_of(t, TRACE_SIDE_SOURCE, p.saddr, src_ep);
				fi.dst_identity = identity_of(t, TRACE_SIDE_DESTINATION, p.daddr, dst_ep);
				d->verdict = VERDICT_DROP;
				d->reason = rc;
				return fc_drop(skb, &p, &fi, d);
			}
			frag_record(&p);
			d->verdict = VERDICT_REDIRECT;
			count_packet(VERDICT_REDIRECT, REASON_NONE, fwd_dir, p.len);
			return TC_ACT_OK;
		}
		frag_record(&p);
		skb->mark = MARK_MAGIC_DECIDED;
		count_packet(VERDICT_FORWARD, REASON_NONE, fwd_dir, p.len);
		return TC_ACT_OK;
	}

	/* A new flow: both policies, in one pass. */
	fi.src_identity = identity_of(t, TRACE_SIDE_SOURCE, p.saddr, src_ep);
	fi.dst_identity = identity_of(t, TRACE_SIDE_DESTINATION, p.daddr, dst_ep);
	__builtin_memset(&eg, 0, sizeof(eg));
	eg.direction = DIR_EGRESS;      /* a world source has no egress policy: forward */
	if (src_ep)
		policy_decide(t, src_ep, DIR_EGRESS, fi.dst_identity, &p, &eg);
	if (dst_ep) {
		policy_decide(t, dst_ep, DIR_INGRESS, fi.src_identity, &p, &in);
		decision_combine(d, &eg, &in);
		fi.other_rule_id = decision_other_allow(d, &eg, &in);
	} else {
		*d = eg;
	}
	TRACE(t, TRACE_DECISION, decision_word(d), d->endpoint_id, d->rule_id, d->proxy_port, d->audited);

	if (d->verdict == VERDICT_DROP)
		return fc_drop(skb, &p, &fi, d);
	if (d->verdict == VERDICT_REDIRECT) {
		rc = p.frag == PKT_FRAG_LATER ? REASON_FRAGMENT : proxy_redirect(t, skb, &p, d->proxy_port);
		if (rc != REASON_NONE) {
			d->verdict = VERDICT_DROP;   /* fail closed, audit mode or not */
			d->reason = rc;
			return fc_drop(skb, &p, &fi, d);
		}
		ct_create(t, &p, fi.src_identity, d->rule_id, d->proxy_port, 0);
		frag_record(&p);
		count_packet(VERDICT_REDIRECT, REASON_NONE, d->direction, p.len);
		emit_event(skb, &p, &fi, d);
		return TC_ACT_OK;
	}
	/* FORWARD, or AUDIT (a would-be drop that passes: tracked so it is reported once). */
	ct_create(t, &p, fi.src_identity, d->rule_id, 0, 0);
	frag_record(&p);
	skb->mark = MARK_MAGIC_DECIDED;
	count_packet(d->verdict, d->reason, d->direction, p.len);
	emit_event(skb, &p, &fi, d);
	return TC_ACT_OK;
}

static __always_inline int handle_from_container(struct __sk_buff *skb)
{
	struct trace_ctx t;
	struct decision d;
	int act;

	t.id = 0;
	__builtin_memset(&d, 0, sizeof(d));
	act = from_container_run(skb, &t, &d);
	TRACE(&t, TRACE_RESULT, act, d.verdict, d.reason, skb->mark, 0);
	return act;
}
