#!/usr/bin/env bash
# Renders the Helm chart (deploy/helm/voxgate) with Helm's own template engine and checks
# the manifests:
#
#   1. `helm lint --strict` and `helm template`, through helm-python-sdk (PyPI): Helm's Go
#      SDK (v4) behind a C ABI, so no helm binary is needed. values.schema.json is
#      enforced by the render itself, as `helm install` would.
#   2. Every rendered object against the Kubernetes OpenAPI schemas with
#      kubernetes-validate (PyPI), strict (unknown fields are errors), for each of
#      KUBE_VERSIONS. The ServiceMonitor (a Prometheus Operator CRD) has no schema there
#      and is only parsed.
#   3. The chart's own promises, on each rendered Deployment and object: Pod Security
#      "restricted" (runAsNonRoot, seccomp RuntimeDefault, allowPrivilegeEscalation
#      false, capabilities drop ALL, readOnlyRootFilesystem with an emptyDir /tmp), no
#      service account token, the gateway HPA, NetworkPolicies that let only gateway pods
#      (and metrics scrapers) reach the ASR port, the Ingress WebSocket timeouts.
#   4. Values the chart must refuse (schema and template checks) are refused.
#
# Both tools live in a throwaway venv (VOXGATE_CHART_VENV, default
# /var/tmp/voxgate-chart/venv), not in the project's. Not verified here: anything a real
# API server or admission controller would add (defaulting, the Pod Security admission
# plugin itself, CRDs, a CNI enforcing the policies).
#
#   deploy/check-chart.sh            # exit 0: every check passed
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VOXGATE_CHART_VENV:-/var/tmp/voxgate-chart/venv}
KUBE_VERSIONS=${KUBE_VERSIONS:-"1.30.0 1.37.0"}
# The rendered manifests: kept in VOXGATE_CHART_OUT when set, else in a temporary folder.
if [ -n "${VOXGATE_CHART_OUT:-}" ]; then
  OUT=$VOXGATE_CHART_OUT
else
  OUT=$(mktemp -d)
  trap 'rm -rf "$OUT"' EXIT
fi

if ! "$VENV/bin/python" -c 'import helm_python, kubernetes_validate' 2>/dev/null; then
  echo "check-chart: installing helm-python-sdk and kubernetes-validate into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check \
    'helm-python-sdk==0.2.2' 'kubernetes-validate==1.37.0'
fi

"$VENV/bin/python" - "$REPO/deploy/helm/voxgate" "$OUT" "$KUBE_VERSIONS" <<'PY'
import copy
import sys
from pathlib import Path

import helm_python as helm
import kubernetes_validate as kv
import yaml

chart_dir, out_dir, kube_versions = sys.argv[1], Path(sys.argv[2]), sys.argv[3].split()
chart = helm.Chart.load(chart_dir)
failures: list[str] = []
passes = 0


def check(ok: bool, what: str) -> None:
    global passes
    if ok:
        passes += 1
    else:
        failures.append(what)
        print(f"FAIL: {what}")


BASE = {"gateway": {"env": {"PUBLIC_BASE": "https://voice.example.com"},
                    "auth": {"existingSecret": "voxgate-jwt"}}}


def merged(*layers: dict) -> dict:
    def merge(a: dict, b: dict) -> dict:
        out = copy.deepcopy(a)
        for k, v in b.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out
    result: dict = {}
    for layer in layers:
        result = merge(result, layer)
    return result


# Value sets rendered and validated: the defaults, everything switched on, and the
# switches off.
CASES = {
    "defaults": BASE,
    "all-features": merged(BASE, {
        "ingress": {"enabled": True, "tlsSecretName": "voice-tls",
                    "annotations": {"nginx.ingress.kubernetes.io/proxy-body-size": "1m"}},
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
        "asr": {"tls": {"enabled": True, "secretName": "asr-tls", "caSecret": "asr-ca",
                        "clientSecret": "gw-client", "requireClientCert": True},
                "auth": {"tokenSecret": "asr-token"},
                "pools": {"multi": {"autoscaling": {"enabled": True}}}},
        "gateway": {"auth": {"existingSecret": "voxgate-jwt", "keysSecret": "voxgate-jwks",
                             "issuer": "https://id.example.com", "audience": "voxgate"},
                    "recordsUrlKey": {"existingSecret": "records-key"},
                    "tls": {"secretName": "gateway-tls"},
                    "archive": {"persistence": {"enabled": True,
                                                "accessModes": ["ReadWriteMany"]}},
                    "env": {"ARCHIVE_STORE": "s3", "S3_BUCKET": "rec"},
                    "extraEnv": [{"name": "S3_ACCESS_KEY_ID", "valueFrom": {
                        "secretKeyRef": {"name": "s3", "key": "id"}}}]},
        "imagePullSecrets": [{"name": "regcred"}],
    }),
    "minimal": merged(BASE, {
        "networkPolicy": {"enabled": False}, "serviceAccount": {"create": False},
        "gateway": {"autoscaling": {"enabled": False}, "pdb": {"enabled": False}},
        "asr": {"pdb": {"enabled": False}, "pools": {"en": None}},
    }),
}

report = helm.lint(chart_dir, BASE, strict=True)
errors = [m for m in report["messages"] if m["severity"] >= 3] + report.get("errors", [])
warnings = [m for m in report["messages"] if m["severity"] == 2]
check(not errors and not warnings, f"helm lint --strict: {errors or warnings}")
print(f"helm lint --strict (Helm SDK {helm.helm_sdk_version()}): "
      f"{len(report['messages'])} messages, none above info")

for case, values in CASES.items():
    try:
        rendered = chart.render(values, name="vx", namespace="speech", is_install=True)
    except helm.HelmError as exc:
        check(False, f"{case}: render failed: {exc}")
        continue
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append((path, doc))
    case_dir = out_dir / case
    case_dir.mkdir(parents=True, exist_ok=True)
    kinds: dict[str, list[dict]] = {}
    for n, (path, doc) in enumerate(docs):
        kinds.setdefault(doc["kind"], []).append(doc)
        (case_dir / f"{n:02d}-{doc['kind']}-{doc['metadata']['name']}.yaml").write_text(
            yaml.safe_dump(doc, sort_keys=False))
        for version in kube_versions:
            try:
                kv.validate(doc, version, strict=True)
                check(True, "")
            except kv.SchemaNotFoundError:
                check(doc["kind"] == "ServiceMonitor",
                      f"{case}: no schema for {doc['kind']} in Kubernetes {version}")
            except kv.ValidationError as exc:
                check(False, f"{case}: {doc['kind']}/{doc['metadata']['name']} "
                      f"(Kubernetes {version}): {exc.message} at {list(exc.path)}")
    print(f"{case}: {len(docs)} objects ({', '.join(f'{k} x{len(v)}' for k, v in sorted(kinds.items()))})"
          f" validated strictly against Kubernetes {', '.join(kube_versions)}")

    # --- the chart's promises ---------------------------------------------------------
    for dep in kinds.get("Deployment", []):
        name = dep["metadata"]["name"]
        pod = dep["spec"]["template"]["spec"]
        psc = pod.get("securityContext", {})
        check(pod.get("automountServiceAccountToken") is False, f"{case}: {name}: token mounted")
        check(psc.get("runAsNonRoot") is True, f"{case}: {name}: pod runAsNonRoot")
        check(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault",
              f"{case}: {name}: pod seccompProfile RuntimeDefault")
        vols = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            sc = c.get("securityContext", {})
            check(sc.get("allowPrivilegeEscalation") is False,
                  f"{case}: {name}/{c['name']}: allowPrivilegeEscalation")
            check(sc.get("capabilities", {}).get("drop") == ["ALL"],
                  f"{case}: {name}/{c['name']}: capabilities drop ALL")
            check(sc.get("readOnlyRootFilesystem") is True,
                  f"{case}: {name}/{c['name']}: readOnlyRootFilesystem")
            check(not sc.get("privileged"), f"{case}: {name}/{c['name']}: privileged")
            tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            check(len(tmp) == 1 and "emptyDir" in vols.get(tmp[0]["name"], {}),
                  f"{case}: {name}/{c['name']}: /tmp is not an emptyDir")
            # httpGet, or (ASR with client certificates required) an exec probe that
            # presents the mounted client certificate to the same paths.
            check(all(p and (p.get("httpGet") or "/readyz" in str(p.get("exec"))
                             or "/healthz" in str(p.get("exec")))
                      for p in (c.get("readinessProbe"), c.get("livenessProbe"))),
                  f"{case}: {name}/{c['name']}: readiness/liveness probes")
            check(any(k in c for k in ("resources",)), f"{case}: {name}: resources")
    for sa in kinds.get("ServiceAccount", []):
        check(sa.get("automountServiceAccountToken") is False,
              f"{case}: ServiceAccount automounts its token")
    if case != "minimal":
        check(len(kinds.get("ServiceAccount", [])) == 1, f"{case}: one ServiceAccount")
        hpas = [h for h in kinds.get("HorizontalPodAutoscaler", [])
                if h["spec"]["scaleTargetRef"]["name"] == "vx-gateway"]
        check(len(hpas) == 1, f"{case}: gateway HPA")
        gw_dep = [d for d in kinds["Deployment"] if d["metadata"]["name"] == "vx-gateway"][0]
        check("replicas" not in gw_dep["spec"], f"{case}: gateway replicas set beside its HPA")
        pols = {p["metadata"]["name"]: p for p in kinds.get("NetworkPolicy", [])}
        asr_services = [s for s in kinds["Service"] if s["metadata"]["name"].startswith("vx-asr-")]
        for svc in asr_services:
            pol = pols.get(svc["metadata"]["name"])
            check(pol is not None, f"{case}: no NetworkPolicy for {svc['metadata']['name']}")
            if pol is None:
                continue
            check(pol["spec"]["podSelector"]["matchLabels"] == svc["spec"]["selector"],
                  f"{case}: {svc['metadata']['name']}: policy selects other pods than its Service")
            rules = pol["spec"]["ingress"]
            gw_rule = rules[0]["from"][0]["podSelector"]["matchLabels"]
            check(gw_rule.get("app.kubernetes.io/component") == "gateway"
                  and gw_rule.get("app.kubernetes.io/instance") == "vx",
                  f"{case}: {svc['metadata']['name']}: first rule is not this release's gateways")
            check(all(r.get("from") for r in rules),
                  f"{case}: {svc['metadata']['name']}: a rule without `from` admits everyone")
            check(all(p["port"] == "http" for r in rules for p in r["ports"]),
                  f"{case}: {svc['metadata']['name']}: a rule opens another port")
            check(pol["spec"]["policyTypes"] == ["Ingress"], f"{case}: policyTypes")
    else:
        check(not kinds.get("NetworkPolicy") and not kinds.get("ServiceAccount")
              and not kinds.get("HorizontalPodAutoscaler"),
              f"{case}: switched-off objects still rendered")
        gw_dep = [d for d in kinds["Deployment"] if d["metadata"]["name"] == "vx-gateway"][0]
        check(gw_dep["spec"].get("replicas") == 2, f"{case}: gateway replicas without HPA")
        check(all(d["spec"]["template"]["spec"]["serviceAccountName"] == "default"
                  for d in kinds["Deployment"]), f"{case}: serviceAccountName default")
    if case == "all-features":
        ing = kinds.get("Ingress", [])
        check(len(ing) == 1, f"{case}: one Ingress")
        ann = ing[0]["metadata"].get("annotations", {}) if ing else {}
        check(ann.get("nginx.ingress.kubernetes.io/proxy-read-timeout") == "3600"
              and ann.get("nginx.ingress.kubernetes.io/proxy-send-timeout") == "3600"
              and ann.get("nginx.ingress.kubernetes.io/proxy-body-size") == "1m",
              f"{case}: Ingress WebSocket timeouts/annotations: {ann}")
        paths = {p["path"]: p["backend"]["service"]["port"]["name"]
                 for p in ing[0]["spec"]["rules"][0]["http"]["paths"]} if ing else {}
        check(paths == {"/ws": "ws", "/": "http"}, f"{case}: Ingress paths {paths}")

# --- values the chart must refuse -------------------------------------------------------
REFUSED = {
    "replicas as a string": {"gateway": {"replicas": "two"}},
    "unknown top-level key": {"gatway": {}},
    "a chart-owned env var": {"gateway": {"env": {"ASR_URLS": "http://x:1"}}},
    "privilege escalation": {"gateway": {"securityContext": {"allowPrivilegeEscalation": True}}},
    "root": {"asr": {"podSecurityContext": {"runAsNonRoot": False}}},
    "unknown model": {"asr": {"pools": {"multi": {"model": {"model": "large"}}}}},
    "pool name not a DNS label": {"asr": {"pools": {"Multi_1": {"model": {"model": "base"}}}}},
    "defaultPool without a pool": {"asr": {"defaultPool": "fr"}},
    "no PUBLIC_BASE": {"gateway": {"env": {"PUBLIC_BASE": ""}}},
    "asr.server.port set": {"asr": {"server": {"port": 1}}},
    "TLS without a Secret": {"asr": {"tls": {"enabled": True}}},
    "no authentication": {"gateway": {"auth": {"existingSecret": ""}}},
    "a chart-owned security env var": {"gateway": {"env": {"RECORDS_URL_KEY": "x" * 40}}},
    "client certificates required without a client Secret": {
        "asr": {"tls": {"enabled": True, "secretName": "t", "caSecret": "ca",
                        "requireClientCert": True}}},
}
for what, bad in REFUSED.items():
    values = merged(BASE, bad)
    try:
        chart.render(values, name="vx", namespace="speech")
        check(False, f"refused: {what} was accepted")
    except helm.HelmError as exc:
        check(True, "")
        print(f"refused as it should: {what}: {str(exc).splitlines()[-1].strip()[:110]}")

print()
print(f"manifests written to {out_dir} (kept only with VOXGATE_CHART_OUT)")
print(f"{passes} passed, {len(failures)} failed")
sys.exit(1 if failures else 0)
PY
