"""A small lab for the FQDN learner's tests: a cluster DNS pod, a client whose egress allows DNS
through the DNS proxy (every name) and port 80 to `api.example.com` only, and two world hosts."""

FQDN_LAB = """\
    name: learn
    namespaces: [{name: kube-system}, {name: shop}]
    pods:
      - {name: coredns, namespace: kube-system, labels: {k8s-app: kube-dns}, ports: [{port: 53, protocol: UDP}]}
      - {name: checkout, namespace: shop, labels: {app: checkout}, ports: [{port: 80}]}
    world:
      - {name: api, address: 203.0.113.20, dnsNames: [api.example.com], ports: [{port: 80}]}
      - {name: other, address: 198.51.100.30, dnsNames: [www.example.org], ports: [{port: 80}]}
    policies:
      - apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: fqdn, namespace: shop}
        spec:
          endpointSelector: {matchLabels: {app: checkout}}
          egress:
            - toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}}]
              toPorts: [{ports: [{port: "53", protocol: ANY}], rules: {dns: [{matchPattern: "*"}]}}]
            - toFQDNs: [{matchPattern: "*.example.com"}]
              toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"""
