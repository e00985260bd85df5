/* common.h - constants shared by every part of the datapath.
 *
 * Every value here has its Python twin in dataplane/abi.py, the one place Python declares
 * them; tests/kernel/test_abi_compiled.py compiles these headers and compares each constant and each
 * struct field with that module. Never patch these by string replacement.
 */
#ifndef L7LAB_COMMON_H
#define L7LAB_COMMON_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/icmp.h>

/* Tunables are parameters of this code whose values live in dataplane/abi.py (c_defines): the
 * loader passes every one of them as a -D cflag, so they are written once. A compile without
 * them is a mistake, not a default.
 *   AUDIT_ALL            1: every would-be drop passes and is reported as AUDIT
 *   DEBUG                1: bpf_trace_printk on drops (cat /sys/kernel/tracing/trace_pipe)
 *   *_MAP_SIZE           max entries of each map (bpf/datapath.c)
 *   EVENTS_PAGES         ring buffer size in pages (power of two)
 *   TRACING              1: per-flow trace points compiled in (lib/trace.h); 0: left out
 *   TRACE_MAP_SIZE       flows traced at once
 *   TRACE_PAGES          trace ring buffer size in pages (power of two)
 *   FRAG_LIFETIME_S      how long a first fragment vouches for its later ones (ipfrag_time)
 *   CT_LIFETIME_TCP_S    established TCP
 *   CT_LIFETIME_OTHER_S  UDP, ICMP, other protocols, and TCP before the handshake completes
 *   CT_LIFETIME_CLOSE_S  after FIN or RST
 *   LB_MAP_SIZE          max entries of the service, backend and rev-NAT maps (lib/lb.h)
 */
#if !defined(AUDIT_ALL) || !defined(DEBUG) || !defined(POLICY_MAP_SIZE) || !defined(IPCACHE_MAP_SIZE) || \
    !defined(ENDPOINTS_MAP_SIZE) || !defined(CT_MAP_SIZE) || !defined(FRAG_MAP_SIZE) || \
    !defined(METRICS_MAP_SIZE) || !defined(IF_BIND_MAP_SIZE) || !defined(EVENTS_PAGES) || \
    !defined(FRAG_LIFETIME_S) || !defined(CT_LIFETIME_TCP_S) || !defined(CT_LIFETIME_OTHER_S) || \
    !defined(CT_LIFETIME_CLOSE_S) || !defined(TRACING) || !defined(TRACE_MAP_SIZE) || !defined(TRACE_PAGES) || \
    !defined(LB_MAP_SIZE)
#error "datapath tunables come from dataplane/abi.py c_defines() as -D cflags"
#endif

/* Reserved identities (Cilium pkg/identity/numericidentity.go). */
#define IDENTITY_ANY   0
#define IDENTITY_HOST  1
#define IDENTITY_WORLD 2

/* Policy directions and per-entry verdicts: the numeric values of abi.Direction and
 * abi.Verdict (ordered by precedence so that combining entries is max()). */
#define DIR_INGRESS 0
#define DIR_EGRESS  1
#define POLICY_NONE     0
#define POLICY_ALLOW    1
#define POLICY_REDIRECT 2
#define POLICY_DENY     3

/* skb->mark layout (inside the node namespace only: marks are scrubbed when a packet crosses
 * a veth into another namespace, so a pod cannot forge them).
 *
 *   bits  8..11  (0x00000f00)  magic
 *       0x200  TO_PROXY    set by from_container with bpf_sk_assign; the node has
 *                          "ip rule fwmark 0x200/0xf00 lookup 2004" (local route). Bits 16..31
 *                          carry the proxy port, for debugging only.
 *       0xa00  FROM_PROXY  set by the proxy (SO_MARK) on upstream sockets; bits 16..31 carry
 *                          identity bits 0..15 and bits 0..7 carry identity bits 16..23
 *                          (Cilium's identity-in-mark encoding). to_container lets it pass.
 *       0xe00  DECIDED     set by from_container on every packet it forwards; to_container lets
 *                          it pass without a second policy check.
 */
#define MARK_MAGIC_MASK       0x00000f00
#define MARK_MAGIC_TO_PROXY   0x00000200
#define MARK_MAGIC_FROM_PROXY 0x00000a00
#define MARK_MAGIC_DECIDED    0x00000e00

/* Which hook produced an event. */
#define HOOK_FROM_CONTAINER 0
#define HOOK_TO_CONTAINER   1

/* endpoint_info.flags, from mapstate.EndpointState (abi.EP_F_*) */
#define EP_F_INGRESS_ENFORCED 0x01
#define EP_F_EGRESS_ENFORCED  0x02
#define EP_F_AUDIT            0x04

#endif
