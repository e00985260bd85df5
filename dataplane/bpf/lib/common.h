/* common.h - constants shared by every part of the datapath.
 *
 * Tunables come from the loader as -D cflags (dataplane/datapath.py); the defaults here make
 * the sources compile on their own. Never patch these by string replacement.
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

#ifndef AUDIT_ALL            /* 1: every would-be drop passes and is reported as AUDIT */
#define AUDIT_ALL 0
#endif
#ifndef DEBUG                /* 1: bpf_trace_printk on drops (cat /sys/kernel/tracing/trace_pipe) */
#define DEBUG 0
#endif
#ifndef POLICY_MAP_SIZE
#define POLICY_MAP_SIZE 262144
#endif
#ifndef IPCACHE_MAP_SIZE
#define IPCACHE_MAP_SIZE 65536
#endif
#ifndef ENDPOINTS_MAP_SIZE
#define ENDPOINTS_MAP_SIZE 4096
#endif
#ifndef CT_MAP_SIZE
#define CT_MAP_SIZE 65536
#endif
#ifndef FRAG_MAP_SIZE        /* datagrams in flight whose later fragments are expected */
#define FRAG_MAP_SIZE 8192
#endif
#ifndef FRAG_LIFETIME_S      /* how long a first fragment vouches for its later ones (ipfrag_time) */
#define FRAG_LIFETIME_S 30
#endif
#ifndef EVENTS_PAGES         /* ring buffer size in pages (power of two) */
#define EVENTS_PAGES 64
#endif
#ifndef CT_LIFETIME_TCP_S    /* established TCP */
#define CT_LIFETIME_TCP_S 21600
#endif
#ifndef CT_LIFETIME_OTHER_S  /* UDP, ICMP, other protocols, and TCP before the handshake completes */
#define CT_LIFETIME_OTHER_S 60
#endif
#ifndef CT_LIFETIME_CLOSE_S  /* after FIN or RST */
#define CT_LIFETIME_CLOSE_S 10
#endif

/* Reserved identities (Cilium pkg/identity/numericidentity.go), as in dataplane/mapstate.py. */
#define IDENTITY_ANY   0
#define IDENTITY_HOST  1
#define IDENTITY_WORLD 2

/* Policy directions and per-entry verdicts: the numeric values of mapstate.Direction and
 * mapstate.Verdict (ordered by precedence so that combining entries is max()). */
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

/* endpoint_info.flags, from mapstate.EndpointState */
#define EP_F_INGRESS_ENFORCED 0x01
#define EP_F_EGRESS_ENFORCED  0x02
#define EP_F_AUDIT            0x04

#endif
