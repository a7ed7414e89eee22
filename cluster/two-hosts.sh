#!/usr/bin/env bash
# Two Ray "hosts" on one Linux machine, to rehearse what a real cluster does to a run: two network
# namespaces joined by a veth pair, each with its own address and its own loopback, and a link
# that can be cut (host B vanishes: A's packets to it are dropped, as when a machine loses power).
# Needs root (ip netns). Never calls `ray stop`, which would stop every Ray on the machine: `down`
# kills exactly the processes inside the two namespaces.
#
#   cluster/two-hosts.sh up                     # namespaces, link, addresses ($NET.1 = A, $NET.2 = B)
#   cluster/two-hosts.sh ray [ray start opts]   # Ray head on A, a Ray node on B (the opts go to both)
#   cluster/two-hosts.sh exec a|b CMD...        # run CMD on host A or B (e.g. the driver, on A)
#   cluster/two-hosts.sh cut | heal             # host B's link down / up again
#   cluster/two-hosts.sh rejoin [ray start opts] # host B back as a new Ray node (link up, its old Ray gone)
#   cluster/two-hosts.sh down                   # every process in both namespaces killed, namespaces gone
#
# Environment: DM_HOSTS_PREFIX (default dmh: namespaces dmha, dmhb), DM_HOSTS_NET (default
# 10.213.7), DM_HOSTS_PORT (the head's GCS port, default 6390). The address of the head for
# RAY_ADDRESS is $DM_HOSTS_NET.1:$DM_HOSTS_PORT. RAY_AUTH_MODE and HOME pass through, so token
# authentication works as everywhere else (ray get-auth-token --generate first).
set -euo pipefail
PREFIX=${DM_HOSTS_PREFIX:-dmh}
NET=${DM_HOSTS_NET:-10.213.7}
PORT=${DM_HOSTS_PORT:-6390}
A=${PREFIX}a B=${PREFIX}b

usage() { sed -n '8,13p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
ns() { case "$1" in a | A) echo "$A" ;; b | B) echo "$B" ;; *) usage ;; esac; }

cmd=${1:-}
[ -n "$cmd" ] || usage
shift
case "$cmd" in
up)
    ip netns add "$A"
    ip netns add "$B"
    ip link add "${A}0" type veth peer name "${B}0"
    ip link set "${A}0" netns "$A"
    ip link set "${B}0" netns "$B"
    ip -n "$A" addr add "$NET.1/24" dev "${A}0"
    ip -n "$B" addr add "$NET.2/24" dev "${B}0"
    for n in "$A" "$B"; do ip -n "$n" link set lo up; ip -n "$n" link set "${n}0" up; done
    echo "host A: $NET.1 (netns $A), host B: $NET.2 (netns $B)"
    ;;
ray)
    ip netns exec "$A" ray start --head --node-ip-address="$NET.1" --port="$PORT" --disable-usage-stats "$@" >/dev/null
    ip netns exec "$B" ray start --address="$NET.1:$PORT" --node-ip-address="$NET.2" --disable-usage-stats "$@" >/dev/null
    echo "Ray head at $NET.1:$PORT (host A), a node at $NET.2 (host B): export RAY_ADDRESS=$NET.1:$PORT"
    ;;
exec)
    n=$(ns "${1:-}")
    shift
    exec ip netns exec "$n" "$@"
    ;;
cut) ip -n "$B" link set "${B}0" down ;;
heal) ip -n "$B" link set "${B}0" up ;;
rejoin)
    ip -n "$B" link set "${B}0" up
    ip netns pids "$B" | xargs -r kill -9 2>/dev/null || true
    sleep 0.5
    ip netns exec "$B" ray start --address="$NET.1:$PORT" --node-ip-address="$NET.2" --disable-usage-stats "$@" >/dev/null
    ;;
down)
    for n in "$A" "$B"; do
        [ -e "/var/run/netns/$n" ] || continue
        ip netns pids "$n" | xargs -r kill -9 2>/dev/null || true
    done
    sleep 0.5
    for n in "$A" "$B"; do [ -e "/var/run/netns/$n" ] && ip netns del "$n"; done
    # `ray start` leaves the head's address for later `ray.init()` calls to join: forget ours
    f=/tmp/ray/ray_current_cluster
    if [ -f "$f" ] && grep -q "^$NET.1:$PORT" "$f"; then rm -f "$f"; fi
    true
    ;;
*) usage ;;
esac
