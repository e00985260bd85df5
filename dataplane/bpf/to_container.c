/* to_container.c - tc egress on the node side of pod veths: every packet entering a pod.
 *
 *   mark DECIDED     from_container already decided (pod or world source): pass, no lookup
 *                    (fragments too: from_container decided each of them).
 *   mark FROM_PROXY  the L7 proxy's upstream connection, already checked per request: pass,
 *                    and track it so that the pod's replies pass from_container.
 *   anything else    sent by the node's own stack: remote identity host, the destination's
 *                    INGRESS policy, with conntrack (replies of connections the pod opened
 *                    find their entry reversed and pass).
 *
 * Fragments as in from_container: a passed first fragment records its datagram, a later one
 * has its ports or drops (REASON_FRAGMENT_UNKNOWN).
 *
 * Included by bpf/datapath.c, which defines the program symbol "to_container".
 */

static __always_inline int handle_to_container(struct __sk_buff *skb)
{
	struct pkt p;
	struct flow_info fi;
	struct decision d;
	struct ct_entry *ct = 0;
	u32 mark = skb->mark;
	u32 magic = mark & MARK_MAGIC_MASK;
	int rc;

	if (magic == MARK_MAGIC_DECIDED) {
		count_packet(VERDICT_FORWARD, REASON_NONE, DIR_INGRESS, skb->len);
		return TC_ACT_OK;
	}

	__builtin_memset(&p, 0, sizeof(p));
	__builtin_memset(&fi, 0, sizeof(fi));
	__builtin_memset(&d, 0, sizeof(d));
	fi.hook = HOOK_TO_CONTAINER;
	d.direction = DIR_INGRESS;

	rc = parse_packet(skb, &p);
	if (rc == PARSE_ARP) {
		count_packet(VERDICT_FORWARD, REASON_NONE, DIR_INGRESS, p.len);
		return TC_ACT_OK;
	}
	if (rc != PARSE_IPV4) {
		d.verdict = VERDICT_DROP;
		d.reason = rc;
		return fc_drop(skb, &p, &fi, &d);
	}

	struct endpoint_info *dst_ep = endpoints_lookup(&p.daddr);
	fi.dst_endpoint = dst_ep ? dst_ep->endpoint_id : 0;
	fi.dst_identity = dst_ep ? dst_ep->identity : 0;

	if (magic == MARK_MAGIC_FROM_PROXY) {
		/* Identity-in-mark: bits 16..31 = identity bits 0..15, bits 0..7 = bits 16..23. */
		fi.src_identity = (mark >> 16) | ((mark & 0xff) << 16);
		if (ct_lookup(&p, &ct) == CT_NEW) {
			ct_create(&p, fi.src_identity, 0, 0, CT_F_FROM_PROXY);
			d.endpoint_id = fi.dst_endpoint;
			fi.flags = FLOW_EVENT_F_FROM_PROXY;  /* no policy decided: d stays zeroed */
			emit_event(skb, &p, &fi, &d);
		}
		frag_record(&p);
		count_packet(VERDICT_FORWARD, REASON_NONE, DIR_INGRESS, p.len);
		return TC_ACT_OK;
	}

	if (!dst_ep || ct_lookup(&p, &ct) != CT_NEW) {
		/* Not toward a pod (a world link), or a flow conntrack knows. */
		frag_record(&p);
		count_packet(VERDICT_FORWARD, REASON_NONE, DIR_INGRESS, p.len);
		return TC_ACT_OK;
	}

	fi.src_identity = IDENTITY_HOST;
	policy_decide(dst_ep, DIR_INGRESS, IDENTITY_HOST, &p, &d);
	if (d.verdict == VERDICT_REDIRECT) {
		/* bpf_sk_assign is not available at tc egress: fail closed. */
		d.verdict = VERDICT_DROP;
		d.reason = REASON_PROXY_NOT_AT_EGRESS;
	}
	if (d.verdict == VERDICT_DROP)
		return fc_drop(skb, &p, &fi, &d);
	ct_create(&p, IDENTITY_HOST, d.rule_id, 0, 0);
	frag_record(&p);
	count_packet(d.verdict, d.reason, DIR_INGRESS, p.len);
	emit_event(skb, &p, &fi, &d);
	return TC_ACT_OK;
}
