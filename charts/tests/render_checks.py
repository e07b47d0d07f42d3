#!/usr/bin/env python3
"""Renders charts/outpost with the real Helm library (helm_render.py) for each scenario and
checks that the objects are what the chart promises: the registry's strategy, Service and PVC,
where the connection string goes (a Secret file only), the node agent's reach, the webhook's
admission settings, TLS wiring per scenario, security contexts, probes and resources.

Prints one line per scenario and `render checks: N passed, N failed`; exits 1 on a failure.
Usage: python3 charts/tests/render_checks.py
"""

import base64
import json
import os
import sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import helm_render  # noqa: E402

CHART = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "outpost")
NS = "edge"
CONN = ("ConnectedRegistryName=edge;SyncTokenName=edge-sync;SyncTokenPassword=s3cr3t-p4ss;"
        "ParentGatewayEndpoint=myacr.westeurope.data.azurecr.io;ParentEndpointProtocol=https")
RULES = [{"upstream": "myacr.azurecr.io", "repositories": ["hello-world"]}]
AWS_CREDENTIALS = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"]
AZURE_CREDENTIALS = ["AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_SAS_KEY", "AZURE_STORAGE_CLIENT_SECRET"]
CREDENTIALS = AWS_CREDENTIALS + AZURE_CREDENTIALS


class Objects:
    def __init__(self, objs, notes, hooks=()):
        import yaml  # PyYAML, installed beside helm-sdkpy
        self.all, self.notes = objs, notes
        # Hook objects are not installed: Helm keeps them for their event (pre-delete).
        self.hooks = [yaml.safe_load(h["manifest"]) for h in hooks]

    def hook(self, kind):
        found = [h for h in self.hooks if h["kind"] == kind]
        assert len(found) == 1, f"expected one {kind} hook, got {[h['metadata']['name'] for h in found]}"
        return found[0]

    def of(self, kind):
        return [o for o in self.all if o.get("kind") == kind]

    def one(self, kind, suffix):
        found = [o for o in self.of(kind) if o["metadata"]["name"].endswith(suffix)]
        assert len(found) == 1, f"expected one {kind} *{suffix}, got {[o['metadata']['name'] for o in found]}"
        return found[0]

    def workloads(self):
        return self.of("Deployment") + self.of("DaemonSet")


def containers(workload):
    return workload["spec"]["template"]["spec"]["containers"]


def check_common(o):
    """Every scenario: probes, resources, security contexts, no wildcard RBAC."""
    for w in o.workloads():
        name = w["metadata"]["name"]
        pod = w["spec"]["template"]["spec"]
        assert pod.get("securityContext", {}).get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        for c in containers(w):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), name
            assert not sc.get("privileged"), name
            assert c["livenessProbe"]["httpGet"]["path"] == "/healthz", name
            assert c["readinessProbe"]["httpGet"]["path"] == "/readyz", name
            assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"], name
            # The connection string never reaches an environment variable.
            for env in c.get("env", []):
                assert "connection" not in env["name"].lower() or "valueFrom" not in env, name
        if w["kind"] == "Deployment":
            run_as = pod["securityContext"]
            assert run_as["runAsNonRoot"] is True and run_as["runAsUser"] == 65532, name
    for role in o.of("ClusterRole") + o.of("Role"):
        for rule in role["rules"]:
            for field in ("verbs", "resources", "apiGroups"):
                assert "*" not in rule.get(field, []), f"{role['metadata']['name']}: wildcard {field}"
    dump = json.dumps([x for x in o.all if x["kind"] != "Secret"])
    assert "SyncTokenPassword" not in dump, "the connection string outside a Secret"
    # Nothing of the connection string's secret part reaches the mirror configs.
    for cm in o.of("ConfigMap"):
        text = json.dumps(cm["data"])
        for secret in ("s3cr3t-p4ss", "edge-sync", "SyncToken"):
            assert secret not in text, f"{cm['metadata']['name']} holds {secret}"
    # Object-store credentials only by reference to a Secret, never as a value.
    for w in o.workloads():
        for c in containers(w):
            for env in c.get("env", []):
                if env["name"] in CREDENTIALS:
                    assert "value" not in env and env["valueFrom"]["secretKeyRef"]["name"], env
    check_uninstall_hook(o)


def check_uninstall_hook(o):
    """The pre-delete Job and its own RBAC, all hooks removed once it succeeded."""
    for h in o.hooks:
        a = h["metadata"]["annotations"]
        assert a["helm.sh/hook"] == "pre-delete", h["metadata"]["name"]
        assert a["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded", a
        assert "helm.sh/hook-weight" in a, a
    job = o.hook("Job")
    assert int(job["metadata"]["annotations"]["helm.sh/hook-weight"]) > max(
        int(h["metadata"]["annotations"]["helm.sh/hook-weight"]) for h in o.hooks if h["kind"] != "Job")
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == o.hook("ServiceAccount")["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 65532
    c = pod["containers"][0]
    assert c["args"][0] == "uninstall", c["args"]
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"]["drop"] == ["ALL"], sc
    for role in (o.hook("ClusterRole"), o.hook("Role")):
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
            if "delete" in rule["verbs"] or "secrets" in rule["resources"]:
                assert rule.get("resourceNames"), f"Secrets and deletes only by name: {rule}"
    return c["args"]


def mirror_configs(o):
    """The webhook's and the node agent's config.toml, those rendered."""
    return [cm["data"]["config.toml"] for cm in o.of("ConfigMap")
            if cm["metadata"]["name"].endswith(("-webhook", "-node-agent"))]


def rules(config):
    """[[rule]] tables of a config.toml as dicts (the chart writes one key per line)."""
    out = []
    for block in config.split("[[rule]]")[1:]:
        rule = {}
        for line in block.strip().splitlines():
            key, _, value = line.partition(" = ")
            rule[key.strip()] = json.loads(value)
        out.append(rule)
    return out


def agent_env(o):
    ds = o.one("DaemonSet", "-node-agent")
    return {e["name"]: e.get("value") for e in containers(ds)[0]["env"]}


def registry_args(o):
    return containers(o.one("Deployment", "-registry"))[0]["args"]


def check_single_registry(o):
    """One registry pod (the default): no PodDisruptionBudget of its own (it would block every
    node drain), no spread; not ready and serving for the shutdown delay, within the grace."""
    reg = o.one("Deployment", "-registry")
    assert reg["spec"]["replicas"] == 1, reg["spec"]
    assert not [p for p in o.of("PodDisruptionBudget") if p["metadata"]["name"].endswith("-registry")]
    pod = reg["spec"]["template"]["spec"]
    assert "topologySpreadConstraints" not in pod, pod
    # On a PVC there is one process (the store's lock); on object storage a rolling update
    # overlaps two pods, so even one replica elects (a Kubernetes Lease by default).
    object_storage = any(a.startswith(("--storage=s3://", "--storage=azblob://"))
                         for a in containers(reg)[0]["args"])
    check_election(o, "kubernetes" if object_storage else None)
    check_shutdown(reg, 5)


LEASE = "outpost-registry-leader"


def check_election(o, election):
    """The leader election as rendered: none on a PVC (no flags, no token, no RBAC); `store`
    (a lease in the bucket: no token, no RBAC); `kubernetes` (the Lease named after the
    release in its namespace, the pod's token mounted, and RBAC for that Lease only: create,
    which RBAC cannot narrow by name, and get/update on the name). The pod's name names the
    leader on object storage."""
    reg = o.one("Deployment", "-registry")
    pod = reg["spec"]["template"]["spec"]
    args = [a for a in containers(reg)[0]["args"] if a.startswith("--leader")]
    rbac = [r for r in o.of("Role") + o.of("RoleBinding") if r["metadata"]["name"] == LEASE]
    assert o.one("ServiceAccount", "-registry")["automountServiceAccountToken"] is False
    env = {e["name"]: e for e in containers(reg)[0]["env"]}
    # The uninstall hook removes the Lease the registry made, after the registry.
    hook_args = o.hook("Job")["spec"]["template"]["spec"]["containers"][0]["args"]
    hook_leases = [r for r in o.hook("Role")["rules"] if "leases" in r["resources"]]
    if election != "kubernetes":
        assert not [a for a in hook_args if a.startswith("--lease") or a.endswith("-registry")], hook_args
        assert not hook_leases, hook_leases
    else:
        registry_step = hook_args.index("--deployment=outpost-registry")
        assert hook_args.index(f"--lease={LEASE}") > registry_step, hook_args
        assert hook_leases == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                                "resourceNames": [LEASE], "verbs": ["delete"]}], hook_leases
        deployments = [r for r in o.hook("Role")["rules"] if "deployments" in r["resources"]]
        assert "outpost-registry" in deployments[0]["resourceNames"], deployments
    if election is None:
        assert args == [] and not rbac and "POD_NAME" not in env, (args, rbac)
        assert pod["automountServiceAccountToken"] is False, pod
        return
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}, env
    if election == "store":
        assert args == ["--leader-election=store"], args
        assert not rbac and pod["automountServiceAccountToken"] is False, (rbac, pod)
        return
    assert args == ["--leader-election=kubernetes", f"--leader-lease={LEASE}",
                    f"--leader-lease-namespace={NS}"], args
    assert pod["automountServiceAccountToken"] is True, pod
    role = o.one("Role", "-registry-leader")
    assert role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": [LEASE],
         "verbs": ["get", "update"]}], role["rules"]
    binding = o.one("RoleBinding", "-registry-leader")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": LEASE}, binding
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"],
                                    "namespace": NS}], binding


def check_shutdown(reg, delay):
    """--shutdown-delay as the values say, and a grace period that covers it and the drain."""
    assert f"--shutdown-delay={delay}s" in containers(reg)[0]["args"], containers(reg)[0]["args"]
    assert reg["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= delay + 30 + 5, reg["spec"]


def check_default(o):
    reg = o.one("Deployment", "-registry")
    assert not any(a.startswith("--platform") for a in registry_args(o)), "default: all platforms"
    assert reg["spec"]["replicas"] == 1 and reg["spec"]["strategy"]["type"] == "Recreate"
    check_single_registry(o)
    args = registry_args(o)
    assert "--connection-string-file=/etc/outpost/connection/connection-string" in args, args
    assert not any(a.startswith("--connection-string=") for a in args), args
    assert "--tls-cert=/etc/outpost/tls/tls.crt" in args and "--http" not in args, args
    assert "--tokens=/etc/outpost/tokens/tokens.toml" in args, args
    assert any(a == "--admin-listen=127.0.0.1:5050" for a in args), "admin API loopback only"
    secret = o.one("Secret", "-connection")
    assert secret["stringData"]["connection-string"] == CONN
    vols = {v["name"]: v for v in reg["spec"]["template"]["spec"]["volumes"]}
    assert vols["connection"]["secret"]["secretName"] == secret["metadata"]["name"]
    assert vols["tokens"]["secret"]["secretName"] == "outpost-tokens"
    check_signing_key(o, "outpost-token-signing-key", "signing-keys")
    check_namespace_credentials(o, "outpost-token-signing-key", "signing-keys", "8h", "**")
    keys = o.one("Secret", "-token-signing-key")
    line = base64.b64decode(keys["data"]["signing-keys"]).decode()
    assert line.endswith("\n") and len(base64.b64decode(line.strip())) == 32, "one 32-byte key"
    svc = o.one("Service", "-registry")
    assert svc["spec"]["clusterIP"] == "10.96.100.100"
    pvc = o.one("PersistentVolumeClaim", "-data")
    assert pvc["spec"]["resources"]["requests"]["storage"] == "500Gi"
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"

    ds = o.one("DaemonSet", "-node-agent")
    pod = ds["spec"]["template"]["spec"]
    assert {"operator": "Exists"} in pod["tolerations"], "tolerates every taint"
    agent = containers(ds)[0]
    assert "--cleanup-on-exit" in agent["args"], agent["args"]
    assert "cleanup" in agent["lifecycle"]["preStop"]["exec"]["command"]
    host_paths = [v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v]
    assert host_paths == ["/etc/containerd"], host_paths
    agent_rules = o.one("ClusterRole", "-node-agent")["rules"]
    assert {r for rule in agent_rules for r in rule["resources"]} == {"nodes", "events"}, agent_rules
    assert all(set(rule["verbs"]) <= {"get", "patch", "create"} for rule in agent_rules), agent_rules
    config = o.one("ConfigMap", "-node-agent")["data"]["config.toml"]
    assert 'registry = "10.96.100.100"' in config and 'upstream = "myacr.azurecr.io"' in config, config

    wh = o.one("Deployment", "-webhook")
    assert wh["spec"]["replicas"] == 2
    assert o.one("PodDisruptionBudget", "-webhook")["spec"]["minAvailable"] == 1
    mwc = o.one("MutatingWebhookConfiguration", "-webhook")
    hook = mwc["webhooks"][0]
    assert hook["failurePolicy"] == "Ignore" and hook["sideEffects"] == "None", hook
    assert hook["reinvocationPolicy"] == "IfNeeded" and hook["timeoutSeconds"] == 2, hook
    exprs = hook["namespaceSelector"]["matchExpressions"]
    assert {"key": "outpost.io/inject", "operator": "In", "values": ["enabled"]} in exprs, exprs
    assert {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": [NS]} in exprs, exprs
    assert mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"].startswith(f"{NS}/")
    assert "caBundle" not in hook["clientConfig"], "cert-manager injects the CA bundle"
    webhook_rules = o.one("ClusterRole", "-webhook")["rules"]
    unnamed_secret_verbs = {v for r in webhook_rules if "secrets" in r["resources"]
                            and not r.get("resourceNames") for v in r["verbs"]}
    # An unnamed list or watch of Secrets would read every Secret in the cluster.
    assert unnamed_secret_verbs == {"create"}, webhook_rules

    cert = o.one("Certificate", "-registry")
    assert cert["spec"]["ipAddresses"] == ["127.0.0.1", "10.96.100.100"], cert["spec"]
    env = {e["name"]: e["value"] for e in containers(reg)[0]["env"]}
    assert env["OUTPOST_ADMIN"] == "https://127.0.0.1:5050", env
    assert env["OUTPOST_ADMIN_CA_FILE"] == "/etc/outpost/tls/ca.crt", env
    assert o.one("Certificate", "-webhook")
    assert o.of("Issuer")
    assert "--stage=hello-world:latest" in registry_args(o)
    # A large integer stays an integer (Helm parses values as float64).
    assert "--sync-bandwidth-limit=12500000" in registry_args(o), registry_args(o)
    assert "--pull-through=false" in registry_args(o), registry_args(o)
    assert o.of("ServiceMonitor") and o.of("PodMonitor")
    check_webhook_metrics(o)


def check_webhook_metrics(o):
    """The webhook's plain-HTTP --metrics-listen: a container port and a Service port named
    metrics, scraped by its ServiceMonitor without TLS settings; the shutdown delay."""
    wh = o.one("Deployment", "-webhook")
    c = containers(wh)[0]
    assert "--metrics-listen=0.0.0.0:9103" in c["args"], c["args"]
    assert {"name": "metrics", "containerPort": 9103, "protocol": "TCP"} in c["ports"], c["ports"]
    svc = o.one("Service", "-webhook")
    assert {"name": "metrics", "port": 9103, "targetPort": "metrics", "protocol": "TCP"} in svc["spec"]["ports"], svc
    sm = o.one("ServiceMonitor", "-webhook")
    assert sm["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}], sm["spec"]
    check_shutdown(wh, 5)


MANAGED = ["outpost-ca", "outpost-registry-tls", "outpost-webhook-tls"]


def check_managed(o):
    """No cert-manager, no given Secret: the webhook manages the certificates through the API."""
    assert not o.of("Certificate") and not o.of("Issuer"), "no cert-manager objects"
    wh = o.one("Deployment", "-webhook")
    check_shutdown(wh, 12)
    pod = wh["spec"]["template"]["spec"]
    mounted = [v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v]
    assert not set(mounted) & set(MANAGED), f"a pod must not wait for the Secrets it makes: {mounted}"
    args = containers(wh)[0]["args"]
    for a in ["--manage-certs", "--ca-secret=outpost-ca", "--webhook-tls-secret=outpost-webhook-tls",
              f"--webhook-dns-name=outpost-webhook.{NS}.svc",
              f"--webhook-dns-name=outpost-webhook.{NS}.svc.cluster.local",
              "--webhook-configuration=outpost-webhook", "--registry-tls-secret=outpost-registry-tls",
              "--registry-dns-name=outpost-registry", f"--registry-dns-name=outpost-registry.{NS}.svc",
              "--registry-dns-name=localhost", "--registry-ip=127.0.0.1", "--registry-ip=10.96.100.100"]:
        assert a in args, (a, args)
    assert not any(a.startswith(("--tls-cert", "--tls-key", "--registry-ca-file")) for a in args), args
    mwc = o.one("MutatingWebhookConfiguration", "-webhook")
    for hook in mwc["webhooks"]:
        assert "caBundle" not in hook["clientConfig"], "the webhook sets caBundle; an upgrade must not reset it"
    assert "cert-manager.io/inject-ca-from" not in (mwc["metadata"].get("annotations") or {})
    # The registry and the node agent mount the managed registry Secret as before.
    reg = o.one("Deployment", "-registry")
    vols = {v["name"]: v for v in reg["spec"]["template"]["spec"]["volumes"]}
    assert vols["tls"]["secret"]["secretName"] == "outpost-registry-tls"
    ds = o.one("DaemonSet", "-node-agent")
    vols = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    assert vols["ca"]["secret"]["secretName"] == "outpost-registry-tls"
    # Least privilege: create (unnameable) and the rest only on the three Secrets; the
    # webhook configuration by name.
    role = o.one("Role", "-certs")
    named = [r for r in role["rules"] if r.get("resourceNames")]
    unnamed = [r for r in role["rules"] if not r.get("resourceNames")]
    assert [set(r["verbs"]) for r in unnamed] == [{"create"}], role["rules"]
    assert len(named) == 1 and sorted(named[0]["resourceNames"]) == MANAGED, named
    assert set(named[0]["verbs"]) == {"get", "list", "watch", "update", "patch"}, named
    binding = o.one("RoleBinding", "-certs")
    assert binding["subjects"][0]["name"] == "outpost-webhook", binding
    ca_role = o.one("ClusterRole", "-webhook-ca-bundle")["rules"]
    assert ca_role == [{"apiGroups": ["admissionregistration.k8s.io"],
                        "resources": ["mutatingwebhookconfigurations"],
                        "resourceNames": ["outpost-webhook"],
                        "verbs": ["get", "list", "watch", "update", "patch"]}], ca_role
    assert not [d for d in o.of("Deployment") if d["metadata"]["name"].endswith("-certs")]
    # Uninstall removes the managed Secrets too, and may delete only those and the copies.
    args = check_uninstall_hook(o)
    for name in MANAGED:
        assert f"--certificate-secret={name}" in args, args
    assert "--deployment=outpost-webhook" in args and "--node-agent-daemonset=outpost-node-agent" in args
    deletable = [n for r in o.hook("ClusterRole")["rules"] if "secrets" in r["resources"]
                 for n in r.get("resourceNames", [])]
    assert sorted(deletable) == sorted(["outpost-pull", "outpost-node-pull"] + MANAGED), deletable


def check_own_tls(o):
    assert not o.of("Certificate") and not o.of("Issuer"), "no cert-manager objects"
    reg = o.one("Deployment", "-registry")
    vols = {v["name"]: v for v in reg["spec"]["template"]["spec"]["volumes"]}
    assert vols["tls"]["secret"]["secretName"] == "outpost-tls"
    assert vols["connection"]["secret"]["secretName"] == "outpost-conn"
    # existingSecret: the chart's only Secret is the signing key (there is no one to give it).
    assert [x["metadata"]["name"] for x in o.of("Secret")] == ["outpost-token-signing-key"], o.of("Secret")
    mwc = o.one("MutatingWebhookConfiguration", "-webhook")
    assert mwc["webhooks"][0]["clientConfig"]["caBundle"] == "Q0EgYnVuZGxl"
    assert "cert-manager.io/inject-ca-from" not in (mwc["metadata"].get("annotations") or {})
    wh = o.one("Deployment", "-webhook")
    vols = {v["name"]: v for v in wh["spec"]["template"]["spec"]["volumes"]}
    assert vols["tls"]["secret"]["secretName"] == "outpost-webhook-tls"
    assert not any(a.startswith("--manage-certs") for a in containers(wh)[0]["args"])
    assert not o.of("Role"), "nothing managed: no certificate Role"
    assert not any(a.startswith("--certificate-secret") for a in check_uninstall_hook(o))


def check_mixed(o):
    """The registry's certificate given, the webhook's managed: each wired its own way."""
    args = containers(o.one("Deployment", "-webhook"))[0]["args"]
    assert "--webhook-tls-secret=outpost-webhook-tls" in args, args
    assert "--registry-ca-file=/etc/outpost-webhook/registry-ca/ca.crt" in args, args
    assert not any(a.startswith(("--registry-tls-secret", "--tls-cert")) for a in args), args
    vols = {v["name"]: v for v in o.one("Deployment", "-webhook")["spec"]["template"]["spec"]["volumes"]}
    assert vols["registry-ca"]["secret"]["secretName"] == "outpost-tls" and "tls" not in vols, vols
    role = o.one("Role", "-certs")
    assert sorted(r for rule in role["rules"] for r in rule.get("resourceNames", [])) == \
        ["outpost-ca", "outpost-webhook-tls"], role
    reg = o.one("Deployment", "-registry")
    vols = {v["name"]: v for v in reg["spec"]["template"]["spec"]["volumes"]}
    assert vols["tls"]["secret"]["secretName"] == "outpost-tls"


def check_http(o):
    args = registry_args(o)
    assert "--http" in args and not any(a.startswith("--tls-") for a in args), args
    assert not o.of("DaemonSet")
    assert "PLAIN HTTP" in o.notes, o.notes
    reg = o.one("Deployment", "-registry")
    assert containers(reg)[0]["readinessProbe"]["httpGet"]["scheme"] == "HTTP"
    # Plain HTTP for the registry only: the webhook's HTTPS (the API server insists) is managed.
    wh_args = containers(o.one("Deployment", "-webhook"))[0]["args"]
    assert "--webhook-tls-secret=outpost-webhook-tls" in wh_args and "--registry-plain-http" in wh_args
    assert not any(a.startswith("--registry-tls-secret") for a in wh_args), wh_args
    role = o.one("Role", "-certs")
    assert sorted(r for rule in role["rules"] for r in rule.get("resourceNames", [])) == \
        ["outpost-ca", "outpost-webhook-tls"], role


def check_trust_off(o):
    assert not o.of("DaemonSet") and not [r for r in o.of("ClusterRole") if "node-agent" in r["metadata"]["name"]]
    assert o.one("MutatingWebhookConfiguration", "-webhook")


def check_webhook_off(o):
    assert not o.of("MutatingWebhookConfiguration")
    assert not [d for d in o.of("Deployment") if d["metadata"]["name"].endswith("-webhook")]
    assert not o.of("PodDisruptionBudget")
    assert o.one("DaemonSet", "-node-agent")
    # The registry's certificate is still managed: by the small certs Deployment.
    certs = o.one("Deployment", "-certs")
    args = containers(certs)[0]["args"]
    assert args[0] == "certs" and "--registry-tls-secret=outpost-registry-tls" in args, args
    assert not any(a.startswith("--webhook") for a in args), args
    assert certs["spec"]["replicas"] == 1
    assert not certs["spec"]["template"]["spec"].get("volumes"), "no Secret volumes"
    role = o.one("Role", "-certs")
    assert sorted(r for rule in role["rules"] for r in rule.get("resourceNames", [])) == \
        ["outpost-ca", "outpost-registry-tls"], role
    assert o.one("RoleBinding", "-certs")["subjects"][0]["name"] == "outpost-certs"
    assert not [r for r in o.of("ClusterRole") if r["metadata"]["name"].endswith("-ca-bundle")]
    args = check_uninstall_hook(o)
    assert "--deployment=outpost-certs" in args, args


def check_parent_rules(o):
    """No webhook.rules: the parent's login server and gateway host, for the synced repositories."""
    configs = mirror_configs(o)
    assert len(configs) == 2, configs
    for c in configs:
        assert rules(c) == [
            {"upstream": "myacr.azurecr.io", "repositories": ["hello-world", "team-a/**"]},
            {"upstream": "myacr.westeurope.data.azurecr.io", "repositories": ["hello-world", "team-a/**"]},
        ], c
    assert "images of the parent, myacr.azurecr.io and myacr.westeurope.data.azurecr.io" in o.notes


def check_parent_over_http(o):
    for c in mirror_configs(o):
        assert rules(c) == [{"upstream": "10.1.2.3:8080", "plain_http": True}], c


def check_rules_carry_plain_http_and_ca(o):
    for c in mirror_configs(o):
        assert rules(c) == [{"upstream": "parent.lab:8080", "plain_http": True},
                            {"upstream": "ghcr.io", "ca_file": "/etc/ssl/ghcr.pem"}], c


def check_existing_secret_parent(o):
    assert [x["metadata"]["name"] for x in o.of("Secret")] == ["outpost-token-signing-key"], o.of("Secret")
    for c in mirror_configs(o):
        assert rules(c) == [{"upstream": "myacr.azurecr.io"},
                            {"upstream": "myacr.westeurope.data.azurecr.io"}], c


def check_existing_secret_alone(o):
    for c in mirror_configs(o):
        assert not rules(c), c
    assert "cannot read existingSecret" in o.notes and "parent.gatewayEndpoint" in o.notes, o.notes


def check_http_lab(o):
    """httpsEnabled=false with the node agent: a plain-HTTP mirror, no CA anywhere."""
    ds = o.one("DaemonSet", "-node-agent")
    args = containers(ds)[0]["args"]
    assert not any(a.startswith("--ca-file") for a in args), args
    assert not [v for v in ds["spec"]["template"]["spec"]["volumes"] if v["name"] == "ca"]
    for c in mirror_configs(o):
        assert "registry_plain_http = true" in c, c
        assert rules(c) == [{"upstream": "myacr.azurecr.io", "plain_http": True},
                            {"upstream": "myacr.westeurope.data.azurecr.io", "plain_http": True}], c
    assert "plain HTTP (registry_plain_http)" in o.notes, o.notes


def check_layout(runtime, mount, env):
    def check(o):
        ds = o.one("DaemonSet", "-node-agent")
        pod = ds["spec"]["template"]["spec"]
        host_paths = [v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v]
        assert host_paths == [mount], host_paths
        c = containers(ds)[0]
        assert {"name": "runtime-config", "mountPath": "/host" + mount} in c["volumeMounts"]
        assert f"--runtime={runtime}" in c["args"], c["args"]
        pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[1:] == ["cleanup", "--root=/host", f"--runtime={runtime}"], pre_stop
        got = agent_env(o)
        assert "OUTPOST_NODE_NAME" in got, got
        got.pop("OUTPOST_NODE_NAME")
        assert got == env, got
    return check


def check_signing_key(o, secret, key):
    """Bearer token signing keys: `key` of Secret `secret` mounted alone, read by the flag."""
    reg = o.one("Deployment", "-registry")
    assert f"--token-signing-key-file=/etc/outpost/signing-keys/{key}" in registry_args(o)
    vols = {v["name"]: v for v in reg["spec"]["template"]["spec"]["volumes"]}
    assert vols["signing-keys"]["secret"] == {"secretName": secret, "defaultMode": 0o440,
                                              "items": [{"key": key, "path": key}]}, vols
    assert {"name": "signing-keys", "mountPath": "/etc/outpost/signing-keys",
            "readOnly": True} in containers(reg)[0]["volumeMounts"]


# A key the chart made at install, found by `lookup` on upgrade.
KEPT_KEY = base64.b64encode(b"S2VwdCBhY3Jvc3MgdXBncmFkZXM6IDMyIGJ5dGVzISE=\n").decode()
KEPT_SECRET = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
               "metadata": {"name": "outpost-token-signing-key", "namespace": NS,
                            "labels": {"app.kubernetes.io/managed-by": "Helm"},
                            "annotations": {"meta.helm.sh/release-name": "outpost",
                                            "meta.helm.sh/release-namespace": NS}},
               "data": {"signing-keys": KEPT_KEY}}


def webhook_container(o):
    return containers(o.one("Deployment", "-webhook"))[0]


def check_namespace_credentials(o, secret, key, lifetime, default):
    """With tokens the webhook mints namespace credentials: the registry's signing key Secret
    mounted alone, the flags, Events allowed; Secrets still granted by name only."""
    wh = o.one("Deployment", "-webhook")
    c = webhook_container(o)
    assert f"--namespace-credential-key-file=/etc/outpost-webhook/signing-keys/{key}" in c["args"], c["args"]
    assert f"--namespace-credential-lifetime={lifetime}" in c["args"], c["args"]
    assert f"--namespace-default-scope={default}" in c["args"], c["args"]
    vols = {v["name"]: v for v in wh["spec"]["template"]["spec"]["volumes"]}
    assert vols["signing-keys"]["secret"] == {"secretName": secret, "defaultMode": 0o440,
                                              "items": [{"key": key, "path": key}]}, vols
    assert {"name": "signing-keys", "mountPath": "/etc/outpost-webhook/signing-keys",
            "readOnly": True} in c["volumeMounts"]
    rules = o.one("ClusterRole", "-webhook")["rules"]
    assert {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]} in rules, rules
    assert {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"]} in rules, rules
    unnamed = {v for r in rules if "secrets" in r["resources"] and not r.get("resourceNames") for v in r["verbs"]}
    assert unnamed == {"create"}, rules
    assert {r for rule in rules for r in rule["resources"]} == {"namespaces", "secrets", "events"}, rules


def check_no_client_tokens(o):
    """Without tokens.existingSecret the signing key is still the chart's: the registry verifies
    the webhook's namespace credentials with it, anonymous pulls are off, and the availability
    checks mint their own credential (no pull secret mounted in the webhook)."""
    check_signing_key(o, "outpost-token-signing-key", "signing-keys")
    check_namespace_credentials(o, "outpost-token-signing-key", "signing-keys", "8h", "**")
    args = registry_args(o)
    assert not any(a.startswith("--tokens") for a in args), args
    assert "--anonymous-pull" not in args, args
    c = webhook_container(o)
    assert not any(a.startswith("--registry-auth-file") for a in c["args"]), c["args"]
    vols = [v["name"] for v in o.one("Deployment", "-webhook")["spec"]["template"]["spec"]["volumes"]]
    assert "pull" not in vols and "tokens" not in vols, vols
    line = base64.b64decode(o.one("Secret", "-token-signing-key")["data"]["signing-keys"]).decode()
    assert line.endswith("\n") and len(base64.b64decode(line.strip())) == 32, "one 32-byte key"
    # nodeScope [] (the default): the webhook is told to keep no node credential (and remove
    # one it made), the node agent gets none.
    assert "--node-credential-secret=outpost-node-pull" in c["args"] and "--node-scope=" in c["args"], c["args"]
    agent = containers(o.one("DaemonSet", "-node-agent"))[0]
    assert not any(a.startswith("--pull-credentials-file") for a in agent["args"]), agent["args"]


def check_node_scope(o):
    """trustDistribution.nodeScope: the webhook keeps <release>-node-pull holding a credential
    for it (granted by name), the node agent gives it to containerd, the uninstall hook deletes
    it by name."""
    c = webhook_container(o)
    assert "--node-credential-secret=outpost-node-pull" in c["args"], c["args"]
    assert "--node-scope=library/**,base/*" in c["args"], c["args"]
    rules = o.one("ClusterRole", "-webhook")["rules"]
    named = sorted(n for r in rules if "secrets" in r["resources"] for n in r.get("resourceNames", []))
    assert named == ["outpost-node-pull", "outpost-pull"], rules
    ds = o.one("DaemonSet", "-node-agent")
    agent = containers(ds)[0]
    assert "--pull-credentials-file=/etc/outpost-node-agent/pull/.dockerconfigjson" in agent["args"], agent["args"]
    vols = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    assert vols["pull"]["secret"]["secretName"] == "outpost-node-pull", vols
    args = check_uninstall_hook(o)
    assert "--node-credential-secret=outpost-node-pull" in args, args
    deletable = [n for r in o.hook("ClusterRole")["rules"] if "secrets" in r["resources"]
                 for n in r.get("resourceNames", [])]
    assert "outpost-node-pull" in deletable, deletable


def check_anonymous_pull(o):
    """anonymousPull: the old behaviour, beside the namespace credentials."""
    check_signing_key(o, "outpost-token-signing-key", "signing-keys")
    assert "--anonymous-pull" in registry_args(o), registry_args(o)
    assert "anonymousPull=true" in o.notes, o.notes


def check_signing_key_kept(o):
    check_signing_key(o, "outpost-token-signing-key", "signing-keys")
    assert o.one("Secret", "-token-signing-key")["data"] == {"signing-keys": KEPT_KEY}


def check_signing_key_existing_secret(o):
    check_signing_key(o, "outpost-signing", "keys")
    check_namespace_credentials(o, "outpost-signing", "keys", "90m", "team-a/**,base/*")
    assert not [x for x in o.of("Secret") if x["metadata"]["name"].endswith("-token-signing-key")]


def check_standalone(o):
    check_single_registry(o)
    check_no_client_tokens(o)
    args = registry_args(o)
    assert not any("connection" in a for a in args), args
    assert "anonymousPull" not in o.notes and "outpost.io/repositories" in o.notes, o.notes
    assert "standalone" in o.notes
    # storage.type pvc (the default): the PVC mounted where --storage points, one pod at a time.
    assert "--storage=/var/lib/outpost" in args and not any(a.startswith("--storage-option") for a in args)
    assert not any(a.startswith("--storage-redirect") or a.startswith("--leader") for a in args), args
    reg = o.one("Deployment", "-registry")
    assert reg["spec"]["strategy"] == {"type": "Recreate"}, reg["spec"]["strategy"]
    pvc = o.one("PersistentVolumeClaim", "-data")
    pod = reg["spec"]["template"]["spec"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": pvc["metadata"]["name"]}} in pod["volumes"]
    assert {"name": "data", "mountPath": "/var/lib/outpost"} in containers(reg)[0]["volumeMounts"]
    env = [e["name"] for e in containers(reg)[0]["env"]]
    assert not [e for e in env if e.startswith(("AWS_", "AZURE"))], env
    assert "annotations" not in o.one("ServiceAccount", "-registry")["metadata"] or \
        set(o.one("ServiceAccount", "-registry")["metadata"]["annotations"]) <= {
            "meta.helm.sh/release-name", "meta.helm.sh/release-namespace"}


def registry_env(o):
    """The registry container's env by name: a value, or ("secret", name, key, optional)."""
    out = {}
    for e in containers(o.one("Deployment", "-registry"))[0]["env"]:
        if "fieldRef" in e.get("valueFrom", {}):
            out[e["name"]] = ("field", e["valueFrom"]["fieldRef"]["fieldPath"])
        elif "valueFrom" in e:
            ref = e["valueFrom"]["secretKeyRef"]
            out[e["name"]] = ("secret", ref["name"], ref["key"], ref.get("optional", False))
        else:
            out[e["name"]] = e["value"]
    return out


def check_object_storage_pod(o, replicas=1, election="kubernetes"):
    """Any object store: no PVC, no data volume, a rolling update that keeps every replica."""
    assert not o.of("PersistentVolumeClaim"), "object storage needs no PVC"
    reg = o.one("Deployment", "-registry")
    assert reg["spec"]["replicas"] == replicas
    assert reg["spec"]["strategy"] == {"type": "RollingUpdate",
                                       "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}, reg["spec"]
    pod = reg["spec"]["template"]["spec"]
    assert not [v for v in pod.get("volumes") or [] if v["name"] == "data"], pod["volumes"]
    assert not [m for m in containers(reg)[0].get("volumeMounts") or [] if m["name"] == "data"]
    # One pod syncs even while a rolling update runs two.
    check_election(o, election)
    # The chart makes no Secret for the object store: credentials stay in the user's.
    assert not [s for s in o.of("Secret") if "storage" in s["metadata"]["name"] or "s3" in s["metadata"]["name"]]
    assert "no PersistentVolumeClaim" in o.notes, o.notes


def check_s3(o):
    check_object_storage_pod(o)
    args = registry_args(o)
    assert "--storage=s3://outpost-images/edge/site-1" in args, args
    assert "--storage-redirect" in args and "--storage-redirect-expiry=30m" in args, args
    opts = [a for a in args if a.startswith("--storage-option")]
    assert opts == ["--storage-option=aws_conditional_put=etag",
                    "--storage-option=http1_only=true",
                    "--storage-option=pool_max_idle_per_host=12500000",
                    '--storage-option=user_agent=outpost "edge": #1 \\ end'], opts
    # What the values ask for is rendered, parent and retention included.
    assert "--max-storage=400Gi" in args and "--connection-string-file=/etc/outpost/connection/connection-string" in args
    env = registry_env(o)
    assert env["AWS_ACCESS_KEY_ID"] == ("secret", "outpost-s3", "rootUser", False), env
    assert env["AWS_SECRET_ACCESS_KEY"] == ("secret", "outpost-s3", "rootPassword", False), env
    assert env["AWS_SESSION_TOKEN"] == ("secret", "outpost-s3", "AWS_SESSION_TOKEN", True), env
    assert env["AWS_REGION"] == "eu-central-1" and env["AWS_ENDPOINT"] == "http://minio.storage:9000", env
    assert env["AWS_ALLOW_HTTP"] == "true", env
    assert "AWS_VIRTUAL_HOSTED_STYLE_REQUEST" not in env, "path-style is object_store's default"
    assert not [k for k in env if k.startswith("AZURE")], env
    sa = o.one("ServiceAccount", "-registry")
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] == \
        "arn:aws:iam::123456789012:role/outpost", sa
    assert "credentials must come from" not in o.notes


def check_azblob_emulator(o):
    check_object_storage_pod(o)
    check_single_registry(o)
    args = registry_args(o)
    assert "--storage=azblob://outpost" in args and not any(a.startswith("--storage-option") for a in args)
    assert not any(a.startswith("--storage-redirect") for a in args), args
    env = registry_env(o)
    for name in AZURE_CREDENTIALS:
        assert env[name] == ("secret", "azurite-key", name, True), env
    assert env["AZURE_STORAGE_USE_EMULATOR"] == "true", env
    assert env["AZURITE_BLOB_STORAGE_URL"] == "http://azurite.storage:10000", env
    assert "AZURE_STORAGE_ENDPOINT" not in env and "AZURE_STORAGE_ACCOUNT_NAME" not in env, env
    assert not [k for k in env if k.startswith("AWS_")], env


def check_azblob_workload_identity(o):
    check_object_storage_pod(o)
    args = registry_args(o)
    assert "--storage=azblob://images/sites/edge-1" in args, args
    assert "--storage-option=azure_credential_type=workload_identity" in args, args
    env = registry_env(o)
    assert env["AZURE_STORAGE_ACCOUNT_NAME"] == "outpoststore", env
    assert env["AZURE_STORAGE_ENDPOINT"] == "https://outpoststore.blob.core.chinacloudapi.cn", env
    assert not [k for k, v in env.items() if isinstance(v, tuple) and v[0] == "secret"], \
        "no Secret: no secretKeyRef"
    assert "AZURE_STORAGE_USE_EMULATOR" not in env, env
    reg = o.one("Deployment", "-registry")
    labels = reg["spec"]["template"]["metadata"]["labels"]
    assert labels["azure.workload.identity/use"] == "true", labels
    # The selector labels are the chart's, whatever podLabels adds.
    for k, v in reg["spec"]["selector"]["matchLabels"].items():
        assert labels[k] == v, (k, labels)
    assert reg["spec"]["template"]["metadata"]["annotations"] == {
        "azure.workload.identity/proxy-sidecar-port": "8000"}, reg["spec"]["template"]["metadata"]
    sa = o.one("ServiceAccount", "-registry")
    assert sa["metadata"]["annotations"]["azure.workload.identity/client-id"] == \
        "00000000-0000-0000-0000-000000000001", sa


def check_ha(when_unsatisfiable, delay):
    """replicas 3 on object storage: a rolling update that never drops below 3, a budget that
    lets one pod go at a time, spread over nodes, the webhook's budget untouched."""
    def check(o):
        check_object_storage_pod(o, replicas=3)
        reg = o.one("Deployment", "-registry")
        selector = reg["spec"]["selector"]["matchLabels"]
        assert selector["app.kubernetes.io/component"] == "registry", selector
        pdb = o.one("PodDisruptionBudget", "-registry")
        assert pdb["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": selector}}, pdb["spec"]
        assert o.one("PodDisruptionBudget", "-webhook")["spec"]["minAvailable"] == 1
        spread = reg["spec"]["template"]["spec"]["topologySpreadConstraints"]
        assert spread == [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                           "whenUnsatisfiable": when_unsatisfiable,
                           "labelSelector": {"matchLabels": selector}}], spread
        # The spread's selector finds the registry's pods, and only them.
        labels = reg["spec"]["template"]["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in selector.items()), labels
        for other in o.workloads():
            if other is not reg:
                other_labels = other["spec"]["template"]["metadata"]["labels"]
                assert not all(other_labels.get(k) == v for k, v in selector.items()), other_labels
        check_shutdown(reg, delay)
        probe = containers(reg)[0]["readinessProbe"]
        assert probe["httpGet"]["path"] == "/readyz" and probe["periodSeconds"] <= 5, probe
    return check


def check_ha_two_strict(o):
    reg = o.one("Deployment", "-registry")
    assert reg["spec"]["replicas"] == 2, reg["spec"]
    pod = reg["spec"]["template"]["spec"]
    assert pod["topologySpreadConstraints"][0]["whenUnsatisfiable"] == "DoNotSchedule", pod
    assert o.one("PodDisruptionBudget", "-registry")["spec"]["maxUnavailable"] == 1
    # The alternative to a Kubernetes Lease: a lease in the bucket, no token, no RBAC.
    check_object_storage_pod(o, replicas=2, election="store")
    check_shutdown(reg, 15)
    assert pod["terminationGracePeriodSeconds"] == 55, pod


def check_sync_platforms(o):
    args = registry_args(o)
    assert [a for a in args if a.startswith("--platform")] == [
        "--platform=linux/amd64", "--platform=linux/arm/v7"], args
    # The default (every platform) passes no flag.


# Values the schema refuses, refused by the templates too when an install skips the schema
# (--skip-schema-validation): name -> (values, what the failure must say).
REFUSALS = {
    "unknown-leader-election-without-schema": (
        {"storage": {"type": "s3", "s3": {"bucket": "outpost"}}, "registry": {"leaderElection": "etcd"}},
        "registry.leaderElection must be kubernetes (a Lease) or store (a lease in the bucket)"),
    "node-scope-with-node-credentials": (
        {"trustDistribution": {"nodeScope": ["base/*"], "nodeCredentials": True}},
        "trustDistribution.nodeScope and trustDistribution.nodeCredentials exclude each other"),
    "node-scope-without-webhook": (
        {"trustDistribution": {"nodeScope": ["base/*"]}, "webhook": {"enabled": False}},
        "trustDistribution.nodeScope needs webhook.enabled"),
    "sync-platform-without-schema": (
        {"connectionString": CONN, "sync": {"platforms": ["linux/amd64", "linux/arm/v7/x"]}},
        'sync.platforms: "linux/arm/v7/x" is not OS/ARCH[/VARIANT]'),
    "replicas-on-pvc-without-schema": (
        {"registry": {"replicas": 2}},
        "registry.replicas > 1 needs object storage (storage.type s3 or azblob)"),
}


SCENARIOS = {
    "https-cert-manager": ({"existingSecret": "", "connectionString": CONN, "cert-manager": {"enabled": True},
                            "tokens": {"existingSecret": "outpost-tokens"},
                            "service": {"clusterIP": "10.96.100.100"}, "webhook": {"rules": RULES},
                            "staging": {"images": ["hello-world:latest"]},
                            "sync": {"bandwidthLimit": 12500000}, "pullThrough": False,
                            "metrics": {"serviceMonitor": {"enabled": True}}}, check_default),
    "own-tls-secret": ({"existingSecret": "outpost-conn", "cert-manager": {"enabled": False},
                        "tls": {"secret": "outpost-tls"},
                        "webhook": {"tlsSecret": "outpost-webhook-tls", "caBundle": "Q0EgYnVuZGxl"}},
                       check_own_tls),
    "managed-certs": ({"connectionString": CONN, "service": {"clusterIP": "10.96.100.100"},
                       "webhook": {"rules": RULES, "shutdownDelaySeconds": 12}}, check_managed),
    "own-registry-tls-managed-webhook": ({"connectionString": CONN, "tls": {"secret": "outpost-tls"}},
                                         check_mixed),
    "http": ({"connectionString": CONN, "httpsEnabled": False,
              "trustDistribution": {"enabled": False}, "service": {"port": 80}}, check_http),
    "trust-distribution-off": ({"connectionString": CONN, "trustDistribution": {"enabled": False}},
                               check_trust_off),
    "webhook-off": ({"connectionString": CONN, "webhook": {"enabled": False}}, check_webhook_off),
    "standalone-defaults": ({}, check_standalone),
    "signing-key-kept-on-upgrade": ({"tokens": {"existingSecret": "outpost-tokens"}}, check_signing_key_kept,
                                    {f"/api/v1/namespaces/{NS}/secrets/outpost-token-signing-key": KEPT_SECRET}),
    "signing-key-kept-on-upgrade-without-tokens": ({}, check_signing_key_kept,
                                    {f"/api/v1/namespaces/{NS}/secrets/outpost-token-signing-key": KEPT_SECRET}),
    "anonymous-pull": ({"anonymousPull": True}, check_anonymous_pull),
    "node-scope": ({"trustDistribution": {"nodeScope": ["library/**", "base/*"]}}, check_node_scope),
    "signing-key-existing-secret": ({"tokens": {"existingSecret": "outpost-tokens", "signingKey": {
        "existingSecret": "outpost-signing", "secretKey": "keys"}},
        "namespaceScopes": {"default": ["team-a/**", "base/*"], "credentialLifetime": "90m"}},
        check_signing_key_existing_secret),
    "namespace-scopes-default-empty": ({"tokens": {"existingSecret": "outpost-tokens"},
                                        "namespaceScopes": {"default": []}},
                                       lambda o: check_namespace_credentials(
                                           o, "outpost-token-signing-key", "signing-keys", "8h", "")),
    "s3-existing-secret": ({"connectionString": CONN, "maxStorage": "400Gi", "storage": {
        "type": "s3", "existingSecret": "outpost-s3",
        "secretKeys": {"AWS_ACCESS_KEY_ID": "rootUser", "AWS_SECRET_ACCESS_KEY": "rootPassword"},
        "s3": {"bucket": "outpost-images", "prefix": "/edge/site-1/", "region": "eu-central-1",
               "endpoint": "http://minio.storage:9000", "virtualHostedStyleRequest": False,
               "allowHttp": True},
        "options": {"aws_conditional_put": "etag", "pool_max_idle_per_host": 12500000,
                    "http1_only": True, "user_agent": 'outpost "edge": #1 \\ end'},
        "redirect": True, "redirectExpiry": "30m"},
        "registry": {"serviceAccount": {"annotations": {
            "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/outpost"}}}}, check_s3),
    "azblob-emulator": ({"storage": {"type": "azblob", "existingSecret": "azurite-key",
                                     "azblob": {"container": "outpost", "useEmulator": True,
                                                "endpoint": "http://azurite.storage:10000"}}},
                        check_azblob_emulator),
    "azblob-workload-identity": ({"storage": {
        "type": "azblob", "azblob": {"account": "outpoststore", "container": "images",
                                     "prefix": "sites/edge-1",
                                     "endpoint": "https://outpoststore.blob.core.chinacloudapi.cn"},
        "options": {"azure_credential_type": "workload_identity"}},
        "registry": {"serviceAccount": {"annotations": {
            "azure.workload.identity/client-id": "00000000-0000-0000-0000-000000000001"}},
            "podLabels": {"azure.workload.identity/use": "true"},
            "podAnnotations": {"azure.workload.identity/proxy-sidecar-port": "8000"}}},
        check_azblob_workload_identity),
    "ha-azblob": ({"connectionString": CONN, "storage": {
        "type": "azblob", "existingSecret": "azurite-key",
        "azblob": {"container": "outpost", "useEmulator": True, "endpoint": "http://azurite.storage:10000"}},
        "registry": {"replicas": 3}}, check_ha("ScheduleAnyway", 5)),
    "ha-s3-strict-spread": ({"storage": {"type": "s3", "s3": {"bucket": "outpost"}},
                             "registry": {"replicas": 2, "shutdownDelaySeconds": 15, "leaderElection": "store",
                                          "topologySpread": {"whenUnsatisfiable": "DoNotSchedule"}}},
                            check_ha_two_strict),
    "sync-platforms": ({"connectionString": CONN, "sync": {"platforms": ["linux/amd64", "linux/arm/v7"]}},
                       check_sync_platforms),
    "parent-rules-by-default": ({"connectionString": CONN, "repositories": ["hello-world", "team-a/**"]},
                                check_parent_rules),
    "parent-over-http": ({"connectionString": CONN.replace(
        "myacr.westeurope.data.azurecr.io;ParentEndpointProtocol=https",
        "10.1.2.3:8080;ParentEndpointProtocol=HTTP")}, check_parent_over_http),
    "rules-plain-http-ca-file": ({"connectionString": CONN, "webhook": {"rules": [
        {"upstream": "parent.lab:8080", "plainHttp": True},
        {"upstream": "ghcr.io", "caFile": "/etc/ssl/ghcr.pem", "plainHttp": False}]}},
        check_rules_carry_plain_http_and_ca),
    "existing-secret-parent": ({"existingSecret": "outpost-conn",
                                "parent": {"gatewayEndpoint": "MyAcr.westeurope.data.azurecr.io"}},
                               check_existing_secret_parent),
    "existing-secret-alone": ({"existingSecret": "outpost-conn"}, check_existing_secret_alone),
    "http-lab-with-trust": ({"connectionString": CONN.replace("=https", "=http"), "httpsEnabled": False,
                             "service": {"port": 80, "clusterIP": "10.96.100.100"}}, check_http_lab),
    "containerd-layout": ({"connectionString": CONN}, check_layout("containerd", "/etc/containerd", {
        "OUTPOST_HOSTS_DIR": "/etc/containerd/certs.d",
        "OUTPOST_CONTAINERD_CONFIG": "/etc/containerd/config.toml"})),
    "k3s-layout": ({"trustDistribution": {"runtime": "k3s"}}, check_layout("k3s", "/etc/rancher/k3s", {
        "OUTPOST_REGISTRIES_YAML": "/etc/rancher/k3s/registries.yaml"})),
    "rke2-layout": ({"trustDistribution": {"runtime": "rke2"}}, check_layout("rke2", "/etc/rancher/rke2", {
        "OUTPOST_REGISTRIES_YAML": "/etc/rancher/rke2/registries.yaml"})),
    "microk8s-layout": ({"trustDistribution": {"runtime": "microk8s"}},
                        check_layout("containerd", "/var/snap/microk8s", {
                            "OUTPOST_HOSTS_DIR": "/var/snap/microk8s/current/args/certs.d",
                            "OUTPOST_CONTAINERD_CONFIG": "/var/snap/microk8s/current/args/containerd.toml"})),
    "k0s-layout": ({"trustDistribution": {"runtime": "k0s"}}, check_layout("containerd", "/etc/k0s", {
        "OUTPOST_HOSTS_DIR": "/etc/k0s/certs.d",
        "OUTPOST_CONTAINERD_CONFIG": "/etc/k0s/containerd.toml"})),
    "custom-host-config-dir": ({"trustDistribution": {"hostConfigDir": "/opt/containerd/"}},
                               check_layout("containerd", "/opt/containerd", {
                                   "OUTPOST_HOSTS_DIR": "/opt/containerd/certs.d",
                                   "OUTPOST_CONTAINERD_CONFIG": "/opt/containerd/config.toml"})),
}


def main():
    failures = 0
    for name, (values, check, *existing) in SCENARIOS.items():
        try:
            objs, release = helm_render.render(CHART, values, namespace=NS, release="outpost",
                                               existing=existing[0] if existing else None)
            o = Objects(objs, release["info"].get("notes", ""), release.get("hooks") or [])
            check_common(o)
            check(o)
            print(f"ok   {name:<24} {len(objs)} objects")
        except Exception as e:  # noqa: BLE001 - report every scenario, then fail
            failures += 1
            print(f"FAIL {name:<24} {type(e).__name__}: {e}")
    for name, (values, reason) in REFUSALS.items():
        try:
            helm_render.render(CHART, values, namespace=NS, release="outpost", skip_schema=True)
            failures += 1
            print(f"FAIL {name:<24} rendered; expected: {reason}")
        except Exception as e:  # noqa: BLE001 - helm_sdkpy.HelmError, reported with its text
            if reason in str(e):
                print(f"ok   {name:<24} refused: {reason}")
            else:
                failures += 1
                print(f"FAIL {name:<24} {type(e).__name__}: {e}")
    total = len(SCENARIOS) + len(REFUSALS)
    print(f"render checks: {total - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
