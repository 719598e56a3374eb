#!/usr/bin/env bash
# The "ssh" of an emulated cluster (scripts/cluster/vnodes.sh installs it as DIR/agent):
#   DIR/agent [ssh-style options] HOST COMMAND...
# runs COMMAND on emulated node HOST (vnode<i>): inside that node's network namespace, in a fresh
# UTS namespace whose hostname is HOST and a mount namespace with DIR/hosts on /etc/hosts. As ssh
# does, the words of COMMAND are joined and run by sh -c. The caller's environment carries over.
# A node whose namespace is gone is an error naming the node (exit 255, as ssh's "no route").
set -uo pipefail
dir=$(cd "$(dirname "$0")" && pwd)
if [ ! -f "$dir/vnodes.env" ]; then
    echo "vnodes agent: $dir holds no running emulated cluster (stopped?)" >&2; exit 255
fi
# shellcheck disable=SC1091
. "$dir/vnodes.env"
# Skip ssh options that launchers add (-x, -q, -o OPT, -p PORT, ...): the host is the first word
# that is not an option.
while [ $# -gt 0 ]; do
    case $1 in
        -o|-p|-l|-i|-F|-E|-b|-c|-D|-e|-I|-J|-L|-m|-O|-Q|-R|-S|-W|-w) shift 2 ;;
        -*) shift ;;
        *) break ;;
    esac
done
host=${1:-}
shift || true
[ -n "$host" ] || { echo "vnodes agent: usage: agent HOST COMMAND..." >&2; exit 255; }
case $host in
    vnode[0-9]*) i=${host#vnode} ;;
    *) i=$(awk -v h="$host" '$2 == h {split($1, a, "."); print a[4] - 1}' "$dir/hosts") ;;
esac
if ! [[ ${i:-x} =~ ^[0-9]+$ ]] || [ "$i" -ge "$VN_K" ]; then
    echo "vnodes agent: unknown node '$host' (this cluster has vnode0..vnode$((VN_K - 1)))" >&2; exit 255
fi
ns="mpidl-vn$VN_ID-$i"
if [ ! -e "/run/netns/$ns" ]; then
    echo "vnodes agent: node vnode$i is gone (its network namespace $ns no longer exists)" >&2; exit 255
fi
[ $# -gt 0 ] || { echo "vnodes agent: no command for $host" >&2; exit 255; }
exec nsenter --net="/run/netns/$ns" -- unshare --uts --mount --propagation private -- \
    sh -c 'hostname "$1" && mount --bind "$2" /etc/hosts && shift 2 && exec sh -c "$*"' \
    vnodes-agent "vnode$i" "$dir/hosts" "$@"
