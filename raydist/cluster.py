"""Connect to a Ray cluster, or start a local one with its dashboard; check that a run fits what the
cluster has or can grow to, and that its storage is one every node sees.

    connect(None)                                  # starts a local cluster, dashboard on 127.0.0.1

    python -m raydist.cluster status --address auto        # resources, what it can grow to, nodes starting,
                                                           # raydist jobs, Train runs, dashboard
    python -m raydist.cluster validate cluster.yaml ...    # Ray's own schema check, offline; every file
    python -m raydist.cluster publish ~/ray_bootstrap_config.yaml   # on the head, after `ray start --head`

Resource checks that can be made before Ray starts (a local cluster: this machine's CPUs and GPUs) are
made before it starts; against a running cluster they are made right after connecting, before any work.

What an autoscaling cluster can grow to: Ray 2.60's autoscalers keep their node types to themselves (the
GCS has a slot for them, `ClusterConfig`, that nothing in Ray fills), so a cluster that starts from zero
worker nodes looks like a CPU-less head. `publish` puts the node types into that slot, where Ray Train's
own pre-flight check reads them too; without it raydist falls back to ~/ray_bootstrap_config.yaml on the
driver's node (what `ray up` leaves on the head), then to a KubeRay pod's RayCluster, then, where an
autoscaler reports to the cluster, to an unknown limit (raydist.ray_edge.planning.capacity), and treats a
cluster without an autoscaler as fixed (what it has now).
"""

from __future__ import annotations

import os
from typing import Optional

from raydist.errors import ConfigError
from raydist.ray_edge.cluster_file import describe_schema_error, read_cluster_file, schema_error, validate_cluster_file
from raydist.ray_edge.planning import BOOTSTRAP_CONFIG, publish_cluster_config
from raydist.ray_edge.session import START_HEAD, check_reachable
from raydist.ray_edge.status import status

# ---- run metrics in the dashboard, and the studies a cluster is running ---------------------------------


# ---- what the cluster can grow to -------------------------------------------------------------------------


# ---- storage every node sees --------------------------------------------------------------------------------


# ---- token, dashboard, status: `python -m raydist.cluster status` ----------------------------------------


def build_parser():
    from raydist.cli import OneLineErrorParser

    parser = OneLineErrorParser(prog="raydist.cluster", description=(
        "Look at a Ray cluster (resources, what it can grow to, nodes starting, raydist jobs, Train runs, the\n"
        "studies running and their best trial so far), check cluster files offline, or tell a cluster what it\n"
        "can grow to.\n\nexample:\n  python -m raydist.cluster status --address auto"))
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("status", help="resources, raydist jobs, Train runs, running studies, dashboard URL")
    show.add_argument("--address", default="auto", help="cluster to look at ('auto' or host:port)")
    check = sub.add_parser("validate", help="check cluster-launcher YAML files offline with Ray's schema")
    check.add_argument("files", nargs="+", metavar="CLUSTER.yaml")
    publish = sub.add_parser("publish", help="tell the cluster what it can grow to: put an autoscaler config's "
                                             "node types into its GCS (run on the head after `ray start --head`)")
    publish.add_argument("file", nargs="?", default=BOOTSTRAP_CONFIG, metavar="CLUSTER.yaml",
                         help=f"the autoscaler's config (default: {BOOTSTRAP_CONFIG}, what `ray up` writes)")
    publish.add_argument("--address", default="auto", help="the cluster's GCS ('auto' or host:port)")
    return parser


def main(argv: Optional[list] = None) -> int:
    import sys

    args = build_parser().parse_args(argv)
    try:
        if args.command == "publish":
            path = os.path.expanduser(args.file)
            config = read_cluster_file(path)
            # Ray's schema, as the autoscaler checks the file (not prepare_config: on the head the file is
            # already prepared, and for some providers it reads files a pip install of Ray lacks)
            problem = schema_error(config)
            if problem is not None:
                raise ConfigError(f"{path}: {describe_schema_error(problem)}")
            if not config.get("available_node_types"):
                raise ConfigError(f"{path}: available_node_types missing; publish tells the cluster its node types")
            limit = publish_cluster_config(config, check_reachable(args.address, otherwise=START_HEAD))
            print(f"published {len(config['available_node_types'])} node types; the cluster can grow to "
                  + ", ".join(f"{k} {v:g}" for k, v in sorted(limit.items()) if k in ("CPU", "GPU")))
        elif args.command == "validate":  # every file checked, one line each
            bad = 0
            for path in args.files:
                try:
                    config = validate_cluster_file(path)
                except ConfigError as exc:
                    print(f"raydist.cluster: error: {exc}", file=sys.stderr)
                    bad += 1
                    continue
                print(f"{path}: valid ({config['provider']['type']} provider, node types: "
                      f"{', '.join(config['available_node_types'])})")
            return 2 if bad else 0
        else:
            print(status(args.address))
    except ConfigError as exc:
        print(f"raydist.cluster: error: {exc}", file=sys.stderr)
        return 2
    except ConnectionError as exc:
        print(f"raydist.cluster: error: no cluster at {args.address}: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
