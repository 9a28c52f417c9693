"""deploy/helm/vllm-inference-api: every values example (default, LoRA, autoscaling, multi-node, PD) is
linted in strict mode and rendered by a real Helm (helm-python-sdk: Helm's Go SDK, no binary, no
cluster), every manifest is validated against the Kubernetes 1.37 schemas (kubernetes-validate
--strict; the pod templates inside LeaderWorkerSets as Pods), and what the manifests ask of the
programs is checked against the programs: the replicas' engine flags with vLLM's own parser (through
the image's own flag builder), the router's arguments with vllm-router's parser, the drain budget
with the launcher's timings."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import helm_python as helm
import pytest
import yaml
from deploy_tools import ROOT, tool
from vllm_router.launch_router import parse_router_args

from app.engines.vllm import build_command
from app.launcher import ENGINE_STOP_TIMEOUT, LEFTOVER_GRACE
from app.lora.adapter import ALLOWED_RANKS
from app.lora.config import build_plan, parse_config
from app.server import server_config
from app.settings import ENV_NAMES, Settings
from scripts import fleet

CHART = ROOT / "deploy" / "helm" / "vllm-inference-api"
EXAMPLES = {p.stem: p for p in sorted((CHART / "examples").glob("*.yaml"))}
NAMESPACE = "llm"
CORE_KINDS = {
    "ConfigMap",
    "Deployment",
    "StatefulSet",
    "Service",
    "ServiceAccount",
    "Role",
    "RoleBinding",
    "PersistentVolumeClaim",
    "PodDisruptionBudget",
    "HorizontalPodAutoscaler",
}
CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"),
}
WORKLOADS = {"Deployment", "StatefulSet", "LeaderWorkerSet"}
SECRET_SETTINGS = {"HF_TOKEN", "API_KEY", "ADMIN_API_KEY", "METRICS_API_KEY"}
PENDING_SETTINGS = {"MODEL_PROFILE"}
"""Settings the chart maps that another issue adds to app/settings.py (issue 16: model profiles)."""


def values_of(example: str) -> dict:
    return yaml.safe_load(EXAMPLES[example].read_text()) or {}


def render(values: dict) -> list[dict]:
    chart = helm.Chart.load(str(CHART))
    out = chart.render(values, name="api", namespace=NAMESPACE)
    return [
        doc
        for name, text in out.items()
        if not name.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(values_of(name)) for name in EXAMPLES}


def kind(docs: list[dict], k: str) -> list[dict]:
    return [d for d in docs if d["kind"] == k]


def one(docs: list[dict], k: str, name_suffix: str = "") -> dict:
    (doc,) = [d for d in docs if d["kind"] == k and d["metadata"]["name"].endswith(name_suffix)]
    return doc


def pod_templates(docs: list[dict]) -> list[tuple[str, dict]]:
    """(role, pod template) of every workload; a LeaderWorkerSet gives its leader and worker."""
    out = []
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            tpl = d["spec"]["template"]
            out.append((tpl["metadata"]["labels"]["app.kubernetes.io/component"], tpl))
        elif d["kind"] == "LeaderWorkerSet":
            lwt = d["spec"]["leaderWorkerTemplate"]
            out += [("replica", lwt["leaderTemplate"]), ("ray-worker", lwt["workerTemplate"])]
    return out


def serving(docs: list[dict]) -> list[tuple[str, dict]]:
    return [(role, tpl) for role, tpl in pod_templates(docs) if role not in ("router", "ray-worker")]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def plain_env(container: dict) -> dict[str, str]:
    """The plain values of a container's env (not those from Secrets)."""
    return {name: e["value"] for name, e in env_of(container).items() if "value" in e}


def settings_from(container: dict) -> Settings:
    return Settings(**{name: v for name, v in plain_env(container).items() if name in ENV_NAMES})


def replica_env(docs: list[dict]) -> dict[str, str]:
    """The plain values of the replica container's env."""
    (container,) = one(docs, "Deployment", "-api")["spec"]["template"]["spec"]["containers"]
    return plain_env(container)


def engine_start(env: dict[str, str], volume: Path, **more: str) -> tuple[list[str], object]:
    """What the image's launcher makes of a replica's env: its Settings, the LoRA start plan
    (app/lora/config.py `build_plan`: every adapter resolved and checked) and the engine command.
    The replica's volume `/data` is `volume` here (a plain prefix swap in the values)."""
    values = {k: v.replace("/data/", f"{volume}/") for k, v in env.items() if k in ENV_NAMES}
    settings = Settings(**{**values, **more})
    plan = build_plan(settings)
    return build_command(settings, settings.MODEL_NAME, lora=plan), plan


@pytest.fixture(scope="module")
def volume(tmp_path_factory) -> Path:
    """A replica's /data with the adapters the LoRA example names (tiny random ones, two ranks)."""
    from scripts.tiny_adapters import build_adapter

    root = tmp_path_factory.mktemp("data")
    build_adapter(root / "adapters" / "sql-lora", 8, seed=1)
    build_adapter(root / "adapters" / "support-lora", 16, seed=2)
    build_adapter(root / "adapters-dir" / "alpha", 8, seed=3)
    return root


# --- Helm: lint and render -------------------------------------------------------------------------


@pytest.mark.parametrize("example", EXAMPLES)
def test_every_example_lints_clean_in_strict_mode(example):
    report = helm.lint(str(CHART), values_of(example), strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_the_examples_are_the_five_the_readme_names():
    assert set(EXAMPLES) == {"default", "lora", "autoscaling", "multinode", "pd"}


@pytest.mark.parametrize(
    "bad",
    [
        {"router": {"policy": "least_busy"}},
        {"persistence": {"mode": "somewhere"}},
        {"replicaCuont": 3},
        {"model": {"name": ""}},
        {"env": {"lower_case": "x"}},
        {"lora": {"modules": [{"name": "a=b", "path": "/x"}]}},
        {"lora": {"maxRank": 24}},
        {"lora": {"modules": [{"name": "a/b", "path": "/x"}]}},
        {"lora": {"modules": [{"name": "a", "path": "./adapters/a"}]}},
        {"lora": {"modules": [{"name": "a", "path": "org/repo/sub"}]}},
        {"lora": {"modules": [{"name": "a", "path": "/x", "rank": 8}]}},
        {"lora": {"dir": "adapters"}},
        {"lora": {"configFile": {"lora_settings": {"max_lora_rank": 24}}}},
        {"lora": {"configFile": {"adapters": []}}},
    ],
)
def test_the_values_schema_refuses_bad_values(bad):
    with pytest.raises(helm.HelmValuesError):
        render(bad)


def test_combinations_the_chart_cannot_serve_fail_with_a_sentence():
    for values, words in [
        ({"multiNode": {"enabled": True}, "disaggregation": {"enabled": True}}, "cannot be combined"),
        ({"autoscaling": {"enabled": True}, "disaggregation": {"enabled": True}}, "not with disaggregation"),
        ({"multiNode": {"enabled": True}, "persistence": {"mode": "perPod"}}, "perPod is not supported"),
        ({"lora": {"enabled": True}}, "lora.enabled serves no adapter"),
        ({"lora": {"enabled": True, "runtimeUpdates": False}}, "lora.enabled serves no adapter"),
        ({"lora": {"enabled": True, "config": "/data/l.yaml", "configFile": {"auto_load": []}}}, "not both"),
        ({"lora": {"enabled": True, "runtimeUpdates": True, "maxLoras": 4, "maxCpuLoras": 2}}, "at least"),
    ]:
        with pytest.raises(helm.HelmRenderError, match=words):
            render(values)


# --- Kubernetes schemas ------------------------------------------------------------------------------


def kubernetes_validate(docs: list[dict], folder: Path) -> subprocess.CompletedProcess:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, doc in enumerate(docs):
        path = folder / f"{i:02d}-{doc['kind']}.yaml"
        path.write_text(yaml.safe_dump(doc))
        files.append(str(path))
    return subprocess.run(
        [tool("kubernetes-validate"), "--strict", *files], capture_output=True, text=True, timeout=120
    )


def as_pods(docs: list[dict]) -> list[dict]:
    """The pod templates of custom workloads (LeaderWorkerSet), as Pods the schemas know."""
    return [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"{role}-template", **tpl["metadata"]},
            "spec": tpl["spec"],
        }
        for d in docs
        if d["kind"] == "LeaderWorkerSet"
        for role, tpl in pod_templates([d])
    ]


@pytest.mark.parametrize("example", EXAMPLES)
def test_every_manifest_is_valid_against_the_kubernetes_schemas(example, rendered, tmp_path):
    docs = rendered[example]
    core = [d for d in docs if d["kind"] in CORE_KINDS]
    custom = [d for d in docs if d["kind"] not in CORE_KINDS]
    assert {(d["apiVersion"], d["kind"]) for d in custom} <= CUSTOM_KINDS
    result = kubernetes_validate(core + as_pods(docs), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Couldn't find schema" not in result.stdout + result.stderr  # each one was checked
    assert result.stdout.count(" passed ") == len(core + as_pods(docs))


def test_kubernetes_validate_refuses_an_unknown_field(rendered, tmp_path):
    deployment = json.loads(json.dumps(one(rendered["default"], "Deployment", "-api")))
    deployment["spec"]["template"]["spec"]["containers"][0]["gpus"] = 1
    result = kubernetes_validate([deployment], tmp_path)
    assert result.returncode != 0


# --- the replicas ------------------------------------------------------------------------------------


def flags(argv: list[str]) -> list[str]:
    """vLLM's own CLI arguments of the engine command (after `python -m module`)."""
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    return argv[3:]


def vllm_args(argv: list[str]):
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser()).parse_args(flags(argv))


@pytest.mark.parametrize("example", EXAMPLES)
def test_the_replicas_engine_flags_are_accepted_by_vllms_parser(example, rendered, volume):
    parsed = {}
    for role, tpl in serving(rendered[example]):
        (container,) = tpl["spec"]["containers"]
        env = plain_env(container)
        assert "lora" not in env.get("ENGINE_EXTRA_ARGS", "")  # LoRA goes through the image's settings
        argv, _ = engine_start(env, volume)
        parsed[role] = vllm_args(argv)
    assert parsed
    if example == "lora":
        args = parsed["replica"]
        assert args.enable_lora and args.max_lora_rank == 16 and args.max_loras == 4
        assert args.max_cpu_loras == 8
        assert {m.name: m.path for m in args.lora_modules} == {
            "sql": f"{volume}/adapters/sql-lora",
            "support": f"{volume}/adapters/support-lora",
        }
    if example == "multinode":
        args = parsed["replica"]
        assert (args.tensor_parallel_size, args.pipeline_parallel_size) == (8, 2)
        assert args.distributed_executor_backend == "ray"
    if example == "pd":
        assert set(parsed) == {"prefill", "decode"}
        for args in parsed.values():
            config = args.kv_transfer_config
            assert config.kv_connector == "NixlConnector" and config.kv_role == "kv_both"


@pytest.mark.parametrize("example", EXAMPLES)
def test_the_replicas_env_is_the_images_settings_and_keys_come_from_secrets(example, rendered):
    for role, tpl in pod_templates(rendered[example]):
        if role == "router":
            continue
        for container in tpl["spec"]["containers"]:
            for name, entry in env_of(container).items():
                known = (
                    name in ENV_NAMES
                    or name in PENDING_SETTINGS
                    or name.startswith("VLLM_")
                    or name == "POD_IP"
                )
                assert known, (example, name)
                if name in SECRET_SETTINGS:
                    assert "value" not in entry and entry["valueFrom"]["secretKeyRef"]["name"], (
                        example,
                        name,
                    )


def test_secrets_are_referenced_only_when_named(rendered):
    env = env_of(one(rendered["default"], "Deployment", "-api")["spec"]["template"]["spec"]["containers"][0])
    assert SECRET_SETTINGS & set(env) == {"HF_TOKEN"}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "HF_TOKEN"}


@pytest.mark.parametrize("example", EXAMPLES)
def test_probes_fit_a_multi_minute_load_and_the_drain_fits_the_grace_period(example, rendered):
    """Startup waits for the proxy (/ping answers from the first second, 204 while loading), readiness
    is /health; Kubernetes kills the pod only after preStop, the drain grace, DRAIN_TIMEOUT and the
    engine's stop; the grace covers the router's health check."""
    for role, tpl in serving(rendered[example]):
        spec = tpl["spec"]
        (container,) = spec["containers"]
        assert container["startupProbe"]["httpGet"]["path"] == "/ping"
        assert container["readinessProbe"]["httpGet"]["path"] == "/health"
        assert "livenessProbe" not in container  # /ping is 503 while draining: it would kill the drain
        settings = settings_from(container)
        pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert pre_stop > 0
        graceful = server_config(None, "127.0.0.1", 1, 1).timeout_graceful_shutdown
        stops = graceful + ENGINE_STOP_TIMEOUT + LEFTOVER_GRACE
        budget = pre_stop + settings.DRAIN_GRACE_SECONDS + settings.DRAIN_TIMEOUT + stops
        assert spec["terminationGracePeriodSeconds"] > budget, role
        router = parse_router_args(router_container(rendered[example])["args"])
        detection = router.health_check_interval_secs * max(router.health_failure_threshold, 3)
        assert detection + router.health_check_timeout_secs <= settings.DRAIN_GRACE_SECONDS


# --- the router ---------------------------------------------------------------------------------------


def router_container(docs: list[dict]) -> dict:
    (container,) = one(docs, "Deployment", "-router")["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("example", EXAMPLES)
def test_the_router_discovers_exactly_the_serving_pods_of_this_release(example, rendered):
    docs = rendered[example]
    container = router_container(docs)
    assert container["command"] == ["vllm-router"]
    args = parse_router_args(container["args"])
    args._validate_router_args()
    assert args.service_discovery and args.service_discovery_namespace == NAMESPACE
    assert args.service_discovery_port == 8000
    labels = {role: tpl["metadata"]["labels"] for role, tpl in pod_templates(docs)}

    def matches(selector: dict, role: str) -> bool:
        return all(labels[role].get(k) == v for k, v in selector.items())

    if example == "pd":
        assert args.vllm_pd_disaggregation
        assert [r for r in labels if matches(args.prefill_selector, r)] == ["prefill"]
        assert [r for r in labels if matches(args.decode_selector, r)] == ["decode"]
    else:
        assert not args.vllm_pd_disaggregation
        assert [r for r in labels if matches(args.selector, r)] == ["replica"]  # not Ray workers, not itself
    assert args.host == "0.0.0.0" and args.prometheus_host == "0.0.0.0"
    pod = one(docs, "Deployment", "-router")["spec"]["template"]["spec"]
    binding = one(docs, "RoleBinding", "-router")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": pod["serviceAccountName"], "namespace": NAMESPACE}
    ]
    (rule,) = one(docs, "Role", "-router")["rules"]
    assert rule["resources"] == ["pods"] and {"list", "watch"} <= set(rule["verbs"])


def test_the_router_checks_health_and_retries_as_make_fleet_does(rendered):
    args = parse_router_args(router_container(rendered["default"])["args"])
    expected = parse_router_args(["--worker-urls", "http://x:1", *fleet.router_flags()])
    for flag in fleet.router_flags()[::2]:
        attr = flag.removeprefix("--").replace("-", "_")
        assert getattr(args, attr) == getattr(expected, attr), flag
    assert args.policy == fleet.DEFAULT_POLICY


def test_the_router_policy_comes_from_values():
    args = parse_router_args(router_container(render({"router": {"policy": "power_of_two"}}))["args"])
    assert args.policy == "power_of_two"


# --- discovery, scraping, dashboards -----------------------------------------------------------------


def test_the_headless_service_and_the_service_monitors_reach_every_replica_and_the_router(rendered):
    docs = rendered["autoscaling"]  # the example with serviceMonitor.enabled
    headless = one(docs, "Service", "-replicas")
    assert headless["spec"]["clusterIP"] == "None"
    (_, tpl) = serving(docs)[0]
    assert all(tpl["metadata"]["labels"].get(k) == v for k, v in headless["spec"]["selector"].items())
    router_service = one(docs, "Service", "-router")
    monitors = {m["metadata"]["name"].rsplit("-", 1)[-1]: m for m in kind(docs, "ServiceMonitor")}
    assert set(monitors) == {"replicas", "router"}
    for service, monitor, job in (
        (headless, monitors["replicas"], "vllm-api"),
        (router_service, monitors["router"], "vllm-router"),
    ):
        spec = monitor["spec"]
        labels = service["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in spec["selector"]["matchLabels"].items())
        assert labels[spec["jobLabel"]] == job  # the Grafana dashboard's job names
        (endpoint,) = spec["endpoints"]
        assert (
            endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
            and endpoint["path"] == "/metrics"
        )
    assert kind(rendered["default"], "ServiceMonitor") == []  # off unless asked (needs the operator's CRD)


def test_the_dashboard_configmap_is_the_repos_grafana_dashboard(rendered):
    repo = ROOT / "monitoring" / "grafana" / "dashboards" / "vllm-inference-api.json"
    assert (CHART / "dashboards" / "vllm-inference-api.json").read_bytes() == repo.read_bytes()
    configmap = one(rendered["default"], "ConfigMap", "-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["vllm-inference-api.json"]) == json.loads(repo.read_text())


# --- scaling, disruption, storage ----------------------------------------------------------------------


def workload(docs: list[dict]) -> dict:
    (w,) = [d for d in docs if d["kind"] in WORKLOADS and not d["metadata"]["name"].endswith("-router")]
    return w


def test_keda_scales_the_replicas_on_the_engines_queue(rendered):
    docs = rendered["autoscaling"]
    target = workload(docs)
    assert target["kind"] == "StatefulSet" and "replicas" not in target["spec"]  # the autoscaler owns it
    scaled = one(docs, "ScaledObject")
    ref = scaled["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == (
        "apps/v1",
        "StatefulSet",
        target["metadata"]["name"],
    )
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    query = trigger["metadata"]["query"]
    assert query.startswith("sum(vllm:num_requests_waiting{") and f'namespace="{NAMESPACE}"' in query
    assert f'service="{one(docs, "Service", "-replicas")["metadata"]["name"]}"' in query
    assert trigger["metadata"]["threshold"] == "4"


def test_the_hpa_variant_scales_on_the_same_queue_through_the_custom_metrics_api(tmp_path):
    docs = render(
        {
            **values_of("autoscaling"),
            "autoscaling": {**values_of("autoscaling")["autoscaling"], "type": "hpa"},
        }
    )
    hpa = one(docs, "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == "vllm_num_requests_waiting"
    assert hpa["spec"]["scaleTargetRef"]["name"] == workload(docs)["metadata"]["name"]
    assert kubernetes_validate([hpa], tmp_path).returncode == 0
    lws = render({**values_of("multinode"), "autoscaling": {"enabled": True, "type": "hpa"}})
    assert one(lws, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]["kind"] == "LeaderWorkerSet"


@pytest.mark.parametrize("example", EXAMPLES)
def test_a_disruption_budget_covers_each_serving_workload(example, rendered):
    docs = rendered[example]
    budgets = kind(docs, "PodDisruptionBudget")
    for role, tpl in serving(docs):
        labels = tpl["metadata"]["labels"]
        covering = [
            b
            for b in budgets
            if all(labels.get(k) == v for k, v in b["spec"]["selector"]["matchLabels"].items())
        ]
        assert len(covering) == 1 and covering[0]["spec"]["maxUnavailable"] == 1, (example, role)


def test_persistence_shared_per_pod_or_none():
    def data_volume(docs):
        spec = workload(docs)["spec"]
        return (
            next(v for v in spec["template"]["spec"].get("volumes", []) if v["name"] == "data")
            if "template" in spec
            else None
        )

    shared = render({})
    claim = one(shared, "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert data_volume(shared)["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    existing = render({"persistence": {"mode": "shared", "existingClaim": "models"}})
    assert kind(existing, "PersistentVolumeClaim") == []
    assert data_volume(existing)["persistentVolumeClaim"]["claimName"] == "models"
    per_pod = render({"persistence": {"mode": "perPod", "size": "50Gi"}})
    statefulset = workload(per_pod)
    assert statefulset["kind"] == "StatefulSet" and kind(per_pod, "PersistentVolumeClaim") == []
    (template,) = statefulset["spec"]["volumeClaimTemplates"]
    assert (
        template["metadata"]["name"] == "data"
        and template["spec"]["resources"]["requests"]["storage"] == "50Gi"
    )
    assert statefulset["spec"]["serviceName"] == one(per_pod, "Service", "-replicas")["metadata"]["name"]
    assert data_volume(render({"persistence": {"mode": "none"}}))["emptyDir"] == {}


def test_gpus_node_selectors_and_tolerations_reach_every_pod_that_needs_a_gpu(rendered):
    for example in ("autoscaling", "multinode"):
        values = values_of(example)
        for role, tpl in pod_templates(rendered[example]):
            if role == "router":
                continue
            spec = tpl["spec"]
            (container,) = spec["containers"]
            count = values.get("gpu", {}).get("count", 1)
            assert container["resources"]["limits"]["nvidia.com/gpu"] == str(count), (example, role)
            assert spec.get("tolerations") == values["tolerations"], (example, role)
            assert spec.get("nodeSelector") == values.get("nodeSelector"), (example, role)
            claims = [
                c["metadata"]["name"]
                for c in workload(rendered[example])["spec"].get("volumeClaimTemplates", [])
            ]
            assert sorted([v["name"] for v in spec["volumes"]] + claims) == ["data", "shm"], (example, role)


# --- multi-node and disaggregation --------------------------------------------------------------------


def test_multi_node_leader_runs_the_stack_after_the_ray_group_forms_workers_join_it(rendered):
    from scripts import ray_node

    lws = one(rendered["multinode"], "LeaderWorkerSet")
    group = lws["spec"]["leaderWorkerTemplate"]
    assert group["size"] == 2 and group["restartPolicy"] == "RecreateGroupOnPodRestart"
    leader = group["leaderTemplate"]["spec"]["containers"][0]["command"]
    worker = group["workerTemplate"]["spec"]["containers"][0]["command"]
    assert leader[:2] == worker[:2] == ["python3", "/app/scripts/ray_node.py"]
    assert leader[2:] == ["leader", "--nodes", "2", "--port", "6379"]
    assert worker[2:] == ["worker", "--leader", "$(LWS_LEADER_ADDRESS)", "--port", "6379"]  # set by LWS
    assert (ROOT / "scripts" / "ray_node.py").exists() and callable(ray_node.main)


def test_disaggregation_side_channel_listens_on_the_pod_ip(rendered):
    docs = rendered["pd"]
    for role in ("prefill", "decode"):
        (container,) = one(docs, "Deployment", f"-{role}")["spec"]["template"]["spec"]["containers"]
        env = env_of(container)
        assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        assert env["VLLM_NIXL_SIDE_CHANNEL_HOST"]["value"] == "$(POD_IP)"
        port = int(env["VLLM_NIXL_SIDE_CHANNEL_PORT"]["value"])
        assert port in {p["containerPort"] for p in container["ports"]}
    assert one(docs, "Deployment", "-decode")["spec"]["replicas"] == 2


# --- LoRA: the chart's `lora.*` are the image's LoRA settings ----------------------------------------

LORA_SETTINGS = {
    "LORA_MODULES",
    "LORA_DIR",
    "LORA_CONFIG",
    "LORA_DYNAMIC",
    "MAX_LORAS",
    "MAX_CPU_LORAS",
    "MAX_LORA_RANK",
}


def plan_summary(plan) -> tuple:
    return (
        plan.enabled,
        plan.dynamic,
        plan.max_lora_rank,
        plan.max_loras,
        plan.max_cpu_loras,
        [(a.name, a.path, a.origin, a.at_start, a.base_model_name) for a in plan.adapters],
        plan.engine_env(),
    )


def test_the_lora_example_starts_the_engine_as_the_docker_run_lora_env_does(rendered, volume):
    """The chart's env for examples/lora.yaml, read by the image's own Settings and LoRA planner,
    gives the same engine command, engine env and adapter plan as the same replica started the
    `docker run` way (the example without lora.*, plus the LoRA settings by hand, as name=path pairs)."""
    chart = replica_env(rendered["lora"])
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in chart  # the image sets it from LORA_DYNAMIC
    assert "ENGINE_EXTRA_ARGS" not in chart
    without_lora = values_of("lora") | {"lora": {"enabled": False}}
    docker = replica_env(render(without_lora))
    assert not LORA_SETTINGS & set(docker)
    docker |= {
        "LORA_MODULES": "sql=/data/adapters/sql-lora,support=/data/adapters/support-lora",
        "MAX_LORA_RANK": "16",
        "MAX_LORAS": "4",
        "MAX_CPU_LORAS": "8",
        "LORA_DYNAMIC": "true",
    }
    chart_argv, chart_plan = engine_start(chart, volume)
    docker_argv, docker_plan = engine_start(docker, volume)
    assert chart_argv == docker_argv
    assert plan_summary(chart_plan) == plan_summary(docker_plan)
    assert chart_plan.enabled and chart_plan.engine_env() == {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true"}
    assert [(a.name, a.info.rank) for a in chart_plan.adapters] == [("sql", 8), ("support", 16)]
    args = vllm_args(chart_argv)
    assert (args.enable_lora, args.max_lora_rank, args.max_loras, args.max_cpu_loras) == (True, 16, 4, 8)


def test_a_hub_adapter_with_a_base_model_name_is_fetched_with_the_secrets_hf_token(
    volume, hf_cache, tmp_path
):
    """An `org/repo@rev` module reaches the launcher, which downloads it with HF_TOKEN (from the
    Secret the chart references) into the model's cache, and vLLM gets its base_model_name. The Hub
    is unreachable here: tests/fake_hub.py stands in for it, through the real huggingface_hub client."""
    from fake_hub import FakeHub

    module = {"name": "math", "path": "org/math-lora@main", "base_model_name": "llama-3.1-8b"}
    values = {
        "model": {"name": "meta-llama/Llama-3.1-8B-Instruct", "servedName": "llama-3.1-8b"},
        "lora": {"enabled": True, "modules": [module]},
        "secrets": {"hfToken": {"name": "hf-token", "key": "HF_TOKEN"}},
    }
    docs = render(values)
    (container,) = one(docs, "Deployment", "-api")["spec"]["template"]["spec"]["containers"]
    assert env_of(container)["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "hf-token",
        "key": "HF_TOKEN",
    }
    env = replica_env(docs)
    assert json.loads(env["LORA_MODULES"]) == [module]
    files = {p.name: p.read_bytes() for p in (volume / "adapters" / "support-lora").iterdir()}
    with FakeHub(tmp_path / "hub") as hub:
        hub.add_repo("org/math-lora", files)
        hub.gate("org/math-lora", "hf_from_the_secret")
        argv, plan = engine_start(env, volume, HF_ENDPOINT=hub.url, HF_TOKEN="hf_from_the_secret")
        assert sorted(hub.downloaded()) == [
            "org/math-lora/adapter_config.json",
            "org/math-lora/adapter_model.safetensors",
        ]
    (spec,) = plan.adapters
    assert Path(spec.path).is_relative_to(hf_cache.resolve()) and spec.info.rank == 16
    assert plan.max_lora_rank == 16  # derived from the adapter, as the image does when maxRank is unset
    (lora_module,) = vllm_args(argv).lora_modules
    assert (lora_module.name, lora_module.path, lora_module.base_model_name) == (
        "math",
        spec.path,
        "llama-3.1-8b",
    )


def test_lora_enabled_with_only_runtime_updates_serves_lora_as_lora_dynamic_does(volume):
    chart = replica_env(render({"lora": {"enabled": True, "runtimeUpdates": True}}))
    argv, plan = engine_start(chart, volume)
    docker_argv, docker_plan = engine_start(replica_env(render({})) | {"LORA_DYNAMIC": "true"}, volume)
    assert (argv, plan_summary(plan)) == (docker_argv, plan_summary(docker_plan))
    assert plan.enabled and plan.dynamic and plan.adapters == []
    assert vllm_args(argv).enable_lora


def test_lora_config_content_is_a_mounted_configmap_and_lora_dir_a_folder_on_the_volume(volume, tmp_path):
    """lora.configFile becomes a ConfigMap mounted where LORA_CONFIG points (its checksum on the pod,
    so a change rolls the replicas); the image parses the mounted file and LORA_DIR as usual."""
    config = {
        "base_model": {"model_name": "llama-3.1-8b"},
        "lora_adapters": [
            {"name": "sql", "path": "/data/adapters/sql-lora", "description": "SQL"},
            {"name": "support", "path": "/data/adapters/support-lora"},
        ],
        "lora_settings": {"max_loras": 2, "enable_dynamic_loading": True, "cache_size": 4},
        "auto_load": ["sql"],
    }
    values = {
        "model": {"name": "meta-llama/Llama-3.1-8B-Instruct", "servedName": "llama-3.1-8b"},
        "lora": {"enabled": True, "configFile": config, "dir": "/data/adapters-dir"},
    }
    docs = render(values)
    cm = one(docs, "ConfigMap", "-lora-config")
    template = one(docs, "Deployment", "-api")["spec"]["template"]
    (container,) = template["spec"]["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "lora-config"]
    (vol,) = [v for v in template["spec"]["volumes"] if v["name"] == "lora-config"]
    assert vol["configMap"]["name"] == cm["metadata"]["name"] and mount["readOnly"]
    env = replica_env(docs)
    (key,) = cm["data"]
    assert env["LORA_CONFIG"] == f"{mount['mountPath']}/{key}"
    assert env["LORA_DIR"] == "/data/adapters-dir" and "LORA_DYNAMIC" not in env  # the file decides
    assert template["metadata"]["annotations"]["checksum/lora-config"]
    # The replica's mount, here: the ConfigMap's file written where the pod would see it.
    mounted = tmp_path / "etc" / key
    mounted.parent.mkdir()
    mounted.write_text(cm["data"][key].replace("/data/", f"{volume}/"))
    assert parse_config(mounted).settings == config["lora_settings"]
    env["LORA_CONFIG"] = str(mounted)
    argv, plan = engine_start(env, volume)
    assert plan.dynamic and (plan.max_loras, plan.max_cpu_loras, plan.max_lora_rank) == (2, 4, 16)
    assert [(a.name, a.origin, a.at_start) for a in plan.adapters] == [
        ("sql", "config", True),
        ("support", "config", False),
        ("alpha", "dir", True),
    ]
    assert sorted(m.name for m in vllm_args(argv).lora_modules) == ["alpha", "sql"]


def test_lora_config_render_is_valid_against_the_kubernetes_schemas(tmp_path):
    values = {"lora": {"enabled": True, "configFile": {"lora_adapters": [{"name": "a", "path": "org/a"}]}}}
    docs = [d for d in render(values) if d["kind"] in CORE_KINDS]
    assert "ConfigMap" in {d["kind"] for d in docs}
    result = kubernetes_validate(docs, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" passed ") == len(docs)


def test_the_schemas_lora_ranks_are_the_images():
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["lora"]["properties"]
    assert [r for r in schema["maxRank"]["enum"] if r is not None] == list(ALLOWED_RANKS)
    file_rank = schema["configFile"]["properties"]["lora_settings"]["properties"]["max_lora_rank"]
    assert file_rank["enum"] == list(ALLOWED_RANKS)
