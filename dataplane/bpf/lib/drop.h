/* drop.h - flow verdicts and drop reasons; mirrored by dataplane/abi.py (the unit tier parses
 * this file, keep the "NAME = value," one-per-line form; the kernel tier compiles it and
 * compares every value).
 */
#ifndef L7LAB_DROP_H
#define L7LAB_DROP_H

/* What the datapath did with a packet (events and metrics). */
enum flow_verdict {
	VERDICT_FORWARD = 0,    /* passed (policy allowed, established, ARP, decided mark) */
	VERDICT_DROP = 1,       /* TC_ACT_SHOT */
	VERDICT_REDIRECT = 2,   /* assigned to the L7 proxy socket */
	VERDICT_AUDIT = 3,      /* would have been dropped; passed because of audit mode */
};

/* Why. Every drop has exactly one reason; REASON_NONE for packets that were not dropped. */
enum drop_reason {
	REASON_NONE = 0,
	REASON_POLICY_DENIED = 1,          /* no policy entry matched and enforcement is on */
	REASON_POLICY_EXPLICIT_DENY = 2,   /* a DENY entry matched (ingressDeny/egressDeny) */
	REASON_PROXY_SOCKET_MISSING = 3,   /* REDIRECT but no proxy listener: fail closed */
	REASON_PROXY_ASSIGN_FAILED = 4,    /* bpf_sk_assign refused the proxy socket: fail closed */
	REASON_MALFORMED_L2 = 5,           /* truncated Ethernet header */
	REASON_MALFORMED_L3 = 6,           /* truncated IPv4 header, ihl < 5, ihl past the data, bad tot_len, version != 4 */
	REASON_MALFORMED_L4 = 7,           /* truncated TCP/UDP/ICMP/SCTP header, TCP doff < 5 */
	REASON_UNSUPPORTED_L3 = 8,         /* IPv6 and any ethertype other than IPv4 and ARP */
	REASON_FRAGMENT = 9,               /* IPv4 fragment of a flow redirected to the L7 proxy (not supported) */
	REASON_SOURCE_SPOOFED = 10,        /* source IP does not belong to the endpoint bound to the interface */
	REASON_PROXY_NOT_AT_EGRESS = 11,   /* REDIRECT for traffic the node itself sends: no sk_assign at tc egress */
	REASON_FRAGMENT_UNKNOWN = 12,      /* non-first IPv4 fragment of no known flow (first fragment unseen or dropped) */
	REASON_NO_SERVICE_BACKEND = 13,    /* to a service address whose service has no backend (Cilium's "no service backend") */
};

#endif
