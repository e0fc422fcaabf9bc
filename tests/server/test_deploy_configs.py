"""The deployment files in server/ agree with the server they deploy: every YAML parses; the Kubernetes
manifest's flags are flags the server accepts, its probes ask routes the server serves, its ports and
grace periods fit the server's; Prometheus finds the pods the manifest labels and names each replica;
the Grafana dashboard's HAProxy panel asks for series HAProxy exports (tests/server/test_grafana_dashboard.py
checks the server's panels against a live /metrics); the HAProxy config checks
``/health`` and renders for any replica count."""

from __future__ import annotations

import json
import pathlib
import re
import shlex
import subprocess
import time
import urllib.request

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.load_balancer import CONFIG as HAPROXY_CONFIG
from benchmarks.load_balancer import HAProxy, haproxy_binary, render_config
from scalellm_jax.server import ServerConfig, create_app
from scalellm_jax.server.__main__ import engine_options, parse_args
from scalellm_jax.server.shutdown import SETTLE_S

SERVER = pathlib.Path(__file__).resolve().parents[2] / "server"


def documents(path: pathlib.Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def manifest() -> tuple[dict, dict]:
    """(the Deployment, the Service) of server/k8s/scalellm.yaml."""
    kinds = {d["kind"]: d for d in documents(SERVER / "k8s" / "scalellm.yaml")}
    return kinds["Deployment"], kinds["Service"]


def container(deployment: dict) -> dict:
    [only] = deployment["spec"]["template"]["spec"]["containers"]
    return only


def server_args(deployment: dict):
    """The container's server flags, parsed by the server's own parser (a flag it rejects fails here)."""
    c = container(deployment)
    assert c["command"][-2:] == ["-m", "scalellm_jax.server"]
    try:
        return parse_args([str(a) for a in c["args"]])
    except SystemExit:
        pytest.fail(f"the server rejects the manifest's flags: {shlex.join(map(str, c['args']))}")


def served_routes() -> set[str]:
    return {route.resource.canonical for route in create_app(ServerConfig(model_name="m")).router.routes()}



def test_every_yaml_file_parses():
    files = sorted(SERVER.rglob("*.yaml")) + sorted(SERVER.rglob("*.yml"))
    assert {f.name for f in files} >= {"scalellm.yaml", "prometheus.yml", "datasource.yaml", "dashboards.yaml"}
    for path in files:
        assert documents(path), f"{path} is empty"


def test_the_manifests_flags_are_the_servers_and_valid():
    deployment, _ = manifest()
    args = server_args(deployment)
    engine_options(args)  # the engine flags' values pass EngineConfig's checks
    assert args.host == "0.0.0.0", "a pod must listen beyond its loopback for the Service and Prometheus"
    assert args.model.startswith("/"), "the model is a path on a mounted volume"


def test_probes_ask_routes_the_server_serves_on_the_port_it_listens_on():
    deployment, service = manifest()
    c, args = container(deployment), server_args(deployment)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": args.port}
    routes = served_routes()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] in routes, f"{probe} asks {get['path']}, which the server does not serve"
        assert get["port"] in ports or get["port"] == args.port
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"  # the route the graceful drain turns 503
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] in routes and int(annotations["prometheus.io/port"]) == args.port
    [service_port] = service["spec"]["ports"]
    assert service_port["targetPort"] in ports


def test_grace_periods_cover_the_servers_drain():
    deployment, _ = manifest()
    spec, c, args = deployment["spec"]["template"]["spec"], container(deployment), server_args(deployment)
    assert args.shutdown_grace_s == ServerConfig.shutdown_grace_s == parse_args([]).shutdown_grace_s
    [sleep, seconds] = c["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep == "sleep"
    # The kubelet's clock runs from the start of preStop: the pause, the drain, then the server's exit.
    termination = spec["terminationGracePeriodSeconds"]
    assert termination >= float(seconds) + args.shutdown_grace_s + SETTLE_S
    liveness = c["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > termination, \
        "a draining pod (/health 503) could be restarted before it finished"
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "loading Mixtral takes minutes"


def test_one_h200_per_pod_and_the_model_from_a_volume():
    deployment, service = manifest()
    spec, c, args = deployment["spec"]["template"]["spec"], container(deployment), server_args(deployment)
    assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "H200" in spec["nodeSelector"]["nvidia.com/gpu.product"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    [mount] = [path for path in mounts if args.model.startswith(path.rstrip("/") + "/")]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "persistentVolumeClaim" in volumes[mounts[mount]]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["replicas"] >= 2


def test_prometheus_finds_the_pods_and_labels_every_replica():
    [config] = documents(SERVER / "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    deployment, _ = manifest()
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    pods = jobs["scalellm_jax_kubernetes"]
    keep = {tuple(r["source_labels"]): r["regex"] for r in pods["relabel_configs"] if r.get("action") == "keep"}
    assert keep[("__meta_kubernetes_pod_label_app_kubernetes_io_name",)] == labels["app.kubernetes.io/name"]
    assert re.fullmatch(keep[("__meta_kubernetes_pod_annotation_prometheus_io_scrape",)],
                        annotations["prometheus.io/scrape"])
    for name in ("scalellm_jax", "scalellm_jax_kubernetes"):
        assert any(r.get("target_label") == "replica" for r in jobs[name]["relabel_configs"]), name
    # The annotation port rewrites the pod's address, as Prometheus would apply the rule.
    [rule] = [r for r in pods["relabel_configs"] if r.get("target_label") == "__address__"]
    joined = ";".join(["10.1.2.3", annotations["prometheus.io/port"]])
    assert re.sub(f"^(?:{rule['regex']})$", rule["replacement"].replace("$", "\\"), joined) == "10.1.2.3:8000"
    stats_default = re.search(r'SCALELLM_LB_STATS_BIND-([^}"]+)', HAPROXY_CONFIG.read_text()).group(1)
    assert jobs["haproxy"]["static_configs"][0]["targets"] == [stats_default]


def test_haproxy_config_checks_health_and_renders_for_any_replica_count(tmp_path):
    text = HAPROXY_CONFIG.read_text()
    assert render_config(2) == text  # the file as shipped: two replicas
    check = re.search(r"option httpchk GET (\S+)", text).group(1)
    assert check in served_routes() and check == "/health"
    default_bind = re.search(r'SCALELLM_LB_BIND-:(\d+)', text).group(1)
    assert int(default_bind) == parse_args([]).port  # clients keep the port they used for one server
    for count in (1, 3):
        rendered = render_config(count)
        assert re.findall(r"server replica(\d+)", rendered) == [str(k) for k in range(1, count + 1)]
    if haproxy_binary() is None:
        pytest.skip("haproxy is not installed (apt-get install haproxy): its syntax check did not run")
    for count in (1, 3):
        path = tmp_path / f"haproxy-{count}.cfg"
        path.write_text(render_config(count))
        check = subprocess.run([haproxy_binary(), "-c", "-f", str(path)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.skipif(haproxy_binary() is None, reason="haproxy is not installed (apt-get install haproxy)")
def test_the_dashboards_haproxy_series_are_haproxys():
    dashboard = json.loads((SERVER / "grafana" / "scalellm.json").read_text())
    asked = {name for panel in dashboard["panels"] for t in panel.get("targets", [])
             for name in re.findall(r"\bhaproxy_\w+", t["expr"])}
    with HAProxy(["127.0.0.1:1"]) as balancer:  # nothing listens there: the series exist all the same
        deadline, text = time.monotonic() + 10, ""
        while not text:
            try:
                with urllib.request.urlopen(balancer.stats_url + "/metrics", timeout=5) as response:
                    text = response.read().decode()
            except OSError:
                assert time.monotonic() < deadline, "HAProxy's exporter did not answer:\n" + "".join(balancer.log)
                time.sleep(0.05)  # polling another process's port
    exported = {s.name for family in text_string_to_metric_families(text) for s in family.samples}
    assert asked and asked <= exported, asked - exported
