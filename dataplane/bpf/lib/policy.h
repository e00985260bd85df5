/* policy.h - the policy lookup: the C twin of dataplane/mapstate.py lookup_policy().
 *
 * The four lookups and the precedence of their verdicts are explained once, in
 * docs/datapath.md ("Precedence").
 */
#ifndef L7LAB_POLICY_H
#define L7LAB_POLICY_H

/* One direction's decision, and the combined decision of a packet. */
struct decision {
	u8 verdict;             /* enum flow_verdict */
	u8 reason;              /* enum drop_reason */
	u8 direction;
	u8 enforced;            /* the deciding endpoint enforces this direction (for the trace) */
	u16 endpoint_id;        /* whose policy decided; 0 if none */
	u16 proxy_port;
	u32 rule_id;
	u8 audited;             /* audit mode turned a drop into AUDIT (for the trace) */
	u8 pad[3];
};

static __always_inline void policy_try(const struct trace_ctx *t, u32 step, struct policy_key *k, u8 *best,
				       u16 *proxy_port, u32 *rule_id)
{
	struct policy_value *v = policy_lookup_raw(k);

	TRACE(t, TRACE_POLICY_LOOKUP, k->endpoint_id | (u32)k->direction << 16 | step << 24, k->identity, k->protocol | (u32)bpf_ntohs(k->port) << 16, v ? v->verdict | (u32)v->proxy_port << 16 : POLICY_NONE, v ? v->rule_id : 0);

	/* Strictly greater: on a tie the earlier (more specific) lookup keeps the attribution. */
	if (v && v->verdict > *best) {
		*best = v->verdict;
		*proxy_port = v->proxy_port;
		*rule_id = v->rule_id;
	}
}

/* The four lookups; returns POLICY_NONE/ALLOW/REDIRECT/DENY. */
static __always_inline u8 policy_lookup(const struct trace_ctx *t, u16 endpoint_id, u8 direction, u32 identity,
					u8 proto, u16 port, u16 *proxy_port, u32 *rule_id)
{
	struct policy_key k;
	u8 best = POLICY_NONE;

	__builtin_memset(&k, 0, sizeof(k));
	k.prefixlen = POLICY_FULL_PREFIX;
	k.endpoint_id = endpoint_id;
	k.direction = direction;

	k.identity = identity;          /* 1. identity, proto, port */
	k.protocol = proto;
	k.port = bpf_htons(port);
	policy_try(t, 1, &k, &best, proxy_port, rule_id);
	k.protocol = 0;                 /* 2. identity, any proto */
	k.port = 0;
	policy_try(t, 2, &k, &best, proxy_port, rule_id);
	k.identity = IDENTITY_ANY;      /* 3. any identity, proto, port */
	k.protocol = proto;
	k.port = bpf_htons(port);
	policy_try(t, 3, &k, &best, proxy_port, rule_id);
	k.protocol = 0;                 /* 4. any identity, any proto */
	k.port = 0;
	policy_try(t, 4, &k, &best, proxy_port, rule_id);
	return best;
}

/* A decision as TRACE_POLICY_DECISION and TRACE_DECISION carry it in a0 (lib/trace.h). */
static __always_inline u32 decision_word(const struct decision *d)
{
	return d->verdict | (u32)d->reason << 8 | (u32)d->direction << 16 | (u32)d->enforced << 24;
}

/* The decision of one endpoint's policy in one direction for this packet. */
static __always_inline void policy_decide(const struct trace_ctx *t, const struct endpoint_info *ep,
					  u8 direction, u32 remote_identity, const struct pkt *p,
					  struct decision *d)
{
	u16 proxy_port = 0;
	u32 rule_id = 0;
	u8 enforced = ep->flags & (direction == DIR_INGRESS ? EP_F_INGRESS_ENFORCED
							    : EP_F_EGRESS_ENFORCED);
	u8 v = policy_lookup(t, ep->endpoint_id, direction, remote_identity, p->proto,
			     p->policy_port, &proxy_port, &rule_id);

	__builtin_memset(d, 0, sizeof(*d));
	d->direction = direction;
	d->enforced = enforced ? 1 : 0;
	d->endpoint_id = ep->endpoint_id;
	d->rule_id = rule_id;
	if (v == POLICY_DENY) {
		d->verdict = VERDICT_DROP;
		d->reason = REASON_POLICY_EXPLICIT_DENY;
	} else if (v == POLICY_REDIRECT) {
		d->verdict = VERDICT_REDIRECT;
		d->proxy_port = proxy_port;
	} else if (v == POLICY_ALLOW || !enforced) {
		d->verdict = VERDICT_FORWARD;
	} else {
		d->verdict = VERDICT_DROP;
		d->reason = REASON_POLICY_DENIED;
	}
	if (d->verdict == VERDICT_DROP && (AUDIT_ALL || (ep->flags & EP_F_AUDIT))) {
		d->verdict = VERDICT_AUDIT;     /* the reason stays: it says what would have happened */
		d->audited = 1;
	}
	TRACE(t, TRACE_POLICY_DECISION, decision_word(d), d->endpoint_id, d->rule_id, d->proxy_port, d->audited);
}

/* How bad a decision is, to combine egress and ingress: DROP > REDIRECT > AUDIT > FORWARD. */
static __always_inline int decision_rank(const struct decision *d)
{
	switch (d->verdict) {
	case VERDICT_DROP: return 3;
	case VERDICT_REDIRECT: return 2;
	case VERDICT_AUDIT: return 1;
	default: return 0;
	}
}

/* Combine the source's egress decision with the destination's ingress decision (local
 * delivery): the worse one wins. On a tie:
 *   - a drop is reported at egress (it happened first);
 *   - otherwise the direction that enforces policy is reported, as Cilium reports a policy
 *     verdict only where policy is enforced: a flow its source's egress policy allows into a
 *     pod no ingress policy selects is EGRESS ALLOWED by that policy's rule, not an
 *     unenforced ingress forward;
 *   - otherwise (both or neither enforced) ingress, where the packet is delivered. */
static __always_inline void decision_combine(struct decision *out, const struct decision *eg,
					     const struct decision *in)
{
	int re = decision_rank(eg), ri = decision_rank(in);

	if (re > ri || (re == ri && (eg->verdict == VERDICT_DROP || (eg->enforced && !in->enforced))))
		*out = *eg;
	else
		*out = *in;
}

/* The rule that allowed the flow in the direction decision_combine did not report, so an event
 * names both sides (Hubble's egress_allowed_by and ingress_allowed_by): 0 when that direction
 * matched no entry or did not allow. */
static __always_inline u32 decision_other_allow(const struct decision *out, const struct decision *eg,
						const struct decision *in)
{
	const struct decision *other = out->direction == DIR_EGRESS ? in : eg;

	if (other->verdict == VERDICT_FORWARD || other->verdict == VERDICT_REDIRECT)
		return other->rule_id;
	return 0;
}

#endif
