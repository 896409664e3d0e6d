"""The kernel settings for many connections (the guide's 99-gpuproxy-100k.conf plus the file
and conntrack limits), and where each one takes effect: the node, or each pod's own network
namespace. The chart's node-tuning DaemonSet allows exactly these keys."""

from __future__ import annotations

GUIDE_SYSCTLS: dict[str, str] = {
    "net.core.somaxconn": "65535",
    "net.core.netdev_max_backlog": "65536",
    "net.ipv4.tcp_max_syn_backlog": "65536",
    "net.ipv4.ip_local_port_range": "1024 65535",
    "net.ipv4.tcp_fin_timeout": "15",
    "net.ipv4.tcp_tw_reuse": "1",
    "net.ipv4.tcp_max_tw_buckets": "2000000",
    "net.core.rmem_max": "10485760",
    "net.core.wmem_max": "10485760",
    "net.core.rmem_default": "10485760",
    "net.core.wmem_default": "10485760",
    "net.ipv4.tcp_rmem": "4096 87380 10485760",
    "net.ipv4.tcp_wmem": "4096 65536 10485760",
    "net.ipv4.tcp_mem": "786432 1048576 26777216",
    "net.ipv4.tcp_keepalive_time": "60",
    "net.ipv4.tcp_keepalive_probes": "3",
    "net.ipv4.tcp_keepalive_intvl": "10",
    "net.ipv4.tcp_slow_start_after_idle": "0",
    "net.ipv4.tcp_fastopen": "3",
    "net.core.default_qdisc": "fq",
    "net.ipv4.tcp_congestion_control": "bbr",
}

# Beyond the guide's file: 100k connections need the file-descriptor and conntrack limits.
EXTRA_SYSCTLS: dict[str, str] = {
    "fs.nr_open": "1048576",
    "fs.file-max": "4194304",
    "net.netfilter.nf_conntrack_max": "2097152",
}

NODE_TUNING_SYSCTLS: dict[str, str] = {**GUIDE_SYSCTLS, **EXTRA_SYSCTLS}
"""What the chart's node-tuning DaemonSet may set (its values.schema.json allowlist) and sets
by default."""

# Each network namespace has its own copy of these (net/ipv4/sysctl_net_ipv4.c
# ipv4_net_table, net/core/sysctl_net_core.c netns_core_table): a node DaemonSet with
# hostNetwork sets the host's copy only, which pods with their own network never see. A pod
# gets them through its securityContext.sysctls.
PER_NETNS_SYSCTLS = frozenset({
    "net.core.somaxconn",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.tcp_max_syn_backlog",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_tw_reuse",
    "net.ipv4.tcp_max_tw_buckets",
    "net.ipv4.tcp_rmem",
    "net.ipv4.tcp_wmem",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_keepalive_probes",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_slow_start_after_idle",
    "net.ipv4.tcp_fastopen",
    "net.ipv4.tcp_congestion_control",
})

# One value for the whole node, every pod included: only a node-level setting reaches them.
HOST_WIDE_SYSCTLS = frozenset(NODE_TUNING_SYSCTLS) - PER_NETNS_SYSCTLS

# The per-netns ones the kubelet allows in any pod ("safe" sysctls, Kubernetes 1.29+ list):
# the proxy pods set them on themselves. The other per-netns ones (somaxconn, the SYN backlog,
# tcp_rmem/wmem, ...) need the kubelet's --allowed-unsafe-sysctls on the proxy nodes.
SAFE_POD_SYSCTLS = (
    "net.ipv4.ip_local_port_range",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
)


def proxy_pod_sysctls() -> dict[str, str]:
    """The guide's values of the safe per-netns sysctls, for the proxy pods' own namespace."""
    return {key: GUIDE_SYSCTLS[key] for key in SAFE_POD_SYSCTLS}
