"""The Prometheus config, alert rules and Grafana provisioning in docker/: valid for promtool, and using only real metrics.

promtool comes from Debian's ``prometheus`` package (``make system-deps``). That build leaves out some service
discoveries, Kubernetes among them; where it does, the config is checked without the Kubernetes job and that job's
relabeling is checked here, on sample pods.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

import mesh.metrics

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "docker" / "prometheus"
GRAFANA = ROOT / "docker" / "grafana"
CONFIG = PROMETHEUS / "prometheus.yml"
ALERTS = PROMETHEUS / "alerts.yml"
ALERTS_TEST = PROMETHEUS / "alerts_test.yml"
DASHBOARD = GRAFANA / "dashboards" / "mesh-overview.json"
DATASOURCE_UID = "mesh-prometheus"

# Labels Prometheus attaches to every scraped series (scrape config and relabeling), besides the metric's own.
TARGET_LABELS = {"job", "instance", "component", "namespace", "pod"}
# Info metrics take their labels from the values set at start-up (mesh.metrics.init_build_info / init_peer).
INFO_LABELS = {
    "mesh_build_info": {"version", "role", "python", "torch", "hivemind"},
    "mesh_peer_device_info": {"device", "gpu"},
}
# Not from mesh.metrics: series Prometheus makes itself.
PROMETHEUS_SERIES = {"up": set()}
KUBERNETES_SD = "kubernetes_sd_configs"


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: install Debian's prometheus package (`make system-deps`)")
    return path


def run_promtool(promtool: str, *args: str | Path) -> str:
    result = subprocess.run([promtool, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"promtool {' '.join(map(str, args))} failed:\n{output}"
    return output


def exported_series() -> dict[str, set[str]]:
    """Every series name mesh.metrics exports, with the labels it may carry (bucket series: plus ``le``)."""
    labelnames = {
        metric._name: set(metric._labelnames)
        for metric in vars(mesh.metrics).values()
        if hasattr(metric, "_labelnames") and hasattr(metric, "_name")
    }
    series: dict[str, set[str]] = {}
    for family in REGISTRY.collect():
        if not family.name.startswith("mesh_"):
            continue
        labels = labelnames.get(family.name, set()) | labelnames.get(f"{family.name}_total", set())
        if family.type == "counter":
            names = {f"{family.name}_total": labels, f"{family.name}_created": labels}
        elif family.type == "histogram":
            names = {f"{family.name}_bucket": labels | {"le"}, f"{family.name}_sum": labels, f"{family.name}_count": labels}
        elif family.type == "info":
            name = f"{family.name}_info"
            names = {name: INFO_LABELS.get(name, set())}
        else:
            names = {family.name: labels}
        series.update(names)
    assert series, "mesh.metrics registered no mesh_ metric"
    return series


METRIC_NAME = re.compile(r"\b(mesh_[a-zA-Z0-9_]+|up)\b(?!\s*\()")
SELECTOR = re.compile(r"\b(mesh_[a-zA-Z0-9_]+|up)\s*\{([^}]*)\}")
MATCHER = re.compile(r"\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"(?:[^\"\\]|\\.)*\"\s*,?")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def check_expression(expr: str, series: dict[str, set[str]]) -> None:
    """Every metric, label matcher and grouping label of ``expr`` exists in mesh.metrics (or is Prometheus's own)."""
    known = series | PROMETHEUS_SERIES
    names = set(METRIC_NAME.findall(expr))
    assert names, f"no mesh metric in {expr!r}"
    unknown = names - known.keys()
    assert not unknown, f"{expr!r} uses metrics that mesh/metrics.py does not define: {sorted(unknown)}"
    for name, matchers in SELECTOR.findall(expr):
        used = set(MATCHER.findall(matchers))
        assert MATCHER.sub("", matchers).strip() == "", f"cannot read the matchers {matchers!r} in {expr!r}"
        assert used <= known[name] | TARGET_LABELS, f"{expr!r}: {name} has no label(s) {sorted(used - known[name] - TARGET_LABELS)}"
    available = set().union(*(known[name] for name in names)) | TARGET_LABELS
    for group in GROUPING.findall(expr):
        used = {label.strip() for label in group.split(",") if label.strip()}
        assert used <= available, f"{expr!r} groups by label(s) its metrics lack: {sorted(used - available)}"


def load_yaml(path: Path):
    with path.open() as f:
        return yaml.safe_load(f)


# --- Prometheus config ---------------------------------------------------------------------------------------------


def supports_kubernetes_sd(promtool: str, tmp_path: Path) -> bool:
    probe = tmp_path / "probe.yml"
    probe.write_text(yaml.safe_dump({"scrape_configs": [{"job_name": "probe", KUBERNETES_SD: [{"role": "pod"}]}]}))
    result = subprocess.run([promtool, "check", "config", str(probe)], capture_output=True, text=True, timeout=60)
    return result.returncode == 0


def test_prometheus_config_passes_promtool(promtool: str, tmp_path: Path) -> None:
    config = load_yaml(CONFIG)
    assert config["global"]["scrape_interval"] == "15s" and config["global"]["evaluation_interval"] == "15s"
    assert config["rule_files"] == ["alerts.yml"]
    if supports_kubernetes_sd(promtool, tmp_path):
        print(run_promtool(promtool, "check", "config", CONFIG))
        return
    # Debian's promtool lacks Kubernetes discovery: check everything else (rule files are read relative to the config).
    config["scrape_configs"] = [job for job in config["scrape_configs"] if KUBERNETES_SD not in job]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    print(run_promtool(promtool, "check", "config", tmp_path / "prometheus.yml"))


def test_prometheus_scrapes_the_compose_stack() -> None:
    jobs = {job["job_name"]: job for job in load_yaml(CONFIG)["scrape_configs"]}
    assert jobs["mesh-bootstrap"]["static_configs"][0]["targets"] == ["bootstrap:9100"]
    assert jobs["mesh-coordinator"]["static_configs"][0]["targets"] == ["coordinator:8080"]
    assert jobs["mesh-coordinator"].get("metrics_path", "/metrics") == "/metrics"
    assert jobs["mesh-peer"]["dns_sd_configs"] == [{"names": ["peer", "peer-gpu"], "type": "A", "port": 9100, "refresh_interval": "15s"}]
    assert jobs["mesh-kubernetes-pods"][KUBERNETES_SD] == [{"role": "pod"}]


def relabel(labels: dict[str, str], configs: list[dict]) -> dict[str, str] | None:
    """Prometheus's relabeling (keep, drop, replace), enough to check the config's rules; None: the target is dropped."""
    labels = dict(labels)
    for config in configs:
        action = config.get("action", "replace")
        value = config.get("separator", ";").join(labels.get(name, "") for name in config.get("source_labels", []))
        match = re.fullmatch(f"(?:{config.get('regex', '(.*)')})", value)
        if action == "keep" and not match or action == "drop" and match:
            return None
        if action == "replace" and match:
            replacement = config.get("replacement", "$1")
            result = re.sub(r"\$\{?(\d+)\}?", lambda group: match.group(int(group.group(1))) or "", replacement)
            if result:
                labels[config["target_label"]] = result
            else:
                labels.pop(config["target_label"], None)
        assert action in ("keep", "drop", "replace"), f"the relabeling check knows no action {action!r}"
    return {name: value for name, value in labels.items() if not name.startswith("__meta_")}


def kubernetes_pod(**annotations: str) -> dict[str, str]:
    labels = {
        "__address__": "10.1.2.3:8080",
        "__metrics_path__": "/metrics",
        "__meta_kubernetes_namespace": "mesh",
        "__meta_kubernetes_pod_name": "peer-0",
        "__meta_kubernetes_pod_phase": "Running",
        "__meta_kubernetes_pod_label_app_kubernetes_io_component": "peer",
    }
    labels.update({f"__meta_kubernetes_pod_annotation_prometheus_io_{key}": value for key, value in annotations.items()})
    return labels


def test_kubernetes_job_relabels_annotated_pods() -> None:
    job = next(job for job in load_yaml(CONFIG)["scrape_configs"] if job["job_name"] == "mesh-kubernetes-pods")
    rules = job["relabel_configs"]

    target = relabel(kubernetes_pod(scrape="true", port="9100", path="/custom-metrics"), rules)
    assert target == {
        "__address__": "10.1.2.3:9100",
        "__metrics_path__": "/custom-metrics",
        "component": "peer",
        "namespace": "mesh",
        "pod": "peer-0",
    }
    # A container without a declared port: __address__ is the bare pod IP.
    pod = kubernetes_pod(scrape="true", port="8080") | {"__address__": "10.1.2.4"}
    assert relabel(pod, rules)["__address__"] == "10.1.2.4:8080"
    assert relabel(kubernetes_pod(scrape="true"), rules)["__metrics_path__"] == "/metrics"
    assert relabel(kubernetes_pod(), rules) is None
    assert relabel(kubernetes_pod(scrape="false", port="9100"), rules) is None
    assert relabel(kubernetes_pod(scrape="true") | {"__meta_kubernetes_pod_phase": "Succeeded"}, rules) is None


# --- alert rules ---------------------------------------------------------------------------------------------------


def test_alert_rules_pass_promtool_check(promtool: str) -> None:
    print(run_promtool(promtool, "check", "rules", ALERTS))


def test_alert_rules_unit_tests(promtool: str) -> None:
    print(run_promtool(promtool, "test", "rules", ALERTS_TEST))


def test_alerts_are_complete_and_use_real_metrics() -> None:
    groups = load_yaml(ALERTS)["groups"]
    assert [group["name"] for group in groups] == ["mesh"]
    rules = {rule["alert"]: rule for rule in groups[0]["rules"]}
    assert set(rules) == {"MeshPeerLost", "MeshAveragingFailuresHigh", "MeshRunStalled", "MeshCoordinatorNotReady"}
    series = exported_series()
    for name, rule in rules.items():
        assert rule.get("for"), f"{name} has no `for:`"
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        for annotation in ("summary", "description"):
            assert "{{" in rule["annotations"][annotation], f"{name}'s {annotation} shows no templated value"
        check_expression(rule["expr"], series)


def test_alert_unit_tests_cover_every_alert_both_ways() -> None:
    tests = load_yaml(ALERTS_TEST)["tests"]
    firing: set[str] = set()
    silent: set[str] = set()
    series = exported_series()
    for test in tests:
        for case in test["alert_rule_test"]:
            (firing if case.get("exp_alerts") else silent).add(case["alertname"])
        for item in test["input_series"]:
            check_expression(item["series"], series)
    alerts = {rule["alert"] for rule in load_yaml(ALERTS)["groups"][0]["rules"]}
    assert firing == alerts and silent == alerts


# --- Grafana -------------------------------------------------------------------------------------------------------


def test_grafana_provisioning() -> None:
    (datasource,) = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    assert datasource["uid"] == DATASOURCE_UID and datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090" and datasource["isDefault"] is True
    (provider,) = load_yaml(GRAFANA / "provisioning" / "dashboards" / "mesh.yml")["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == "/var/lib/grafana/dashboards"


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panel_targets() -> list[tuple[dict, dict]]:
    return [(panel, target) for panel in dashboard()["panels"] for target in panel.get("targets", [])]


def test_dashboard_panels_are_complete() -> None:
    board = dashboard()
    assert board["uid"] == "mesh-overview" and board["schemaVersion"] >= 36
    (variable,) = board["templating"]["list"]
    assert variable["name"] == "run" and variable["includeAll"] is True
    assert variable["datasource"]["uid"] == DATASOURCE_UID
    assert variable["query"]["query"] == "label_values(mesh_peer_epoch, run)"
    panels = board["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels), "panel ids repeat"
    for panel in panels:
        title = panel.get("title")
        assert title, f"panel {panel['id']} has no title"
        assert panel.get("description"), f"{title!r} has no description"
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{title!r} has no unit"
        assert panel["datasource"]["uid"] == DATASOURCE_UID, f"{title!r} uses another datasource"
        assert panel.get("targets"), f"{title!r} has no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE_UID, f"{title!r} {target['refId']} uses another datasource"
            assert target["expr"].strip(), f"{title!r} {target['refId']} is empty"


def test_dashboard_expressions_parse(promtool: str, tmp_path: Path) -> None:
    """promtool has no PromQL checker of its own; `check rules` parses each expression as a recording rule."""
    rules = []
    for panel, target in panel_targets():
        expr = target["expr"].replace("$run", ".*")
        assert "$" not in expr, f"{panel['title']!r}: {expr!r} uses a Grafana variable Prometheus cannot evaluate"
        rules.append({"record": f"dashboard:panel_{panel['id']}_{target['refId']}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    output = run_promtool(promtool, "check", "rules", path)
    assert f"SUCCESS: {len(rules)} rules found" in output, output


def test_dashboard_uses_real_metrics() -> None:
    series = exported_series()
    for panel, target in panel_targets():
        check_expression(target["expr"], series)
    (variable,) = dashboard()["templating"]["list"]
    check_expression(variable["query"]["query"].removeprefix("label_values(").removesuffix(")"), series)
