/* lib/host.h - the host firewall's egress: what the node's own stack sends.
 *
 * A host policy (a CiliumClusterwideNetworkPolicy with nodeSelector) that selects the node puts
 * the host endpoint into the endpoints map under the node's addresses (identity host). Its
 * INGRESS needs nothing here: from_container finds it as the destination of packets to the
 * node's addresses and judges them like any local delivery. Its EGRESS is judged in
 * to_container, where the node's own packets leave toward a pod or a world host: their source
 * address is the node's (routes to endpoints carry it as preferred source), so the host
 * endpoint is found by it, and the host's egress decision is combined with the destination's
 * ingress decision as from_container combines a pod's.
 *
 * Without a host endpoint (no host policy selects the node) nothing changes: a packet toward a
 * pod is judged by the pod's ingress alone (remote identity host), one toward a world host is
 * not judged. The L7 proxy's upstream (from-proxy mark) never gets here: it was checked per
 * request, as Cilium's proxy traffic is exempt from the host firewall.
 *
 * Included by bpf/datapath.c after lib/policy.h.
 */
#ifndef L7LAB_HOST_H
#define L7LAB_HOST_H

/* The host endpoint, when `saddr` is one of the node's addresses and a host policy selects the
 * node; 0 otherwise (a pod's address, as the proxy's transparent answers carry, is no host). */
static __always_inline struct endpoint_info *host_endpoint_of(__be32 *saddr)
{
	struct endpoint_info *ep = endpoints_lookup(saddr);

	return ep && ep->identity == IDENTITY_HOST ? ep : 0;
}

/* The decision for a new flow the node's own stack sends: the host's EGRESS (when there is a
 * host endpoint) toward fi->dst_identity, combined with the destination's INGRESS (when it is
 * a local endpoint) from identity host. At least one of host_ep, dst_ep is set. */
static __always_inline void host_decide(const struct trace_ctx *t, const struct endpoint_info *host_ep,
					const struct endpoint_info *dst_ep, struct flow_info *fi,
					const struct pkt *p, struct decision *d)
{
	struct decision eg, in;

	__builtin_memset(&eg, 0, sizeof(eg));
	eg.direction = DIR_EGRESS;
	if (host_ep)
		policy_decide(t, host_ep, DIR_EGRESS, fi->dst_identity, p, &eg);
	if (!dst_ep) {
		*d = eg;
		return;
	}
	policy_decide(t, dst_ep, DIR_INGRESS, IDENTITY_HOST, p, &in);
	if (!host_ep) {
		*d = in;
		return;
	}
	decision_combine(d, &eg, &in);
	fi->other_rule_id = decision_other_allow(d, &eg, &in);
}

#endif
