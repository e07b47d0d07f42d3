#!/usr/bin/env python3
"""Installs, upgrades and uninstalls charts/outpost in a real cluster through the real Helm
library (helm-sdkpy's Install / Upgrade / Uninstall), for the test suites.

Usage:
  helm_cluster.py install   --kubeconfig F --release R --namespace N [--create-namespace]
                            [--values FILE]... [--set k=v]... [--chart DIR] [--timeout S]
  helm_cluster.py upgrade   (same options)
  helm_cluster.py uninstall --kubeconfig F --release R --namespace N [--no-wait] [--timeout S]
  helm_cluster.py status    --kubeconfig F --release R --namespace N

Prints one JSON object on stdout: the release (`name`, `namespace`, `revision`, `status`,
`manifest`, `notes`) and `objects`, what the manifest holds as {apiVersion, kind, name,
namespace, annotations} (namespace None when the manifest gives none: Helm puts namespaced
objects in the release namespace). On a Helm error: exit 1, {"error": "..."} on stdout.
Values: files in order, then --set (dotted keys; true/false/null/integers typed as Helm's
--set does; `\\.` for a dot inside a key).
"""

import argparse
import asyncio
import json
import os
import re
import sys

sys.dont_write_bytecode = True
CHART = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "outpost")


def deep_merge(base, over):
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def typed(raw):
    """A --set value typed as Helm's strvals does for scalars."""
    if raw in ("true", "false"):
        return raw == "true"
    if raw == "null":
        return None
    if re.fullmatch(r"-?(0|[1-9][0-9]*)", raw):
        return int(raw)
    return raw


def set_path(values, assignment):
    if "=" not in assignment:
        raise ValueError(f"--set needs key=value: {assignment!r}")
    key, raw = assignment.split("=", 1)
    parts = [p.replace("\0", ".") for p in key.replace("\\.", "\0").split(".")]
    node = values
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = typed(raw)


def values_of(args):
    import yaml  # PyYAML, installed beside helm-sdkpy by tests/run.sh
    values = {}
    for path in args.values or []:
        with open(path) as f:
            values = deep_merge(values, yaml.safe_load(f) or {})
    for assignment in args.set or []:
        set_path(values, assignment)
    return values


def objects_of(manifest):
    import yaml
    out = []
    for doc in yaml.safe_load_all(manifest or ""):
        if not isinstance(doc, dict) or "kind" not in doc:
            continue
        meta = doc.get("metadata") or {}
        out.append({"apiVersion": doc.get("apiVersion"), "kind": doc["kind"],
                    "name": meta.get("name"), "namespace": meta.get("namespace"),
                    "annotations": meta.get("annotations") or {}})
    return out


def summary(release):
    info = release.get("info") or {}
    return {"name": release.get("name"), "namespace": release.get("namespace"),
            "revision": release.get("version"), "status": info.get("status"),
            "notes": info.get("notes", ""), "manifest": release.get("manifest", ""),
            "objects": objects_of(release.get("manifest", ""))}


async def run(args):
    import helm_sdkpy
    config = helm_sdkpy.Configuration(namespace=args.namespace, kubeconfig=args.kubeconfig)
    if args.command == "install":
        release = await helm_sdkpy.Install(config).run(
            args.release, args.chart, values=values_of(args) or None,
            create_namespace=args.create_namespace, wait=False, timeout=args.timeout)
        return summary(release)
    if args.command == "upgrade":
        release = await helm_sdkpy.Upgrade(config).run(
            args.release, args.chart, values=values_of(args) or None,
            create_namespace=args.create_namespace, wait=False, timeout=args.timeout)
        return summary(release)
    if args.command == "uninstall":
        result = await helm_sdkpy.Uninstall(config).run(
            args.release, wait=not args.no_wait, timeout=args.timeout)
        return {"uninstalled": args.release, "result": result}
    if args.command == "status":
        return summary(await helm_sdkpy.Status(config).run(args.release))
    raise ValueError(args.command)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["install", "upgrade", "uninstall", "status"])
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("--release", required=True)
    p.add_argument("--namespace", required=True)
    p.add_argument("--create-namespace", action="store_true")
    p.add_argument("--values", action="append")
    p.add_argument("--set", action="append")
    p.add_argument("--chart", default=CHART)
    p.add_argument("--timeout", type=int, default=120)
    p.add_argument("--no-wait", action="store_true")
    args = p.parse_args()
    try:
        import helm_sdkpy
    except ImportError:
        print(json.dumps({"error": "helm-sdkpy is not installed: "
                                   "pip install --ignore-requires-python helm-sdkpy==0.1.32"}))
        return 1
    try:
        out = asyncio.run(run(args))
    except (helm_sdkpy.HelmError, ValueError, OSError) as e:
        print(json.dumps({"error": str(e)}))
        return 1
    json.dump(out, sys.stdout, default=str)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
