"""The alert rules `threadbound alerts` writes and the Grafana dashboard: promtool accepts
them, each alert fires on a synthetic series that should fire it and stays quiet on healthy
ones, they follow the config's thresholds, and they query only metrics the pool exports."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from threadbound.runtime.cli import main
from threadbound.runtime.config import RuntimeConfig
from threadbound.runtime.errors import ConfigError
from threadbound.runtime.metrics.alerts import alert_rules, render, snapshot_window_s
from threadbound.runtime.metrics.catalog import BY_NAME, HISTOGRAM, STEP_BUCKETS
from threadbound.runtime.metrics.dashboard import dashboard
from threadbound.runtime.metrics.dashboard import render as render_dashboard

ROOT = Path(__file__).resolve().parent.parent
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian: apt-get install prometheus; CI installs it)")

SCRAPE_S = 15  # the synthetic series' scrape interval
EVAL_S = 60  # promtool's rule evaluation interval

# Thresholds unlike the defaults in every field, so a rule that ignored one would fail.
STRICT = RuntimeConfig(snapshot_interval_s=30, metrics={"alerts": {
    "step_latency_p99_s": 5, "error_rate": 0.05, "utilisation": 0.75, "degraded_for": "3m",
    "paused_for": "1m", "snapshot_intervals": 4, "queue_growing_for": "10m", "for_s": "2m"}})


def rules_by_name(config):
    return {r["alert"]: r for r in alert_rules(config)["groups"][0]["rules"]}


def promtool(*args, cwd):
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


# -- what promtool's templates print (Prometheus' template functions) -----------------

def _g(v):
    return "%.4g" % v


def humanize(v):
    if v == 0 or math.isnan(v) or math.isinf(v):
        return _g(v)
    prefix = ""
    for p in ("k", "M", "G", "T"):
        if abs(v) < 1000:
            break
        prefix, v = p, v / 1000
    for p in ("m", "u", "n", "p"):
        if abs(v) >= 1:
            break
        prefix, v = p, v * 1000
    return _g(v) + prefix


def humanize_duration(v):
    if v < 1:
        return humanize(v) + "s"
    s = int(v)
    days, hours, minutes, seconds = s // 86400, s // 3600 % 24, s // 60 % 60, s % 60
    if days:
        return f"{days}d {hours}h {minutes}m {seconds}s"
    if hours:
        return f"{hours}h {minutes}m {seconds}s"
    if minutes:
        return f"{minutes}m {seconds}s"
    return _g(v) + "s"


FILTERS = {"humanize": humanize, "humanizeDuration": humanize_duration,
           "humanizePercentage": lambda v: _g(v * 100) + "%"}


def expand(text, pool, value):
    """An annotation as Prometheus renders it for ``pool`` and ``value``."""
    text = text.replace("{{ $labels.pool }}", pool)
    text = re.sub(r"\{\{ \$value \| (\w+) \}\}", lambda m: FILTERS[m.group(1)](value), text)
    assert "{{" not in text, f"a template this test cannot expand: {text}"
    return text


# -- the synthetic series: a sick pool, and healthy ones, per alert --------------------

def counter(per_scrape, n):
    return f"0+{per_scrape}x{n}"


def flat(value, n):
    return f"{value}x{n}"


def scenario(name, config, n):
    """``(series, true_from_s, value)``: ``series`` maps pool -> [(metric{labels}, values)];
    the pool ``sick`` should fire ``name`` from ``true_from_s`` on (with the alert's value
    ``value``), every other pool must stay quiet."""
    a = config.metrics.alerts

    def s(metric, pool, values, **labels):
        labels = {"pool": pool, **labels}
        return f"{metric}{{{','.join(f'{k}={json.dumps(str(v))}' for k, v in labels.items())}}}", values

    if name == "ThreadboundStepLatencyHigh":
        bounds = [*STEP_BUCKETS, math.inf]
        low = next(b for b in bounds if b >= a.step_latency_p99_s)  # every observation lies above this
        high = bounds[bounds.index(low) + 1]
        value = low if math.isinf(high) else low + (high - low) * 0.99

        def histogram(pool, above):
            return [s("threadbound_latency_seconds_bucket", pool,
                      counter(10, n) if b >= above else flat(0, n), role="coder", level=1, outcome="ok",
                      le="+Inf" if math.isinf(b) else repr(float(b))) for b in bounds]
        return {"sick": histogram("sick", high), "healthy": histogram("healthy", bounds[0])}, SCRAPE_S, value
    if name == "ThreadboundStepErrorsHigh":
        sick_failed, healthy_failed = math.ceil(1000 * (1 + a.error_rate) / 2), math.floor(1000 * a.error_rate / 2)
        return {pool: [s("threadbound_steps_total", pool, counter(1000 - failed, n), role="coder", outcome="ok"),
                       s("threadbound_steps_total", pool, counter(failed, n), role="coder", outcome="timeout")]
                for pool, failed in (("sick", sick_failed), ("healthy", healthy_failed))}, SCRAPE_S, sick_failed / 1000
    if name == "ThreadboundPoolSaturated":
        sick, healthy = math.floor(100 * (1 + a.utilisation) / 2), math.floor(100 * a.utilisation / 2)
        return {pool: [s("threadbound_thread_pool_active", pool, flat(active, n)),
                       s("threadbound_thread_pool_size", pool, flat(100, n))]
                for pool, active in (("sick", sick), ("healthy", healthy))}, 0, sick / 100
    if name in ("ThreadboundDegraded", "ThreadboundPaused"):
        # Degraded: paused counts too; healthy is normal. Paused: degraded alone is not paused.
        sick, healthy = (1, 0) if name == "ThreadboundDegraded" else (2, 1)
        return {pool: [s("threadbound_health_mode", pool, flat(mode, n))]
                for pool, mode in (("sick", sick), ("healthy", healthy))}, 0, sick
    if name == "ThreadboundSnapshotsStalled":
        # sick: steps end, no snapshot since the first three; working: snapshots follow the
        # steps; idle: no steps, so no snapshot is due, however old the last one is.
        per_window = 5 * snapshot_window_s(config) / SCRAPE_S
        return {"sick": [s("threadbound_steps_total", "sick", counter(5, n), role="coder", outcome="ok"),
                         s("threadbound_snapshots_total", "sick", flat(3, n))],
                "working": [s("threadbound_steps_total", "working", counter(5, n), role="coder", outcome="ok"),
                            s("threadbound_snapshots_total", "working", counter(3, n))],
                "idle": [s("threadbound_steps_total", "idle", flat(40, n), role="coder", outcome="ok"),
                         s("threadbound_snapshots_total", "idle", flat(3, n))]}, SCRAPE_S, per_window
    if name == "ThreadboundQueueGrowing":
        # steady: busy but keeping up; draining: shrinking.
        return {"sick": [s("threadbound_queue_depth", "sick", counter(1, n))],
                "steady": [s("threadbound_queue_depth", "steady", flat(5, n))],
                "draining": [s("threadbound_queue_depth", "draining", f"{n}-1x{n}")]}, SCRAPE_S, 1 / SCRAPE_S
    if name == "ThreadboundDown":
        gone_at = 10 * EVAL_S  # the sick pool's metrics stop there (a stale marker, as on a failed scrape)
        return {"sick": [s("threadbound_health_mode", "sick", f"{flat(0, gone_at // SCRAPE_S - 1)} stale")],
                "healthy": [s("threadbound_health_mode", "healthy", flat(0, n))]}, gone_at, 1
    raise AssertionError(f"no synthetic series for {name}: add one")


def ceil_eval(seconds):
    return int(math.ceil(seconds / EVAL_S)) * EVAL_S


def unit_tests(config, rules_file):
    """promtool's test file for every alert of ``config``: one group per alert, checked
    while pending (quiet), once it fires (only the sick pool), and never for a healthy pool."""
    groups = []
    for name, rule in rules_by_name(config).items():
        for_s = round(_seconds(rule["for"])) if "for" in rule else 0
        _, true_from, _ = scenario(name, config, 1)
        fires_at = ceil_eval(ceil_eval(true_from) + for_s) + EVAL_S  # one evaluation's margin
        n = fires_at // SCRAPE_S + 10
        series, true_from, value = scenario(name, config, n)
        tests = [{"eval_time": f"{fires_at}s", "alertname": name, "exp_alerts": [{
            "exp_labels": {"pool": "sick", **rule["labels"]},
            "exp_annotations": {k: expand(v, "sick", value) for k, v in rule["annotations"].items()}}]}]
        pending = ceil_eval(true_from) + for_s - EVAL_S  # true, but not for long enough yet
        if for_s and pending >= ceil_eval(true_from):
            tests.insert(0, {"eval_time": f"{pending}s", "alertname": name, "exp_alerts": []})
        groups.append({"interval": f"{SCRAPE_S}s",
                       "input_series": [{"series": k, "values": v} for pool in series.values() for k, v in pool],
                       "alert_rule_test": tests})
    return {"rule_files": [str(rules_file)], "evaluation_interval": f"{EVAL_S}s", "tests": groups}


def _seconds(duration):
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+)(ms|h|m|s)", duration))


def run_unit_tests(config, tmp_path, rules_text=None):
    rules = tmp_path / "alerts.yml"
    rules.write_text(rules_text if rules_text is not None else render(config))
    tests = unit_tests(config, rules)
    (tmp_path / "alerts_test.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    return tests, promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)


# -- promtool --------------------------------------------------------------------------

@needs_promtool
@pytest.mark.timeout(60)
def test_the_shipped_rules_file_passes_promtool_check_and_is_the_default_output(tmp_path):
    # Given: the file in configs/, and what the default config generates
    shipped = (ROOT / "configs" / "alerts.yml").read_text()
    # Then: they are the same (regenerate with `threadbound alerts > configs/alerts.yml`)
    assert shipped == render(RuntimeConfig())
    proc = promtool("check", "rules", str(ROOT / "configs" / "alerts.yml"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(rules_by_name(RuntimeConfig()))} rules found" in proc.stdout


@needs_promtool
@pytest.mark.timeout(90)
@pytest.mark.parametrize("config", [RuntimeConfig(), STRICT], ids=["defaults", "strict"])
def test_each_alert_fires_on_a_sick_pool_and_stays_quiet_on_healthy_ones(config, tmp_path):
    # Given: the rules for these thresholds and synthetic series made from the same thresholds
    # When: promtool evaluates them
    tests, proc = run_unit_tests(config, tmp_path)
    # Then: every expectation holds
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout
    # and every alert was exercised: firing for the sick pool, with healthy pools beside it
    names = set(rules_by_name(config))
    fired = {t["alertname"] for g in tests["tests"] for t in g["alert_rule_test"] if t["exp_alerts"]}
    assert fired == names and len(names) == 8
    for group in tests["tests"]:
        pools = {re.search(r'pool="(\w+)"', s["series"]).group(1) for s in group["input_series"]}
        assert "sick" in pools and len(pools) >= 2


@needs_promtool
@pytest.mark.timeout(60)
def test_a_rule_that_never_fires_fails_its_promtool_test(tmp_path):
    # Given: the default rules with every expression replaced by one that is never true
    config = RuntimeConfig()
    doc = alert_rules(config)
    for rule in doc["groups"][0]["rules"]:
        rule["expr"] = "vector(1) > 2"
    # When: the same unit tests run against them
    _, proc = run_unit_tests(config, tmp_path, yaml.safe_dump(doc, sort_keys=False))
    # Then: promtool fails, naming each alert (so the passing run above proves something)
    assert proc.returncode != 0
    for name in rules_by_name(config):
        assert f"alertname: {name}," in proc.stdout + proc.stderr, name


@needs_promtool
@pytest.mark.timeout(60)
def test_a_rule_without_its_for_fails_the_pending_check(tmp_path):
    # Given: the default rules with no `for:` on ThreadboundDegraded
    config = RuntimeConfig()
    doc = alert_rules(config)
    degraded = next(r for r in doc["groups"][0]["rules"] if r["alert"] == "ThreadboundDegraded")
    del degraded["for"]
    _, proc = run_unit_tests(config, tmp_path, yaml.safe_dump(doc, sort_keys=False))
    # Then: it fires while it should still be pending, and promtool says so
    assert proc.returncode != 0
    assert "alertname: ThreadboundDegraded, time: 9m" in proc.stdout + proc.stderr


# -- the config's thresholds -------------------------------------------------------------

def test_the_rules_follow_the_configs_thresholds():
    default, strict = rules_by_name(RuntimeConfig()), rules_by_name(STRICT)
    assert default["ThreadboundStepErrorsHigh"]["expr"].endswith("> 0.2")
    assert strict["ThreadboundStepErrorsHigh"]["expr"].endswith("> 0.05")
    assert strict["ThreadboundStepLatencyHigh"]["expr"].endswith("> 5")
    assert strict["ThreadboundPoolSaturated"]["expr"].endswith("> 0.75")
    assert [strict[n]["for"] for n in ("ThreadboundDegraded", "ThreadboundPaused", "ThreadboundQueueGrowing",
                                       "ThreadboundStepErrorsHigh")] == ["3m", "1m", "10m", "2m"]
    assert [default[n]["for"] for n in ("ThreadboundDegraded", "ThreadboundPaused", "ThreadboundQueueGrowing",
                                        "ThreadboundStepErrorsHigh")] == ["10m", "2m", "15m", "5m"]
    # 4 intervals of 30 s; the defaults' 3 x 5 s is below a minute, so a minute (4 scrapes)
    assert "[2m]" in strict["ThreadboundSnapshotsStalled"]["expr"]
    assert "[1m]" in default["ThreadboundSnapshotsStalled"]["expr"]


def test_no_snapshot_alert_when_snapshots_are_off():
    config = RuntimeConfig(snapshots={"enabled": False})
    assert "ThreadboundSnapshotsStalled" not in rules_by_name(config)
    assert len(rules_by_name(config)) == 7


def test_a_latency_threshold_no_histogram_can_reach_is_refused():
    config = RuntimeConfig(metrics={"alerts": {"step_latency_p99_s": STEP_BUCKETS[-1]}})
    with pytest.raises(ConfigError, match=r"metrics\.alerts\.step_latency_p99_s: 600s can never be exceeded"):
        alert_rules(config, source="pool.yaml")


# -- the command ---------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_threadbound_alerts_prints_the_rules_of_the_config_it_is_given(tmp_path, capsys, monkeypatch):
    for var in [v for v in os.environ if v.startswith("THREADBOUND_")]:
        monkeypatch.delenv(var)
    config = tmp_path / "runtime.yaml"
    config.write_text("metrics:\n  alerts:\n    error_rate: 0.05\n    paused_for: 1m\n")
    assert main(["alerts", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert out == render(RuntimeConfig.from_yaml(config, env={}))
    assert "> 0.05" in out and "for: 1m" in out
    assert main(["alerts"]) == 0
    assert capsys.readouterr().out == render(RuntimeConfig())


@pytest.mark.timeout(30)
@pytest.mark.parametrize("text, says", [
    (None, "file not found; pass an existing YAML file"),
    ("metrics:\n  alerts:\n    error_rate: 3\n", "metrics.alerts.error_rate: must be less than or equal to 1"),
    ("metrics:\n  alerts:\n    eror_rate: 0.1\n", "eror_rate"),
    ("metrics:\n  alerts:\n    step_latency_p99_s: 15m\n", "step_latency_p99_s: 900s can never be exceeded"),
], ids=["missing", "out-of-range", "unknown-key", "unreachable-latency"])
def test_a_bad_config_is_a_clear_error_and_exit_2(text, says, tmp_path, capsys):
    config = tmp_path / "runtime.yaml"
    if text is not None:
        config.write_text(text)
    assert main(["alerts", "--config", str(config)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"threadbound: {config}: invalid configuration\n")
    assert says in captured.err


@needs_promtool
@pytest.mark.timeout(60)
def test_the_readme_alerts_command_works_as_written(tmp_path):
    # Given: the README's line, run by a shell where configs/runtime.yaml is (as from the repository)
    readme = (ROOT / "README.md").read_text()
    line = "threadbound alerts --config configs/runtime.yaml > alerts.yml"
    assert line in readme
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    env = {k: v for k, v in os.environ.items() if not k.startswith("THREADBOUND_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0, proc.stderr
    assert promtool("check", "rules", "alerts.yml", cwd=tmp_path).returncode == 0


# -- only metrics the pool exports ------------------------------------------------------------

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
            "offset", "inf", "nan"}


def metric_names(expr):
    """The metric names a PromQL expression selects (Grafana's $variables allowed)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (label values)
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges and subqueries' steps
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for m in re.finditer(r"(?<![\w$.])([A-Za-z_:][\w:]*)(\s*\()?", expr):
        if not m.group(2) and m.group(1) not in KEYWORDS and not re.fullmatch(r"\d+\w*", m.group(1)):
            names.add(m.group(1))
    return names


def exported_series():
    names = set(BY_NAME)
    for spec in BY_NAME.values():
        if spec.kind == HISTOGRAM:
            names |= {spec.name + s for s in ("_bucket", "_sum", "_count")}
    return names


def test_the_metric_name_parser_finds_a_misspelt_name():
    assert metric_names('sum by (pool, le) (rate(threadbund_steps_total{outcome!="ok"}[5m])) > 0.2') == {
        "threadbund_steps_total"}
    assert metric_names("time() - max by (pool) (a_b{pool=~\"$pool\"} > 0) unless on (pool) c") == {"a_b", "c"}


def dashboard_exprs(d):
    exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in d["annotations"]["list"]]
    return exprs + [v["query"]["query"].removeprefix("label_values(").split(",")[0]
                    for v in d["templating"]["list"] if v["type"] == "query"]


def test_every_alert_and_dashboard_query_names_only_exported_metrics():
    exprs = [r["expr"] for r in rules_by_name(RuntimeConfig()).values()]
    exprs += dashboard_exprs(json.loads((ROOT / "configs" / "grafana-dashboard.json").read_text()))
    used = set().union(*map(metric_names, exprs))
    assert used <= exported_series(), used - exported_series()
    # and the dashboard shows every metric of the catalog
    shown = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
    assert shown == set(BY_NAME), set(BY_NAME) - shown


def test_the_dashboard_is_valid_grafana_json_with_unique_ids_and_places():
    # Given: the shipped file, which is what the builder makes (regenerate with
    # python -m threadbound.runtime.metrics.dashboard > configs/grafana-dashboard.json)
    text = (ROOT / "configs" / "grafana-dashboard.json").read_text()
    assert text == render_dashboard()
    d = json.loads(text)
    assert 36 <= d["schemaVersion"] <= 41
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["pool"]["query"]["query"] == "label_values(threadbound_health_mode, pool)"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24 and g["h"] > 0
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['title']!r} overlaps another"
                cells.add((x, y))
        if p["type"] != "row":
            assert p["targets"] and all('pool=~"$pool"' in t["expr"] for t in p["targets"]), p["title"]
    titles = " | ".join(p["title"] for p in d["panels"])
    for wanted in ("Step latency", "first token", "Tokens per second", "Agents", "Utilisation", "Tasks by status",
                   "Queue depth", "Steps by outcome", "Retries by class", "Reasoning level", "Health mode",
                   "Health transitions", "Snapshots", "Snapshot write time", "Snapshot size", "Snapshot age",
                   "Journal fsync", "Sandbox runs by limit"):
        assert wanted in titles, wanted


@needs_promtool
@pytest.mark.timeout(60)
def test_every_dashboard_query_is_valid_promql(tmp_path):
    # promtool parses the expressions of a rules file: the queries become recording rules
    # with Grafana's variables replaced as Grafana would.
    exprs = dashboard_exprs(dashboard())[:-1]  # the last is the variable's metric name alone
    rules = [{"record": f"dashboard:query{i}", "expr": e.replace("$__rate_interval", "1m").replace("$pool", ".*")}
             for i, e in enumerate(exprs)]
    (tmp_path / "dashboard_rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "d", "rules": rules}]}))
    proc = promtool("check", "rules", "dashboard_rules.yml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
