/* from_container.c - trace point lines for the trace timeline's unit tests
 * (a fixture of tests/unit/test_trace_timeline.py: line N emits the point whose line is N) */


/* TRACE_HOOK in a comment is not an emitting line */



static __always_inline int handle_from_container(struct __sk_buff *skb,
				   int unused)
{
	trace_emit(skb, TRACE_HOOK, __LINE__);

	trace_emit(skb, TRACE_PARSE, __LINE__);

	trace_emit(skb, TRACE_MARK_PASS, __LINE__);

	trace_emit(skb, TRACE_SPOOF_CHECK, __LINE__);

	trace_emit(skb, TRACE_CONNTRACK, __LINE__);

	trace_emit(skb, TRACE_IDENTITY, __LINE__);



	trace_emit(skb, TRACE_POLICY_DECISION, __LINE__);

	trace_emit(skb, TRACE_DECISION, __LINE__);

	trace_emit(skb, TRACE_PROXY_ASSIGN, __LINE__);

	trace_emit(skb, TRACE_CT_CREATE, __LINE__);

	trace_emit(skb, TRACE_FROM_PROXY, __LINE__);

	trace_emit(skb, TRACE_RESULT, __LINE__);


	return 0;
}
