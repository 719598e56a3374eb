#!/usr/bin/env bash
# mpiexec for an emulated cluster (scripts/cluster/vnodes.sh installs it as DIR/mpiexec):
#   DIR/mpiexec -n N [launcher options] COMMAND...
# starts N ranks over the cluster's K nodes in block placement (ceil(N/K) ranks per node, the
# last nodes may get fewer), with the launcher of the MPI that COMMAND's Python uses: hydra's
# mpiexec for MPICH, mpirun for Open MPI. The launcher runs on vnode0. Options other than -n go to
# the launcher unchanged. MPIDL_VNODES_MPI=mpich|openmpi overrides the detection; MPIDL_VNODES_DRY=1
# prints the command instead of running it.
set -uo pipefail
dir=$(cd "$(dirname "$0")" && pwd)
say() { echo "vnodes mpiexec: $*" >&2; }
if [ ! -f "$dir/vnodes.env" ]; then say "$dir holds no running emulated cluster (start it with vnodes.sh start K $dir)"; exit 2; fi
# shellcheck disable=SC1091
. "$dir/vnodes.env"

n="" opts=()
while [ $# -gt 0 ]; do
    case $1 in
        -n|-np|--n|--np) [ $# -ge 2 ] || { say "$1 needs a number"; exit 2; }; n=$2; shift 2 ;;
        -n=*|-np=*|--n=*|--np=*) n=${1#*=}; shift ;;
        --) shift; break ;;
        -*) opts+=("$1"); shift ;;
        *) break ;;
    esac
done
[ $# -gt 0 ] || { say "usage: $dir/mpiexec -n N [launcher options] COMMAND..."; exit 2; }
[[ ${n:-x} =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] || { say "-n N is required (N >= 1), got '${n}'"; exit 2; }

# Every node must still be there: a missing one is an error naming it, before anything starts.
for i in $(seq 0 $((VN_K - 1))); do
    if [ ! -e "/run/netns/mpidl-vn$VN_ID-$i" ]; then
        say "node vnode$i is gone (its network namespace mpidl-vn$VN_ID-$i no longer exists); restart the cluster: vnodes.sh stop $dir; vnodes.sh start $VN_K $dir"
        exit 2
    fi
done

# Block placement: ceil(n/K) per node, in order, until n ranks are placed.
per=$(( (n + VN_K - 1) / VN_K ))
hosts=() left=$n
for i in $(seq 0 $((VN_K - 1))); do
    [ "$left" -gt 0 ] || break
    c=$(( left < per ? left : per ))
    hosts+=("vnode$i:$c")
    left=$(( left - c ))
done
hostlist=$(IFS=,; echo "${hosts[*]}")

# The MPI in use: the one mpi4py of the command's Python was built against.
py=$1
case $(basename "$py") in python*) ;; *) py=$(command -v python3 || command -v python || echo python3) ;; esac
pydir=$(dirname "$(command -v "$py" 2>/dev/null || echo "$py")")
mpi=${MPIDL_VNODES_MPI:-}
if [ -z "$mpi" ]; then
    mpi=$("$py" -c 'import mpi4py; mpi4py.rc.initialize = False; from mpi4py import MPI; v = MPI.Get_library_version(); print("openmpi" if "Open MPI" in v else "mpich")' 2>/dev/null) \
        || { say "cannot tell which MPI '$py' uses (is mpi4py installed there?); set MPIDL_VNODES_MPI=mpich or openmpi"; exit 2; }
fi
# The links' rate, for the ranks' reports (mpidl compare writes it into report.md).
if [ "$VN_RATE" = unshaped ]; then
    export MPIDL_LINK_RATE="unshaped (emulated nodes, vnodes.sh: veth + bridge, no tc shaping)"
else
    export MPIDL_LINK_RATE="$VN_RATE (emulated nodes, vnodes.sh: tc tbf on each veth, no added latency)"
fi
case $mpi in
    mpich)
        launcher=${MPIDL_VNODES_LAUNCHER:-}
        if [ -z "$launcher" ]; then
            for cand in "$pydir/mpiexec.hydra" "$pydir/mpiexec" "$(command -v mpiexec.hydra || true)" "$(command -v mpiexec.mpich || true)"; do
                [ -n "$cand" ] && [ -x "$cand" ] && { launcher=$cand; break; }
            done
        fi
        [ -n "$launcher" ] || { say "no MPICH mpiexec (hydra) found next to $py or on PATH"; exit 2; }
        export UCX_TLS=${UCX_TLS:-tcp,self}
        cmd=("$launcher" -launcher ssh -launcher-exec "$dir/agent" -hosts "$hostlist" -iface eth0
             -n "$n" "${opts[@]}" "$@") ;;
    openmpi)
        launcher=${MPIDL_VNODES_LAUNCHER:-$(command -v mpirun.openmpi || command -v mpiexec.openmpi || true)}
        [ -n "$launcher" ] || { say "no Open MPI mpirun (mpirun.openmpi) found"; exit 2; }
        if [ "$(id -u)" = 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
        export OMPI_MCA_btl_vader_single_copy_mechanism=${OMPI_MCA_btl_vader_single_copy_mechanism:-none}
        # One-sided (LSGD/EASGD windows) between nodes over TCP: Open MPI 4.1's rdma component needs
        # an RDMA network and fails with MPI_ERR_WIN; pt2pt works but refuses MPI_THREAD_MULTIPLE,
        # which mpi4py asks for by default (docs/clusters.md, "Open MPI over TCP").
        export OMPI_MCA_osc=${OMPI_MCA_osc:-sm,pt2pt} MPI4PY_RC_THREAD_LEVEL=${MPI4PY_RC_THREAD_LEVEL:-serialized}
        cmd=("$launcher" --host "$hostlist" --mca plm_rsh_agent "$dir/agent" --mca pml ob1
             --mca btl self,vader,tcp --mca btl_tcp_if_include "$VN_SUBNET" --mca oob_tcp_if_include "$VN_SUBNET"
             --bind-to none --oversubscribe -x MPIDL_LINK_RATE -n "$n" "${opts[@]}" "$@") ;;
    *) say "MPIDL_VNODES_MPI must be mpich or openmpi, got '$mpi'"; exit 2 ;;
esac
if [ "${MPIDL_VNODES_DRY:-0}" = 1 ]; then echo "${cmd[*]}"; exit 0; fi
# Run the launcher on vnode0. The agent joins words like ssh, so quote each one.
exec "$dir/agent" vnode0 "cd $(printf '%q' "$PWD") && exec $(printf '%q ' "${cmd[@]}")"
