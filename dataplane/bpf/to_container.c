/* to_container.c - tc egress on the node side of pod veths: every packet entering a pod.
 *
 *   mark DECIDED     from_container already decided (pod or world source): pass, no lookup
 *                    (fragments too: from_container decided each of them).
 *   mark FROM_PROXY  the L7 proxy's upstream connection, already checked per request: pass,
 *                    and track it so that the pod's replies pass from_container.
 *   anything else    sent by the node's own stack: remote identity host, the destination's
 *                    INGRESS policy and, when a host policy selects the node, the host's
 *                    EGRESS policy (lib/host.h; toward world hosts too), with conntrack
 *                    (replies of connections the pod opened find their entry reversed and pass).
 *
 * Fragments as in from_container: a passed first fragment records its datagram, a later one
 * has its ports or drops (REASON_FRAGMENT_UNKNOWN).
 *
 * A packet of a traced flow (lib/trace.h) reports its steps: HOOK, then MARK_PASS on a DECIDED
 * mark (the packet is parsed only while some flow is traced, to know whether it is one of them);
 * else PARSE, FROM_PROXY for the proxy's upstream, CONNTRACK, for node traffic IDENTITY (host,
 * TRACE_ID_FROM_NODE; the destination) with the policy steps, CT_CREATE; and RESULT, which
 * handle_to_container emits for every path. Tracing decides nothing.
 *
 * Included by bpf/datapath.c, which defines the program symbol "to_container".
 */

static __always_inline int to_container_run(struct __sk_buff *skb, struct trace_ctx *t, struct decision *d)
{
	struct pkt p;
	struct flow_info fi;
	struct ct_entry *ct = 0;
	u32 mark = skb->mark;
	u32 magic = mark & MARK_MAGIC_MASK;
	int rc = PARSE_IPV4, ctr = CT_NEW;

	__builtin_memset(&p, 0, sizeof(p));
	d->direction = DIR_INGRESS;
	/* A DECIDED packet passes without a look; only while some flow is traced is it parsed,
	 * to know whether it belongs to one of them. */
	if (magic != MARK_MAGIC_DECIDED || trace_flow_count()) {
		rc = parse_packet(skb, &p);
		if (rc == PARSE_IPV4)
			trace_begin(t, skb, &p, HOOK_TO_CONTAINER);
	}
	TRACE(t, TRACE_HOOK, mark, skb->len, 0, 0, 0);
	if (magic == MARK_MAGIC_DECIDED) {
		TRACE(t, TRACE_MARK_PASS, mark, 0, 0, 0, 0);
		count_packet(VERDICT_FORWARD, REASON_NONE, DIR_INGRESS, skb->len);
		return TC_ACT_OK;
	}

	__builtin_memset(&fi, 0, sizeof(fi));
	fi.hook = HOOK_TO_CONTAINER;

	if (rc == PARSE_ARP) {
		count_packet(VERDICT_FORWARD, REASON_NONE, DIR_INGRESS, p.len);
		return TC_ACT_OK;
	}
	if (rc != PARSE_IPV4) {
		d->verdict = VERDICT_DROP;
		d->reason = rc;
		return fc_drop(skb, &p, &fi, d);
	}
	TRACE(t, TRACE_PARSE, p.frag, p.policy_port, 0, 0, 0);

	struct endpoint_info *dst_ep = endpoints_lookup(&p.daddr);
	/* The host endpoint (lib/host.h) when the node's own stack sends this and a host policy
	 * selects the node; never for the proxy's upstream. */
	struct endpoint_info *host_ep = magic == MARK_MAGIC_FROM_PROXY ? 0 : host_endpoint_of(&p.saddr);
	fi.dst_endpoint = dst_ep ? dst_ep->endpoint_id : 0;
	fi.dst_identity = dst_ep ? dst_ep->identity : 0;

	if (magic == MARK_MAGIC_FROM_PROXY) {
		/* Identity-in-mark: bits 16..31 = identity bits 0..15, bits 0..7 = bits 16..23. */
		fi.src_identity = (mark >> 16) | ((mark & 0xff) << 16);
		TRACE(t, TRACE_FROM_PROXY, fi.src_identity, mark, 0, 0, 0);
	}
	if (magic == MARK_MAGIC_FROM_PROXY || dst_ep || host_ep) {
		ctr = ct_lookup(&p, &ct);
		TRACE(t, TRACE_CONNTRACK, ctr, ct ? ct->proxy_port : 0, ct ? ct->flags : 0, ct ? ct->src_identity : 0, ct ? ct->rule_id : 0);
	}
	if (magic == MARK_MAGIC_FROM_PROXY) {
		/* Already checked per request by the proxy: pass, and track it so that the pod's
		 * replies pass from_container. */
		if (ctr == CT_NEW) {
			ct_create(t, &p, fi.src_identity, 0, 0, CT_F_FROM_PROXY);
			d->endpoint_id = fi.dst_endpoint;
			fi.flags = FLOW_EVENT_F_FROM_PROXY;  /* no policy decided: d stays zeroed */
			emit_event(skb, &p, &fi, d);
		}
		frag_record(&p);
		count_packet(VERDICT_FORWARD, REASON_NONE, DIR_INGRESS, p.len);
		return TC_ACT_OK;
	}

	if ((!dst_ep && !host_ep) || ctr != CT_NEW) {
		/* Not toward a pod (a world link) with no host policy, or a flow conntrack knows. The
		 * L7 proxy answering a redirected flow to a service answers as the service (lib/lb.h). */
		if (ctr == CT_REPLY)
			lb_rev_nat(skb, &p, ct);
		frag_record(&p);
		count_packet(VERDICT_FORWARD, REASON_NONE, DIR_INGRESS, p.len);
		return TC_ACT_OK;
	}

	/* Sent by the node's own stack: remote identity host; the host's egress when a host
	 * policy selects the node (lib/host.h), the destination's ingress when it is a pod. */
	fi.src_identity = IDENTITY_HOST;
	fi.src_endpoint = host_ep ? host_ep->endpoint_id : 0;
	TRACE(t, TRACE_IDENTITY, TRACE_SIDE_SOURCE, IDENTITY_HOST, TRACE_ID_FROM_NODE, fi.src_endpoint, 0);
	if (dst_ep)
		TRACE(t, TRACE_IDENTITY, TRACE_SIDE_DESTINATION, fi.dst_identity, TRACE_ID_FROM_ENDPOINT, fi.dst_endpoint, 0);
	else
		fi.dst_identity = identity_of(t, TRACE_SIDE_DESTINATION, p.daddr, 0);
	host_decide(t, host_ep, dst_ep, &fi, &p, d);
	if (d->verdict == VERDICT_REDIRECT) {
		/* bpf_sk_assign is not available at tc egress: fail closed. */
		d->verdict = VERDICT_DROP;
		d->reason = REASON_PROXY_NOT_AT_EGRESS;
	}
	TRACE(t, TRACE_DECISION, decision_word(d), d->endpoint_id, d->rule_id, d->proxy_port, d->audited);
	if (d->verdict == VERDICT_DROP)
		return fc_drop(skb, &p, &fi, d);
	ct_create(t, &p, IDENTITY_HOST, d->rule_id, 0, 0);
	frag_record(&p);
	count_packet(d->verdict, d->reason, d->direction, p.len);
	emit_event(skb, &p, &fi, d);
	return TC_ACT_OK;
}

static __always_inline int handle_to_container(struct __sk_buff *skb)
{
	struct trace_ctx t;
	struct decision d;
	int act;

	t.id = 0;
	__builtin_memset(&d, 0, sizeof(d));
	act = to_container_run(skb, &t, &d);
	TRACE(&t, TRACE_RESULT, act, d.verdict, d.reason, skb->mark, 0);
	return act;
}
