"""k8s/: every kustomization renders, every object is schema-valid, and the objects agree.

Offline, no cluster:

* rendering -- a small kustomize subset in Python (resources, namespace, labels, images,
  configMapGenerator, JSON6902 patches; anything else fails loudly), compared with
  ``kubectl kustomize`` / ``kustomize build`` when one is on PATH;
* schemas -- core kinds with ``kubernetes-validate`` (bundled Kubernetes schemas, strict: unknown
  fields are errors), RayCluster and ServiceMonitor with ``jsonschema`` against the trimmed CRD
  schemas in ``k8s/schemas/``, and the RayCluster pod templates as core ``PodTemplate``;
* cross-references -- Service -> Deployment labels and ports, ServiceMonitor -> Service,
  ConfigMap volumes -> ConfigMap keys -> the router's ``--config`` path, pools.yaml router port
  and GPU counts -> RayCluster worker groups, probes on /health, no privileged containers;
  the pools.yaml itself is parsed with ``deploy.config`` (the parser ``pdserve up`` uses).

Each check returns a list of problems; the negative cases break a rendered manifest and expect
the matching check to report it.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

K8S = Path(__file__).resolve().parent.parent / "k8s"
KUSTOMIZATIONS = [K8S, K8S / "base", K8S / "overlays" / "cpu-local"]
K8S_VERSION = "1.32.0"  # oldest Kubernetes the manifests must be valid for
CRD_SCHEMAS = {
    ("ray.io/v1", "RayCluster"): K8S / "schemas" / "raycluster-ray.io-v1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): K8S / "schemas" / "servicemonitor-monitoring.coreos.com-v1.json",
}
GPU = "nvidia.com/gpu"
GPUS_PER_NODE = 8
# resource.Quantity syntax (the bundled core schemas accept any string here)
QUANTITY = re.compile(r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")


# ---------------------------------------------------------------- rendering (kustomize subset)

_SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "namespace", "labels", "images",
                   "configMapGenerator", "generatorOptions", "patches"}


def render(path: Path) -> list[dict]:
    """The objects ``kustomize build path`` emits (for the features k8s/ uses)."""
    kfile = path / "kustomization.yaml"
    k = yaml.safe_load(kfile.read_text())
    unknown = set(k) - _SUPPORTED_KEYS
    assert not unknown, f"{kfile}: kustomize features not modelled by this test: {sorted(unknown)}"
    objs: list[dict] = []
    for res in k.get("resources", []):
        target = (path / res).resolve()
        if target.is_dir():
            objs += render(target)
        else:
            objs += [d for d in yaml.safe_load_all(target.read_text()) if d]
    options = k.get("generatorOptions", {})
    for gen in k.get("configMapGenerator", []):
        assert options.get("disableNameSuffixHash") is True, f"{kfile}: hashed generator names are not modelled"
        cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": {}}
        for f in gen.get("files", []):
            key, _, src = f.partition("=") if "=" in f else (Path(f).name, "", f)
            cm["data"][key] = (path / src).read_text()
        for lit in gen.get("literals", []):
            key, _, val = lit.partition("=")
            cm["data"][key] = val
        behavior = gen.get("behavior", "create")
        existing = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == gen["name"]]
        if behavior == "create":
            assert not existing, f"{kfile}: ConfigMap {gen['name']} already exists"
            objs.append(cm)
        else:
            assert existing, f"{kfile}: behavior {behavior} but no ConfigMap {gen['name']} in resources"
            if behavior == "replace":
                existing[0]["data"] = cm["data"]
            else:
                existing[0].setdefault("data", {}).update(cm["data"])
    for patch in k.get("patches", []):
        t = patch["target"]
        hits = [o for o in objs if o["kind"] == t["kind"] and o["metadata"]["name"] == t["name"]
                and o["apiVersion"] == "/".join(x for x in (t.get("group"), t.get("version")) if x)]
        assert len(hits) == 1, f"{kfile}: patch target {t} matches {len(hits)} objects"
        _json6902(hits[0], yaml.safe_load(patch["patch"]))
    for obj in objs:
        if "namespace" in k and obj["kind"] != "Namespace":
            obj["metadata"]["namespace"] = k["namespace"]
        for entry in k.get("labels", []):
            assert not entry.get("includeSelectors"), f"{kfile}: labels with includeSelectors are not modelled"
            obj["metadata"].setdefault("labels", {}).update(entry["pairs"])
        for img in k.get("images", []):
            for c in _containers(obj):
                name, _, tag = c["image"].rpartition(":") if ":" in c["image"] else (c["image"], "", "")
                if name == img["name"]:
                    c["image"] = f"{img.get('newName', name)}:{img.get('newTag', tag)}"
    return objs


def _json6902(doc: dict, ops: list[dict]) -> None:
    for op in ops:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        node = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        key = int(last) if isinstance(node, list) and last != "-" else last
        if op["op"] == "replace":
            assert key in node if isinstance(node, dict) else key < len(node), f"replace of missing {op['path']}"
            node[key] = op["value"]
        elif op["op"] == "add":
            if isinstance(node, list):
                node.insert(len(node) if key == "-" else key, op["value"])
            else:
                node[key] = op["value"]
        elif op["op"] == "remove":
            del node[key]
        else:
            raise AssertionError(f"JSON patch op {op['op']!r} not modelled")


def _pod_templates(obj: dict) -> list[tuple[str, dict]]:
    if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return [(obj["metadata"]["name"], obj["spec"]["template"])]
    if obj["kind"] == "RayCluster":
        spec = obj["spec"]
        return [("head", spec["headGroupSpec"]["template"])] + [
            (g.get("groupName", "?"), g["template"]) for g in spec.get("workerGroupSpecs", [])]
    return []


def _containers(obj: dict) -> list[dict]:
    return [c for _, t in _pod_templates(obj)
            for c in t["spec"].get("containers", []) + t["spec"].get("initContainers", [])]


def _one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    hits = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def _key(o: dict) -> tuple:
    return (o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"])


# ---------------------------------------------------------------- checks (each returns problems)

def schema_problems(objs: list[dict]) -> list[str]:
    problems = []
    for obj in objs:
        where = "/".join(_key(obj))
        schema_file = CRD_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
        try:
            if schema_file:
                jsonschema.validate(obj, json.loads(schema_file.read_text()),
                                    format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)
            else:
                kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as e:
            problems.append(f"{where}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{where}: no schema for {obj['apiVersion']} {obj['kind']}")
        if obj["kind"] == "RayCluster":  # embedded pod templates: the core schema, strictly
            for group, template in _pod_templates(obj):
                pt = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"x-{group}"},
                      "template": template}
                try:
                    kubernetes_validate.validate(pt, K8S_VERSION, strict=True)
                except kubernetes_validate.ValidationError as e:
                    problems.append(f"{where} group {group}: {e.message}")
    return problems


def _selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _port(container: dict, ref: int | str) -> int | None:
    for p in container.get("ports", []):
        if ref in (p.get("name"), p["containerPort"]):
            return p["containerPort"]
    return None


def crossref_problems(objs: list[dict]) -> list[str]:
    problems = []
    ns = {o["metadata"].get("namespace") for o in objs if o["kind"] != "Namespace"}
    if len(ns) != 1 or None in ns:
        problems.append(f"objects spread over namespaces {ns}")
    configmaps = {o["metadata"]["name"]: o.get("data", {}) for o in objs if o["kind"] == "ConfigMap"}
    dep = _one(objs, "Deployment", "pdserve-router")
    svc = _one(objs, "Service", "pdserve-router")
    ray = _one(objs, "RayCluster")
    router_tpl = dep["spec"]["template"]
    router = router_tpl["spec"]["containers"][0]

    # Deployment selector / Service selector -> router pod labels; Service port -> container port
    pod_labels = router_tpl["metadata"].get("labels", {})
    if not _selects(dep["spec"]["selector"].get("matchLabels", {}), pod_labels):
        problems.append("Deployment selector does not match its pod template labels")
    if not _selects(svc["spec"].get("selector", {}), pod_labels):
        problems.append("Service pdserve-router selector does not match the router pod labels")
    svc_ports = {p.get("name"): p for p in svc["spec"]["ports"]}
    target = _port(router, svc_ports.get("http", {}).get("targetPort", -1))
    if target is None:
        problems.append("Service port http targets no router container port")

    # ServiceMonitor -> Service (labels, named port, /metrics, same namespace)
    for sm in (o for o in objs if o["kind"] == "ServiceMonitor"):
        if not _selects(sm["spec"]["selector"].get("matchLabels", {}), svc["metadata"].get("labels", {})):
            problems.append(f"ServiceMonitor {sm['metadata']['name']} does not select Service pdserve-router")
        for ep in sm["spec"].get("endpoints", []):
            if ep.get("port") not in svc_ports:
                problems.append(f"ServiceMonitor endpoint port {ep.get('port')!r} is not a Service port name")
            if ep.get("path") != "/metrics":
                problems.append("ServiceMonitor endpoint path is not /metrics")
        names = sm["spec"].get("namespaceSelector", {}).get("matchNames")
        if names is not None and svc["metadata"].get("namespace") not in names:
            problems.append("ServiceMonitor namespaceSelector excludes the router's namespace")

    # probes on /health, on a declared port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = router.get(probe, {}).get("httpGet")
        if probe != "startupProbe" and get is None:
            problems.append(f"router has no {probe}")
        elif get is not None and (get.get("path") != "/health" or _port(router, get.get("port")) is None):
            problems.append(f"router {probe} is not GET /health on a container port")

    # volumes: every mount has a volume; ConfigMap volumes name existing ConfigMaps and keys
    for owner, tpl in [("router", router_tpl)] + _pod_templates(ray):
        vols = {v["name"]: v for v in tpl["spec"].get("volumes", [])}
        for c in tpl["spec"]["containers"]:
            for m in c.get("volumeMounts", []):
                if m["name"] not in vols:
                    problems.append(f"{owner}/{c['name']}: mount {m['name']} has no volume")
        for v in vols.values():
            if "configMap" in v:
                name = v["configMap"]["name"]
                if name not in configmaps:
                    problems.append(f"{owner}: volume {v['name']} names missing ConfigMap {name}")
                for item in v["configMap"].get("items", []):
                    if item["key"] not in configmaps.get(name, {}):
                        problems.append(f"{owner}: ConfigMap {name} has no key {item['key']}")
        if owner != "router":
            shm = [m for m in tpl["spec"]["containers"][0].get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
            if not shm or vols.get(shm[0]["name"], {}).get("emptyDir", {}).get("medium") != "Memory":
                problems.append(f"ray group {owner}: no memory-backed /dev/shm")

    # the router's --config file is a key of a mounted ConfigMap; pools.yaml agrees with the rest
    args = router.get("command", []) + router.get("args", [])
    cfg_path = args[args.index("--config") + 1] if "--config" in args else None
    pools = None
    vols = {v["name"]: v for v in router_tpl["spec"].get("volumes", [])}
    for m in router.get("volumeMounts", []):
        cm = vols.get(m["name"], {}).get("configMap")
        if cm and cfg_path and cfg_path.startswith(m["mountPath"].rstrip("/") + "/"):
            rel = cfg_path[len(m["mountPath"].rstrip("/")) + 1:]
            items = {i["path"]: i["key"] for i in cm.get("items", [])} or {k: k for k in configmaps.get(cm["name"], {})}
            if rel in items and items[rel] in configmaps.get(cm["name"], {}):
                pools = yaml.safe_load(configmaps[cm["name"]][items[rel]])
    if pools is None:
        problems.append(f"router --config {cfg_path} is not a file of a mounted ConfigMap")
        return problems
    for key in ("model", "pools", "router"):
        if key not in pools:
            problems.append(f"pools.yaml has no {key!r}")
    if pools.get("router", {}).get("port") != target:
        problems.append(f"pools.yaml router.port {pools.get('router', {}).get('port')} != router containerPort {target}")
    address = args[args.index("--address") + 1] if "--address" in args else ""
    head = ray["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    if address != f"ray://{ray['metadata']['name']}-head-svc:10001" or _port(head, "client") != 10001:
        problems.append(f"router --address {address!r} is not the RayCluster's head service Ray Client port")
    groups = {g["groupName"]: g for g in ray["spec"].get("workerGroupSpecs", [])}
    for role in ("prefill", "decode"):
        g, pool = groups.get(role), pools.get("pools", {}).get(role)
        if g is None or pool is None:
            problems.append(f"{role}: missing RayCluster worker group or pools.yaml pool")
            continue
        if not g.get("minReplicas", 0) <= g.get("replicas", 0) <= g.get("maxReplicas", 0):
            problems.append(f"{role}: replicas outside [minReplicas, maxReplicas]")
        res = g["template"]["spec"]["containers"][0]["resources"]
        gpus = int(res.get("limits", {}).get(GPU, 0))
        if str(res.get("requests", {}).get(GPU, gpus)) != str(gpus):
            problems.append(f"{role}: GPU requests != limits")
        par = pool.get("parallel", {})
        ranks = par.get("tp", 1) * par.get("dp", 1) * pool.get("instances", 1)
        if gpus and g["replicas"] * gpus != ranks:
            problems.append(f"{role}: {g['replicas']} pods x {gpus} GPUs != tp*dp*instances = {ranks} ranks")
        if not gpus:  # CPU: one rank per Ray CPU slot
            slots = g["replicas"] * int(g.get("rayStartParams", {}).get("num-cpus", 0))
            if slots < ranks:
                problems.append(f"{role}: {slots} Ray CPU slots < {ranks} ranks")
    return problems


def hardening_problems(objs: list[dict]) -> list[str]:
    problems = []
    for obj in objs:
        for owner, tpl in _pod_templates(obj):
            for c in tpl["spec"]["containers"] + tpl["spec"].get("initContainers", []):
                where = f"{obj['kind']}/{obj['metadata']['name']}/{owner}/{c['name']}"
                sc = c.get("securityContext", {})
                if sc.get("privileged", False) or sc.get("allowPrivilegeEscalation", True):
                    problems.append(f"{where}: privileged or may escalate privileges")
                res = c.get("resources", {})
                for kind_values in res.values():
                    for r, q in kind_values.items():
                        if not QUANTITY.match(str(q)):
                            problems.append(f"{where}: {r} {q!r} is not a quantity")
                for kind in ("requests", "limits"):
                    for r in ("cpu", "memory"):
                        if r not in res.get(kind, {}):
                            problems.append(f"{where}: no {kind}.{r}")
                if tpl["spec"].get("hostNetwork") or tpl["spec"].get("hostPID"):
                    problems.append(f"{where}: host namespaces")
    return problems


# ---------------------------------------------------------------- tests

@pytest.fixture(scope="module", params=KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(K8S.parent)))
def rendered(request) -> list[dict]:
    return render(request.param)


def test_schemas(rendered):
    assert schema_problems(rendered) == []


def test_cross_references(rendered):
    assert crossref_problems(rendered) == []


def test_hardening(rendered):
    assert hardening_problems(rendered) == []


def test_expected_objects(rendered):
    kinds = sorted(o["kind"] for o in rendered)
    assert kinds == ["ConfigMap", "Deployment", "Namespace", "RayCluster", "Service", "ServiceMonitor"]
    assert {c["image"] for o in rendered for c in _containers(o)} == {"pdserve:latest"}
    ray = _one(rendered, "RayCluster")
    assert [g["groupName"] for g in ray["spec"]["workerGroupSpecs"]] == ["prefill", "decode"]


def test_deepseek_sizing():
    """The default deployment is one DeepSeek prefill unit (4 x 8 GPUs) and one decode unit (40 x 8)."""
    objs = render(K8S)
    groups = {g["groupName"]: g for g in _one(objs, "RayCluster")["spec"]["workerGroupSpecs"]}
    for role, nodes in (("prefill", 4), ("decode", 40)):
        g = groups[role]
        assert g["replicas"] == g["minReplicas"] == g["maxReplicas"] == nodes
        assert g["template"]["spec"]["containers"][0]["resources"]["limits"][GPU] == str(GPUS_PER_NODE)
    pools = yaml.safe_load(_one(objs, "ConfigMap", "pdserve-pools")["data"]["pools.yaml"])["pools"]
    prefill, decode = pools["prefill"]["parallel"], pools["decode"]["parallel"]
    assert (prefill["tp"], prefill["dp"], prefill["ep"], prefill["num_redundant_experts"]) == (4, 8, 32, 32)
    assert (decode["tp"], decode["dp"], decode["ep"]) == (4, 80, 320)


def test_pools_config_loads(rendered):
    """The ConfigMap's pools.yaml is accepted by `pdserve up`'s own config parser."""
    config = pytest.importorskip("deploy.config")
    raw = yaml.safe_load(_one(rendered, "ConfigMap", "pdserve-pools")["data"]["pools.yaml"])
    cfg = config.parse_config(raw, source="pools.yaml")
    assert set(cfg.pools) == {"prefill", "decode"}


def test_cpu_overlay_has_no_gpus():
    objs = render(K8S / "overlays" / "cpu-local")
    assert not any(GPU in json.dumps(c.get("resources", {})) for o in objs for c in _containers(o))
    assert not any("persistentVolumeClaim" in v for o in objs for _, t in _pod_templates(o)
                   for v in t["spec"].get("volumes", []))


def _kustomize_cli() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@pytest.mark.skipif(_kustomize_cli() is None, reason="neither kustomize nor kubectl on PATH; "
                    "the Python renderer above still covers the kustomizations")
@pytest.mark.parametrize("path", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(K8S.parent)))
def test_renderer_matches_kustomize(path):
    out = subprocess.run(_kustomize_cli() + [str(path)], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    real = sorted((d for d in yaml.safe_load_all(out.stdout) if d), key=_key)
    assert real == sorted(render(path), key=_key)


def test_images_override(tmp_path):
    """An overlay's `images:` reaches every container (the documented way to set the image)."""
    overlay = tmp_path / "ov"
    shutil.copytree(K8S / "base", tmp_path / "base")
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": ["../base"],
        "images": [{"name": "pdserve", "newName": "registry.example.com/pdserve", "newTag": "0.1.0"}]}))
    objs = render(overlay)
    assert {c["image"] for o in objs for c in _containers(o)} == {"registry.example.com/pdserve:0.1.0"}
    cli = _kustomize_cli()
    if cli:
        out = subprocess.run(cli + [str(overlay)], capture_output=True, text=True, timeout=120, check=False)
        assert out.returncode == 0, out.stderr
        assert sorted((d for d in yaml.safe_load_all(out.stdout) if d), key=_key) == sorted(objs, key=_key)


def _break(objs, kind, fn):
    objs = copy.deepcopy(objs)
    fn(next(o for o in objs if o["kind"] == kind))
    return objs


BROKEN = {
    # name: (kind to break, how, which check must notice, expected text in a problem)
    "deployment unknown field": ("Deployment", lambda o: o["spec"].update(replica=2), schema_problems, "replica"),
    "port as text": ("Service", lambda o: o["spec"]["ports"][0].update(port="8000"), schema_problems, "8000"),
    "bad memory quantity": ("Deployment", lambda o: o["spec"]["template"]["spec"]["containers"][0]["resources"]
                            ["limits"].update(memory="16 GB"), hardening_problems, "not a quantity"),
    "worker group without name": ("RayCluster", lambda o: o["spec"]["workerGroupSpecs"][0].pop("groupName"),
                                  schema_problems, "groupName"),
    "ray pod template typo": ("RayCluster", lambda o: o["spec"]["workerGroupSpecs"][1]["template"]["spec"]
                              ["containers"][0].update(volumeMount=[]), schema_problems, "decode"),
    "servicemonitor bad interval": ("ServiceMonitor", lambda o: o["spec"]["endpoints"][0].update(interval="15 sec"),
                                    schema_problems, "15 sec"),
    "service selects nothing": ("Service", lambda o: o["spec"]["selector"].update({"app.kubernetes.io/name": "x"}),
                                crossref_problems, "selector"),
    "service wrong target port": ("Service", lambda o: o["spec"]["ports"][0].update(targetPort=9000),
                                  crossref_problems, "targets no router container port"),
    "servicemonitor selects nothing": ("ServiceMonitor", lambda o: o["spec"]["selector"]["matchLabels"].update(
        {"app.kubernetes.io/component": "nope"}), crossref_problems, "does not select"),
    "configmap renamed": ("ConfigMap", lambda o: o["metadata"].update(name="pools"), crossref_problems,
                          "missing ConfigMap"),
    "pools port differs": ("ConfigMap", lambda o: o["data"].update(
        {"pools.yaml": o["data"]["pools.yaml"].replace("port: 8000", "port: 9000")}), crossref_problems, "router.port"),
    "decode undersized": ("RayCluster", lambda o: o["spec"]["workerGroupSpecs"][1].update(
        replicas=39, minReplicas=39), crossref_problems, "decode"),
    "liveness elsewhere": ("Deployment", lambda o: o["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]
                           ["httpGet"].update(path="/"), crossref_problems, "livenessProbe"),
    "privileged": ("RayCluster", lambda o: o["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
                   ["securityContext"].update(privileged=True), hardening_problems, "privileged"),
    "no limits": ("Deployment", lambda o: o["spec"]["template"]["spec"]["containers"][0]["resources"].pop("limits"),
                  hardening_problems, "limits.cpu"),
}


@pytest.mark.parametrize("name", BROKEN)
def test_broken_manifest_is_caught(name):
    kind, how, check, expected = BROKEN[name]
    good = render(K8S)
    assert check(good) == []
    problems = check(_break(good, kind, how))
    assert any(expected in p for p in problems), problems
