/* policy.h - trace point lines for the trace timeline's unit tests
 * (a fixture of tests/unit/test_trace_timeline.py: line N emits the point whose line is N) */


/* TRACE_HOOK in a comment is not an emitting line */



static __always_inline int policy_lookup(struct __sk_buff *skb,
				   int unused)
{












	trace_emit(skb, TRACE_POLICY_LOOKUP, __LINE__);














	return 0;
}
