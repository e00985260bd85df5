/* proxy.h - hand a REDIRECT flow to the L7 proxy inside the node namespace.
 *
 * bpf_sk_assign works at tc ingress only, which is why every decision is taken there. For
 * TCP we first look for a socket of the original tuple (the proxy's accepted, transparent
 * socket of a flow already redirected); failing that, or if what we found is a listener, the
 * proxy listener on 127.0.0.1:proxy_port (a listener on 0.0.0.0 matches too). UDP (DNS proxy)
 * uses the listener lookup only. The packet is then marked TO_PROXY so that the node's
 * "ip rule fwmark 0x200/0xf00 lookup 2004" routes it locally to the assigned socket.
 * No socket, or an assignment the kernel refuses, drops the packet: fail closed, nothing
 * redirected reaches its destination unchecked.
 */
#ifndef L7LAB_PROXY_H
#define L7LAB_PROXY_H


/* Returns REASON_NONE when the socket is assigned, else the drop reason; *found says which
 * socket the lookups found (TRACE_SK_*). */
static __always_inline int proxy_assign(struct __sk_buff *skb, const struct pkt *p, u16 proxy_port, u32 *found)
{
	struct bpf_sock_tuple t;
	struct bpf_sock *sk = 0;
	long err;

	__builtin_memset(&t, 0, sizeof(t));
	t.ipv4.saddr = p->saddr;
	t.ipv4.daddr = p->daddr;
	t.ipv4.sport = p->sport;
	t.ipv4.dport = p->dport;
	if (p->proto == IPPROTO_TCP) {
		sk = bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
		if (sk) {
			if (sk->state != BPF_TCP_LISTEN) {
				*found = TRACE_SK_FLOW;
				goto assign;
			}
			bpf_sk_release(sk);
		}
		t.ipv4.daddr = bpf_htonl(0x7f000001);
		t.ipv4.dport = bpf_htons(proxy_port);
		sk = bpf_sk_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
	} else if (p->proto == IPPROTO_UDP) {
		t.ipv4.daddr = bpf_htonl(0x7f000001);
		t.ipv4.dport = bpf_htons(proxy_port);
		sk = bpf_sk_lookup_udp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
	}
	if (!sk)
		return REASON_PROXY_SOCKET_MISSING;
	*found = TRACE_SK_LISTENER;
assign:
	err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (err)
		return REASON_PROXY_ASSIGN_FAILED;
	skb->mark = MARK_MAGIC_TO_PROXY | ((u32)proxy_port << 16);
	return REASON_NONE;
}

/* proxy_assign, traced: which socket, the result and the mark set (TRACE_PROXY_ASSIGN). */
static __always_inline int proxy_redirect(const struct trace_ctx *t, struct __sk_buff *skb, const struct pkt *p,
					  u16 proxy_port)
{
	u32 found = TRACE_SK_NONE;
	int rc = proxy_assign(skb, p, proxy_port, &found);

	TRACE(t, TRACE_PROXY_ASSIGN, rc, found, skb->mark, proxy_port, 0);
	return rc;
}

#endif
