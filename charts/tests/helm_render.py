"""Renders charts/outpost with the real Helm library (helm-sdkpy): the manifests Helm installs.

helm-sdkpy exposes no `helm template` and no dry-run, only a real Install. So the install goes
to a stand-in Kubernetes API on loopback that answers discovery for the kinds the chart uses,
acknowledges every write (including Helm's release record) and records the objects Helm creates.
The rendered manifest is the release Install returns: templates, values, schema validation and
ordering are Helm's own; nothing is rendered here.
"""

import asyncio
import json
import os
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# group/version -> [(plural, kind, namespaced)]
RESOURCES = {
    "v1": [("secrets", "Secret", True), ("configmaps", "ConfigMap", True),
           ("services", "Service", True), ("serviceaccounts", "ServiceAccount", True),
           ("persistentvolumeclaims", "PersistentVolumeClaim", True),
           ("namespaces", "Namespace", False), ("pods", "Pod", True)],
    "apps/v1": [("deployments", "Deployment", True), ("daemonsets", "DaemonSet", True)],
    "batch/v1": [("jobs", "Job", True)],
    "policy/v1": [("poddisruptionbudgets", "PodDisruptionBudget", True)],
    "rbac.authorization.k8s.io/v1": [("roles", "Role", True), ("rolebindings", "RoleBinding", True),
                                     ("clusterroles", "ClusterRole", False),
                                     ("clusterrolebindings", "ClusterRoleBinding", False)],
    "admissionregistration.k8s.io/v1": [("mutatingwebhookconfigurations",
                                         "MutatingWebhookConfiguration", False)],
    "cert-manager.io/v1": [("issuers", "Issuer", True), ("certificates", "Certificate", True)],
    "monitoring.coreos.com/v1": [("servicemonitors", "ServiceMonitor", True),
                                 ("podmonitors", "PodMonitor", True)],
}


class _Api(BaseHTTPRequestHandler):
    created = None  # list, set per server
    existing = None  # API path -> object already in the cluster (what `lookup` finds)

    def log_message(self, *args):
        pass

    def _send(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _not_found(self):
        self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                         "reason": "NotFound", "code": 404, "message": "not found"})

    def do_GET(self):
        path = self.path.split("?")[0].rstrip("/")
        if path == "/version":
            return self._send(200, {"major": "1", "minor": "34", "gitVersion": "v1.34.0",
                                    "platform": "linux/amd64"})
        if path == "/api":
            return self._send(200, {"kind": "APIVersions", "versions": ["v1"],
                                    "serverAddressByClientCIDRs": []})
        if path == "/apis":
            groups = []
            for gv in RESOURCES:
                if "/" in gv:
                    g, v = gv.split("/")
                    ver = {"groupVersion": gv, "version": v}
                    groups.append({"name": g, "versions": [ver], "preferredVersion": ver})
            return self._send(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
        gv = path[len("/api/"):] if path.startswith("/api/") else path[len("/apis/"):]
        if gv in RESOURCES and path in ("/api/" + gv, "/apis/" + gv):
            return self._send(200, {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv,
                                    "resources": [{"name": p, "singularName": k.lower(), "kind": k,
                                                   "namespaced": ns,
                                                   "verbs": ["create", "get", "list", "patch",
                                                             "update", "delete", "watch"]}
                                                  for p, k, ns in RESOURCES[gv]]})
        if path in self.existing:
            return self._send(200, self.existing[path])
        # Any other object Helm looks up before creating it does not exist yet.
        return self._not_found()

    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.headers.get("Content-Type", "").startswith("application/vnd.kubernetes.protobuf"):
            # Helm's release record (a Secret, written by a typed client in protobuf): the
            # release comes back from Install itself, so only acknowledge it.
            return self._send(201, {"kind": "Secret", "apiVersion": "v1",
                                    "metadata": {"name": "release", "namespace": "default"}})
        body = json.loads(raw or b"{}")
        self.created.append(body)
        self._send(201, body)

    def do_PUT(self):
        self.do_POST()

    def do_PATCH(self):
        path = self.path.split("?")[0].rstrip("/")
        if path not in self.existing:
            return self.do_POST()
        # Helm adopting an object it owns already: a merge patch onto what is there.
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = _merge(json.loads(json.dumps(self.existing[path])), json.loads(raw or b"{}"))
        self.created.append(body)
        self._send(200, body)

    def do_DELETE(self):
        self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})


def _merge(into, patch):
    """JSON merge patch (RFC 7386)."""
    if not isinstance(patch, dict):
        return patch
    if not isinstance(into, dict):
        into = {}
    for k, v in patch.items():
        if v is None:
            into.pop(k, None)
        else:
            into[k] = _merge(into.get(k), v)
    return into


def render(chart, values=None, namespace="outpost", release="outpost", skip_schema=False,
           existing=None):
    """Installs `chart` with `values` into the stand-in API, where the objects of `existing`
    (API path -> object) are found. Returns (objects Helm created, the release Install
    returned: `manifest` is Helm's rendered YAML, `info.notes` the NOTES).
    skip_schema: as `helm install --skip-schema-validation` (what the templates refuse alone)."""
    import helm_sdkpy

    created = []
    handler = type("Api", (_Api,), {"created": created, "existing": existing or {}})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    kubeconfig = json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "render",
        "clusters": [{"name": "render", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}],
        "users": [{"name": "render", "user": {"token": "render"}}],
        "contexts": [{"name": "render", "context": {"cluster": "render", "user": "render",
                                                     "namespace": namespace}}],
    })
    kubeconfig_file = tempfile.NamedTemporaryFile("w", suffix=".kubeconfig", delete=False)
    try:
        with kubeconfig_file:
            kubeconfig_file.write(kubeconfig)
        config = helm_sdkpy.Configuration(namespace=namespace, kubeconfig=kubeconfig_file.name)
        result = asyncio.run(helm_sdkpy.Install(config).run(
            release, chart, values=values or None, wait=False, timeout=60,
            skip_schema_validation=skip_schema))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        os.unlink(kubeconfig_file.name)
    return created, result


def main():
    """python3 helm_render.py [VALUES_JSON] [NAMESPACE]: prints {objects, notes, manifest}."""
    import sys
    values = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    namespace = sys.argv[2] if len(sys.argv) > 2 else "outpost"
    chart = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "outpost")
    objects, release = render(chart, values, namespace=namespace)
    json.dump({"objects": objects, "notes": release["info"].get("notes", ""),
               "manifest": release["manifest"]}, sys.stdout)


if __name__ == "__main__":
    main()
