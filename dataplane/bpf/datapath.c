/* datapath.c - the one compilation unit of the l7lab datapath (BCC compiles it once per
 * process; dataplane/datapath.py loads both programs from it, sharing every map).
 *
 * Why the maps, their accessors and the program symbols live here and not in the headers:
 * BCC rewrites its map syntax (map.lookup(), map.ringbuf_output()) and registers program
 * functions only in the main file of a compile. The logic is in the included files; they
 * call the small accessors below, which are forward-declared in lib/maps.h.
 */
#include "lib/common.h"
#include "lib/drop.h"
#include "lib/maps.h"

BPF_LPM_TRIE(ipcache, struct ipcache_key, struct ipcache_value, IPCACHE_MAP_SIZE);
BPF_HASH(endpoints, __be32, struct endpoint_info, ENDPOINTS_MAP_SIZE);
BPF_LPM_TRIE(policy, struct policy_key, struct policy_value, POLICY_MAP_SIZE);
BPF_TABLE("lru_hash", struct ct_key, struct ct_entry, conntrack, CT_MAP_SIZE);
BPF_TABLE("lru_hash", struct frag_key, struct frag_entry, fragments, FRAG_MAP_SIZE);
BPF_PERCPU_HASH(metrics, struct metrics_key, struct metrics_value, METRICS_MAP_SIZE);
BPF_HASH(if_bind, u32, struct if_binding, IF_BIND_MAP_SIZE);
BPF_RINGBUF_OUTPUT(events, EVENTS_PAGES);
/* Per-flow tracing (lib/trace.h): the flows traced, how many there are (trace_switch[0], read
 * first: 0 means no packet looks further), and the steps of the traced packets. */
BPF_HASH(trace_flows, struct trace_key, struct trace_value, TRACE_MAP_SIZE);
BPF_ARRAY(trace_switch, u32, 1);
BPF_RINGBUF_OUTPUT(traces, TRACE_PAGES);
/* Services (lib/lb.h). */
BPF_HASH(lb_services, struct lb_service_key, struct lb_service, LB_MAP_SIZE);
BPF_HASH(lb_backends, u32, struct lb_backend, LB_MAP_SIZE);
BPF_HASH(lb_revnat, u32, struct lb_revnat, LB_MAP_SIZE);
BPF_TABLE("lru_hash", struct ct_key, struct lb_flow, lb_flows, CT_MAP_SIZE);

#include "lib/parse.h"
#include "lib/trace.h"
#include "lib/conntrack.h"
#include "lib/policy.h"
#include "lib/events.h"
#include "lib/proxy.h"
#include "lib/lb.h"
#include "lib/host.h"
#include "from_container.c"
#include "to_container.c"

static __always_inline struct ipcache_value *ipcache_lookup(struct ipcache_key *k) { return ipcache.lookup(k); }
static __always_inline struct endpoint_info *endpoints_lookup(__be32 *addr) { return endpoints.lookup(addr); }
static __always_inline struct policy_value *policy_lookup_raw(struct policy_key *k) { return policy.lookup(k); }
static __always_inline struct ct_entry *ct_lookup_raw(struct ct_key *k) { return conntrack.lookup(k); }
static __always_inline int ct_update_raw(struct ct_key *k, struct ct_entry *v) { return conntrack.update(k, v); }
static __always_inline int ct_delete_raw(struct ct_key *k) { return conntrack.delete(k); }
static __always_inline struct frag_entry *frag_lookup_raw(struct frag_key *k) { return fragments.lookup(k); }
static __always_inline int frag_update_raw(struct frag_key *k, struct frag_entry *v) { return fragments.update(k, v); }
static __always_inline struct metrics_value *metrics_lookup(struct metrics_key *k) { return metrics.lookup(k); }
static __always_inline int metrics_insert(struct metrics_key *k, struct metrics_value *v) { return metrics.insert(k, v); }
static __always_inline struct if_binding *if_bind_lookup(u32 *ifindex) { return if_bind.lookup(ifindex); }
static __always_inline int events_output(struct flow_event *e) { return events.ringbuf_output(e, sizeof(*e), 0); }
static __always_inline struct trace_value *trace_flows_lookup(struct trace_key *k) { return trace_flows.lookup(k); }
static __always_inline u32 *trace_switch_lookup(void) { u32 slot = 0; return trace_switch.lookup(&slot); }
static __always_inline int traces_output(struct trace_event *e) { return traces.ringbuf_output(e, sizeof(*e), 0); }
static __always_inline struct lb_service *lb_service_lookup(struct lb_service_key *k) { return lb_services.lookup(k); }
static __always_inline struct lb_backend *lb_backend_lookup(u32 *id) { return lb_backends.lookup(id); }
static __always_inline struct lb_revnat *lb_revnat_lookup(u32 *index) { return lb_revnat.lookup(index); }
static __always_inline struct lb_flow *lb_flow_lookup(struct ct_key *k) { return lb_flows.lookup(k); }
static __always_inline int lb_flow_update(struct ct_key *k, struct lb_flow *v) { return lb_flows.update(k, v); }
static __always_inline void trace_drop(u32 reason, u32 direction, u32 endpoint_id)
{
	bpf_trace_printk("l7lab drop reason=%d dir=%d ep=%d\n", reason, direction, endpoint_id);
}

int from_container(struct __sk_buff *skb) { return handle_from_container(skb); }
int to_container(struct __sk_buff *skb) { return handle_to_container(skb); }
