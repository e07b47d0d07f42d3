#!/usr/bin/env python3
"""Lints charts/outpost through the real Helm library (helm-sdkpy) for the default values and
each documented scenario, and checks that a values typo fails (the schema rejects it).

`Lint` takes only a chart path, so each scenario lints a temporary copy of the chart whose
values.yaml holds the scenario. A case that must fail must also fail for the right reason: Helm's
own message for those values (an install into the loopback stand-in API of helm_render.py) must
name the offending key. Exits 1 on any failure; prints one line per case.

Usage: python3 charts/tests/lint.py      (pip install --ignore-requires-python helm-sdkpy)
"""

import asyncio
import json
import os
import shutil
import sys
import tempfile

sys.dont_write_bytecode = True
CHART = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "outpost")

CONN = ("ConnectedRegistryName=edge;SyncTokenName=edge-sync;SyncTokenPassword=p4ss;"
        "ParentGatewayEndpoint=myacr.westeurope.data.azurecr.io;ParentEndpointProtocol=https")
RULES = [{"upstream": "myacr.azurecr.io", "repositories": ["hello-world", "team-a/**"]},
         {"upstream": "docker.io"}]

# name -> (values overriding the defaults, should pass)
SCENARIOS = {
    "defaults": ({}, True),
    "managed-certs": ({"connectionString": CONN, "service": {"clusterIP": "10.96.100.100"},
                       "webhook": {"rules": RULES}}, True),
    "https-cert-manager": ({"connectionString": CONN, "service": {"clusterIP": "10.96.100.100"},
                            "cert-manager": {"enabled": True},
                            "webhook": {"rules": RULES}, "staging": {"images": ["hello-world:latest"]},
                            "metrics": {"serviceMonitor": {"enabled": True}}, "maxStorage": "400Gi",
                            "repositories": ["hello-world", "team-a/**"],
                            "sync": {"schedule": "0 22 * * *", "window": "PT6H"}}, True),
    "own-tls-secret": ({"existingSecret": "outpost-conn", "cert-manager": {"enabled": False},
                        "tls": {"secret": "outpost-tls"}, "tokens": {"existingSecret": "outpost-tokens"},
                        "webhook": {"tlsSecret": "outpost-webhook-tls", "caBundle": "TFMwdExTMUNSVWRKVGlCRFJWSlVTVVpKUTBGVVJTMHRMUzB0Q2c9PQ==",
                                    "rules": RULES},
                        "service": {"clusterIP": "fd00::10"}}, True),
    "http": ({"connectionString": CONN, "httpsEnabled": False, "trustDistribution": {"enabled": False},
              "service": {"port": 80}}, True),
    # The lab install with the node agent: a plain-HTTP mirror on the nodes.
    "http-with-trust": ({"connectionString": CONN.replace("=https", "=http"), "httpsEnabled": False,
                         "service": {"port": 80, "clusterIP": "10.96.100.100"},
                         "webhook": {"rules": [{"upstream": "parent.lab:8080", "plainHttp": True},
                                               {"upstream": "ghcr.io", "caFile": "/etc/ssl/ghcr.pem"}]}},
                        True),
    "existing-secret-parent": ({"existingSecret": "outpost-conn",
                                "parent": {"gatewayEndpoint": "myacr.westeurope.data.azurecr.io",
                                           "protocol": "https"}}, True),
    "trust-distribution-off": ({"connectionString": CONN, "trustDistribution": {"enabled": False}}, True),
    "webhook-off": ({"connectionString": CONN, "webhook": {"enabled": False}}, True),
    "k3s": ({"connectionString": CONN, "trustDistribution": {"runtime": "k3s", "nodeCredentials": True},
             "service": {"clusterIP": "10.43.10.10"}}, True),
    "rke2": ({"connectionString": CONN, "trustDistribution": {"runtime": "rke2"}}, True),
    "microk8s": ({"connectionString": CONN, "trustDistribution": {"runtime": "microk8s"}}, True),
    "k0s": ({"connectionString": CONN, "trustDistribution": {"runtime": "k0s",
                                                            "hostConfigDir": "/etc/k0s"}}, True),
    "s3": ({"connectionString": CONN, "maxStorage": "400Gi",
            "storage": {"type": "s3", "existingSecret": "outpost-s3",
                        "secretKeys": {"AWS_ACCESS_KEY_ID": "rootUser", "AWS_SECRET_ACCESS_KEY": "rootPassword"},
                        "s3": {"bucket": "outpost", "prefix": "edge", "region": "eu-central-1",
                               "endpoint": "https://minio.storage:9000", "virtualHostedStyleRequest": True},
                        "options": {"aws_conditional_put": "etag", "pool_max_idle_per_host": 8}}}, True),
    "s3-redirect": ({"storage": {"type": "s3", "s3": {"bucket": "outpost"}, "redirect": True,
                                 "redirectExpiry": "15m"}}, True),
    "azblob-emulator": ({"storage": {"type": "azblob", "existingSecret": "azurite",
                                     "azblob": {"container": "outpost", "useEmulator": True,
                                                "endpoint": "http://azurite:10000"}}}, True),
    "azblob-workload-identity": ({"storage": {"type": "azblob",
                                              "azblob": {"account": "outpoststore", "container": "images"},
                                              "options": {"azure_credential_type": "workload_identity"}},
                                  "registry": {"serviceAccount": {"annotations": {
                                      "azure.workload.identity/client-id": "00000000-0000-0000-0000-000000000001"}},
                                      "podLabels": {"azure.workload.identity/use": "true"}}}, True),
    # Several registry pods on object storage (a PodDisruptionBudget, spread over nodes).
    "ha-azblob": ({"connectionString": CONN,
                   "storage": {"type": "azblob", "existingSecret": "azurite",
                               "azblob": {"container": "outpost", "useEmulator": True}},
                   "registry": {"replicas": 3}}, True),
    "ha-s3-strict-spread": ({"storage": {"type": "s3", "s3": {"bucket": "outpost"}},
                             "registry": {"replicas": 2, "shutdownDelaySeconds": 10, "leaderElection": "store",
                                          "topologySpread": {"whenUnsatisfiable": "DoNotSchedule"}}}, True),
    # Must fail: the schema rejects unknown keys and wrong types, and contradictory values. The
    # third item is what Helm's own validation must say (checked through an install into the
    # stand-in API, since Lint's messages carry no text through helm-sdkpy).
    "signing-key-existing-secret": ({"tokens": {"existingSecret": "outpost-tokens",
                                                "signingKey": {"existingSecret": "outpost-signing",
                                                               "secretKey": "keys"}}}, True),
    "anonymous-pull": ({"anonymousPull": True}, True),
    "node-scope": ({"trustDistribution": {"nodeScope": ["base/*"]}}, True),
    "node-scope-bad-pattern": ({"trustDistribution": {"nodeScope": ["Base/*"]}}, False,
                               "at '/trustDistribution/nodeScope/0': 'Base/*' does not match pattern"),
    "anonymous-pull-not-boolean": ({"anonymousPull": "yes"}, False,
                                   "at '/anonymousPull': got string, want boolean"),
    "signing-key-bad-secret-key": ({"tokens": {"existingSecret": "t", "signingKey": {"secretKey": "a/b"}}},
                                   False, "at '/tokens/signingKey/secretKey': 'a/b' does not match pattern"),
    "typo-in-key": ({"trustDistribution": {"enabeld": True}}, False,
                    "at '/trustDistribution': additional properties 'enabeld' not allowed"),
    "typo-top-level": ({"connectionStrng": CONN}, False,
                       "additional properties 'connectionStrng' not allowed"),
    "wrong-type": ({"sync": {"chunkSizeInMb": "eight"}}, False,
                   "at '/sync/chunkSizeInMb': got string, want integer"),
    "sync-platforms": ({"connectionString": CONN, "sync": {"platforms": ["linux/amd64", "linux/arm/v7"]}},
                       True),
    "sync-platform-without-arch": ({"sync": {"platforms": ["linux"]}}, False,
                                   "at '/sync/platforms/0': 'linux' does not match pattern"),
    "sync-platforms-not-a-list": ({"sync": {"platforms": "linux/amd64"}}, False,
                                  "at '/sync/platforms': got string, want array"),
    "bad-cluster-ip": ({"service": {"clusterIP": "10.96.0.300"}}, False,
                       "'10.96.0.300' does not match pattern"),
    "webhook-tls-without-ca-bundle": ({"webhook": {"tlsSecret": "s"}}, False,
                                      "at '/webhook/caBundle': minLength"),
    "unknown-runtime": ({"trustDistribution": {"runtime": "cri-o"}}, False,
                        "at '/trustDistribution/runtime': value must be one of"),
    "relative-host-config-dir": ({"trustDistribution": {"hostConfigDir": "etc/containerd"}}, False,
                                 "at '/trustDistribution/hostConfigDir': 'etc/containerd' does not match pattern"),
    "rule-plain-http-and-ca-file": ({"webhook": {"rules": [{"upstream": "parent.lab", "plainHttp": True,
                                                            "caFile": "/etc/ssl/p.pem"}]}}, False,
                                    "at '/webhook/rules/0': 'not' failed"),
    "rule-upstream-with-scheme": ({"webhook": {"rules": [{"upstream": "https://myacr.azurecr.io"}]}}, False,
                                  "at '/webhook/rules/0/upstream': 'https://myacr.azurecr.io' does not match pattern"),
    # Storage: known backends only, what each needs, and never a credential in values.
    "unknown-storage-type": ({"storage": {"type": "gcs"}}, False,
                             "at '/storage/type': value must be one of 'pvc', 's3', 'azblob'"),
    "s3-without-bucket": ({"storage": {"type": "s3"}}, False, "at '/storage/s3/bucket': minLength"),
    "redirect-on-pvc": ({"storage": {"redirect": True}}, False, "at '/storage/type'"),
    "redirect-expiry-unitless": ({"storage": {"type": "s3", "s3": {"bucket": "outpost"}, "redirect": True,
                                              "redirectExpiry": "600"}}, False,
                                 "at '/storage/redirectExpiry'"),
    "azblob-without-account": ({"storage": {"type": "azblob", "azblob": {"container": "outpost"}}}, False,
                               "at '/storage/azblob/account': minLength"),
    "s3-secret-in-values": ({"storage": {"type": "s3", "s3": {"bucket": "outpost", "secretAccessKey": "x"}}},
                            False, "at '/storage/s3': additional properties 'secretAccessKey' not allowed"),
    "azblob-key-in-values": ({"storage": {"type": "azblob", "azblob": {"account": "a", "container": "c",
                                                                       "accountKey": "x"}}}, False,
                             "at '/storage/azblob': additional properties 'accountKey' not allowed"),
    "credential-as-option": ({"storage": {"type": "s3", "s3": {"bucket": "outpost"},
                                          "options": {"aws_secret_access_key": "x"}}}, False,
                             "at '/storage/options/aws_secret_access_key': false schema"),
    "sas-as-option": ({"storage": {"type": "azblob", "azblob": {"account": "a", "container": "c"},
                                   "options": {"SAS_TOKEN": "sv=x"}}}, False,
                      "at '/storage/options/SAS_TOKEN': false schema"),
    "option-value-with-comma": ({"storage": {"type": "s3", "s3": {"bucket": "outpost"},
                                             "options": {"proxy_excludes": "a,b"}}}, False,
                                "at '/storage/options/proxy_excludes': 'a,b' does not match pattern"),
    "sas-in-endpoint": ({"storage": {"type": "azblob", "azblob": {
        "account": "a", "container": "c", "endpoint": "https://a.blob.core.windows.net/?sv=1&sig=x"}}}, False,
        "at '/storage/azblob/endpoint'"),
    "secret-keys-of-other-backend": ({"storage": {"type": "azblob", "existingSecret": "s",
                                                  "azblob": {"account": "a", "container": "c"},
                                                  "secretKeys": {"AWS_ACCESS_KEY_ID": "id"}}}, False,
                                     "at '/storage/secretKeys/AWS_ACCESS_KEY_ID': false schema"),
    "secret-keys-without-secret": ({"storage": {"type": "s3", "s3": {"bucket": "outpost"},
                                                "secretKeys": {"AWS_ACCESS_KEY_ID": "id"}}}, False,
                                   "at '/storage/existingSecret': minLength"),
    "unknown-leader-election": ({"storage": {"type": "s3", "s3": {"bucket": "outpost"}},
                                 "registry": {"leaderElection": "etcd"}}, False,
                                "at '/registry/leaderElection': value must be one of 'kubernetes', 'store'"),
    # Replicas: more than one only on object storage (one pod mounts a PVC; one writer per
    # directory store).
    "replicas-on-pvc": ({"registry": {"replicas": 2}}, False,
                        "at '/registry/replicas': maximum: got 2, want 1"),
    "replicas-zero": ({"storage": {"type": "s3", "s3": {"bucket": "outpost"}}, "registry": {"replicas": 0}},
                      False, "at '/registry/replicas': minimum: got 0, want 1"),
    "unknown-spread-policy": ({"registry": {"topologySpread": {"whenUnsatisfiable": "Never"}}}, False,
                              "at '/registry/topologySpread/whenUnsatisfiable': value must be one of"),
    "shutdown-delay-with-unit": ({"registry": {"shutdownDelaySeconds": "5s"}}, False,
                                 "at '/registry/shutdownDelaySeconds': got string, want integer"),
    "webhook-shutdown-delay-negative": ({"webhook": {"shutdownDelaySeconds": -1}}, False,
                                        "at '/webhook/shutdownDelaySeconds': minimum: got -1, want 0"),
    "pod-label-not-a-string": ({"registry": {"podLabels": {"azure.workload.identity/use": True}}}, False,
                               "at '/registry/podLabels/azure.workload.identity~1use': got boolean, want string"),
    "pod-label-overrides-selector": ({"registry": {"podLabels": {"app.kubernetes.io/name": "x"}}}, False,
                                     "at '/registry/podLabels/app.kubernetes.io~1name': false schema"),
}


def deep_merge(base, over):
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def defaults():
    import yaml  # PyYAML, installed beside helm-sdkpy by tests/run.sh
    with open(os.path.join(CHART, "values.yaml")) as f:
        return yaml.safe_load(f)


def run_lint(values):
    """Lints a copy of the chart whose values.yaml is `values` (JSON is YAML)."""
    import helm_sdkpy
    with tempfile.TemporaryDirectory() as tmp:
        chart = os.path.join(tmp, "outpost")
        shutil.copytree(CHART, chart)
        with open(os.path.join(chart, "values.yaml"), "w") as f:
            json.dump(values, f, indent=2)
        try:
            return asyncio.run(helm_sdkpy.Lint(helm_sdkpy.Configuration()).run(chart)), None
        except helm_sdkpy.HelmError as e:
            return None, str(e)


def install_error(values):
    """Helm's own refusal of `values` (an install into helm_render's stand-in API), or ''."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import helm_render
    import helm_sdkpy
    try:
        helm_render.render(CHART, values)
        return ""
    except helm_sdkpy.HelmError as e:
        return str(e)


def verdict(result, error):
    """(passed, why): no message of error severity (3) and no lint error."""
    if error:
        return False, error.splitlines()[0][:300]
    msgs = result.get("Messages") or []
    errs = [m for m in msgs if m.get("Severity", 0) >= 3]
    if errs or result.get("Errors"):
        return False, json.dumps(errs or result.get("Errors"))[:300]
    return True, f"{len(msgs)} info/warning messages"


def main():
    try:
        import helm_sdkpy  # noqa: F401
    except ImportError:
        print("helm-sdkpy is not installed: pip install --ignore-requires-python helm-sdkpy")
        return 1
    base = defaults()
    failures = 0
    for name, (over, should_pass, *reason) in SCENARIOS.items():
        values = deep_merge(base, over)
        ok, why = verdict(*run_lint(values))
        good = ok == should_pass
        if good and reason:
            said = install_error(values)
            good = reason[0] in said
            why = said.splitlines()[-1].strip() if good else f"Helm said: {said!r}"
        failures += not good
        expect = "passes" if should_pass else "fails"
        print(f"{'ok  ' if good else 'FAIL'} {name:<24} lint {'passed' if ok else 'failed'} "
              f"(expected: {expect}): {why}")
    print(f"chart lint: {len(SCENARIOS) - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
