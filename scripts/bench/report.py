"""The benchmark's output: a markdown report, the raw numbers as JSON, and PNG plots.

Everything here works from the plain `results` dictionary that run.py collects, so a report can be
rebuilt from a saved results.json:  python -m scripts.bench.report results/bench-<stamp>/results.json
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

TARGETS = ("direct", "bare", "gateway")
TARGET_LABELS = {"direct": "direct to upstream", "bare": "bare mitmdump", "gateway": "jitgate (full chain)"}
THROUGHPUT_TARGET = 0.80  # full chain >= 80% of bare mitmdump's requests/s
ADDED_P50_TARGET_MS = 1.0
WATCH_TARGET_KB = 64
# Ratios of rounds that differ by more than this many percentage points say more about the machine's
# load than about the gateway: such a row is flagged rather than given a verdict.
SPREAD_LIMIT_POINTS = 10
# Most a feature may take from the full chain's ratio against bare mitmdump, in points (issues #10, #11).
FEATURE_BUDGET_POINTS = {"masking": 3, "recording": 10}


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def _count(value: int | None) -> str:
    return "n/a" if value is None else f"{value:,}"


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _cell(row: dict[str, Any]) -> tuple:
    return row["mode"], row["keepalive"], row["connections"]


def _rounds(results: dict[str, Any]) -> dict[tuple, dict[Any, dict[str, dict]]]:
    """cell -> round -> target -> run. Runs saved before rounds existed count as round 0."""
    cells: dict[tuple, dict[Any, dict[str, dict]]] = {}
    for row in results["runs"]:
        cells.setdefault(_cell(row), {}).setdefault(row.get("round") or 0, {})[row["target"]] = row
    return cells


def headline(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per mode / keep-alive / concurrency: gateway throughput as % of bare and added p50 latency.

    Each round (bare and gateway measured back to back) gives one ratio; a row reports their median,
    which a round disturbed by other load on the machine cannot move much, and their range. The
    spread (max - min, in percentage points) says whether the row can be judged at all.
    """
    lines = []
    for (mode, keepalive, conns), rounds in _rounds(results).items():
        ratios, cpu_ratios, added, added_cpu, bare_rps, gateway_rps, bare_cpu, gateway_cpu = ([] for _ in range(8))
        for pair in rounds.values():
            bare, gateway = pair.get("bare"), pair.get("gateway")
            if not bare or not gateway or not bare["rps"]:
                continue
            ratios.append(gateway["rps"] / bare["rps"])
            added.append(gateway["p50_ms"] - bare["p50_ms"])
            bare_rps.append(bare["rps"])
            gateway_rps.append(gateway["rps"])
            # CPU per request is steadier than req/s on a shared machine: when the proxy is CPU-bound,
            # its throughput ratio is the inverse ratio of CPU per request.
            b_cpu, g_cpu = bare.get("cpu_s_per_1k"), gateway.get("cpu_s_per_1k")
            if b_cpu and g_cpu:
                cpu_ratios.append(b_cpu / g_cpu)
                added_cpu.append(g_cpu - b_cpu)
                bare_cpu.append(b_cpu)
                gateway_cpu.append(g_cpu)
        if not ratios:
            continue
        ratio, added_p50 = _median(ratios), _median(added)
        spread = (max(ratios) - min(ratios)) * 100
        lines.append({"mode": mode, "keepalive": keepalive, "connections": conns, "rounds": len(ratios),
                      "ratio": ratio, "ratio_min": min(ratios), "ratio_max": max(ratios), "spread_points": spread,
                      # One round has no spread to show: it cannot tell the gateway from the machine's load.
                      "judged": len(ratios) >= 2 and spread <= SPREAD_LIMIT_POINTS,
                      "round_ratios": ratios, "round_cpu_ratios": cpu_ratios,
                      "added_p50_ms": added_p50, "bare_rps": _median(bare_rps), "gateway_rps": _median(gateway_rps),
                      "throughput_met": ratio >= THROUGHPUT_TARGET, "latency_met": added_p50 <= ADDED_P50_TARGET_MS,
                      "gateway_cpu": _median(gateway_cpu), "bare_cpu": _median(bare_cpu),
                      "cpu_ratio": _median(cpu_ratios), "cpu_ratio_min": min(cpu_ratios, default=None),
                      "cpu_ratio_max": max(cpu_ratios, default=None), "added_cpu_ms": _median(added_cpu)})
    return lines


def feature_costs(rounds: list[dict[str, dict]], variants: dict[str, str], *, mode: str,
                  connections: int) -> dict[str, Any]:
    """Per left-out step: how many points of the ratio against bare mitmdump the full chain loses to
    it. Each round ran bare, the full gateway and every variant; the round's cost is
    ratio(variant) - ratio(full), in throughput and in CPU per request (the steadier one on a shared
    machine); the medians over rounds are the verdict."""
    rows = []
    full_ratios, full_cpu_ratios = [], []
    for run in rounds:
        bare, full = run["bare"], run["gateway"]
        if bare["rps"] and full["rps"]:
            full_ratios.append(full["rps"] / bare["rps"])
        if bare.get("cpu_s_per_1k") and full.get("cpu_s_per_1k"):
            full_cpu_ratios.append(bare["cpu_s_per_1k"] / full["cpu_s_per_1k"])
    for name, step in variants.items():
        points, cpu_points, saved_ms, without, inside_ms, inside_points = [], [], [], [], [], []
        for run in rounds:
            bare, full, variant = run["bare"], run["gateway"], run[name]
            inside = (full.get("step_ms") or {}).get(step)
            if inside is not None:
                inside_ms.append(inside)
                b_cpu, f_cpu = bare.get("cpu_s_per_1k"), full.get("cpu_s_per_1k")
                if b_cpu and f_cpu and f_cpu > inside:
                    inside_points.append((b_cpu / (f_cpu - inside) - b_cpu / f_cpu) * 100)
            if bare["rps"] and full["rps"] and variant["rps"]:
                without.append(variant["rps"] / bare["rps"])
                points.append((variant["rps"] - full["rps"]) / bare["rps"] * 100)
            b_cpu, f_cpu, v_cpu = bare.get("cpu_s_per_1k"), full.get("cpu_s_per_1k"), variant.get("cpu_s_per_1k")
            if b_cpu and f_cpu and v_cpu:
                cpu_points.append((b_cpu / v_cpu - b_cpu / f_cpu) * 100)
                saved_ms.append(f_cpu - v_cpu)
        budget = FEATURE_BUDGET_POINTS.get(step)
        cpu_cost = _median(cpu_points)
        rows.append({"step": step, "variant": name, "rounds": len(points), "budget_points": budget,
                     "ratio_without": _median(without), "points": _median(points),
                     "points_min": min(points, default=None), "points_max": max(points, default=None),
                     "cpu_points": cpu_cost, "cpu_ms_per_request": _median(saved_ms),
                     "inside_ms": _median(inside_ms), "inside_points": _median(inside_points),
                     "met": None if budget is None or cpu_cost is None else cpu_cost <= budget})
    return {"mode": mode, "connections": connections, "rounds": len(rounds), "ratio_full": _median(full_ratios),
            "cpu_ratio_full": _median(full_cpu_ratios), "rows": rows, "runs": rounds}


def feature_cost_lines(costs: dict[str, Any]) -> list[str]:
    out = [f"What each step costs the full chain ({costs['mode']} keep-alive c={costs['connections']}, "
           f"{costs['rounds']} rounds; full chain at {_percent(costs['ratio_full'])} of bare, CPU-bound "
           f"{_percent(costs['cpu_ratio_full'])}):"]
    for row in costs["rows"]:
        verdict = "n/a" if row["met"] is None else ("ok" if row["met"] else "MISS")
        out.append(f"  {row['step']:<10} {_fmt(row['cpu_points'])} points of the CPU-bound ratio "
                   f"(budget {row['budget_points']}: {verdict}), {_fmt(row['points'])} of throughput "
                   f"({_fmt(row['points_min'])} to {_fmt(row['points_max'])}), "
                   f"{_fmt(row['cpu_ms_per_request'], 2)} ms CPU per request; inside its hooks "
                   f"{_fmt(row.get('inside_ms'), 2)} ms per call = {_fmt(row.get('inside_points'))} points")
    return out


def _percent(value: float | None) -> str:
    return _fmt(None if value is None else value * 100, 0) + "%"


def _range(low: float | None, high: float | None) -> str:
    return "n/a" if low is None or high is None else f"{low * 100:.0f}–{high * 100:.0f}%"


def _verdict(h: dict[str, Any]) -> str:
    """The throughput verdict, or why there is none."""
    if not h["judged"]:
        return "too wide to judge" if h["rounds"] >= 2 else "one round: no spread"
    return "ok" if h["throughput_met"] else "MISS"


def headline_line(h: dict[str, Any]) -> str:
    return (f"  {h['mode']:<8} {'keep-alive' if h['keepalive'] else 'new conns':<10} c={h['connections']:<3} "
            f"throughput median {h['ratio']:6.1%} ({_range(h['ratio_min'], h['ratio_max'])}, "
            f"spread {h['spread_points']:.0f} pts, {h['rounds']} rounds) {_verdict(h)}  "
            f"CPU-bound ratio {_percent(h['cpu_ratio'])} ({_range(h['cpu_ratio_min'], h['cpu_ratio_max'])})  "
            f"added p50 {h['added_p50_ms']:+6.2f} ms {'ok' if h['latency_met'] else 'MISS'}  "
            f"CPU/request {_fmt(h['gateway_cpu'], 2)} vs {_fmt(h['bare_cpu'], 2)} ms  "
            f"({_fmt(h['gateway_rps'])} vs {_fmt(h['bare_rps'])} req/s)")


def headline_text(results: dict[str, Any]) -> str:
    out = [f"Full chain vs bare mitmdump, medians over rounds (targets: >= 80% throughput, <= +1 ms p50; "
           f"a spread over {SPREAD_LIMIT_POINTS} points is too wide to judge):"]
    out += [headline_line(h) for h in headline(results)]
    return "\n".join(out)


def per_target(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per mode / keep-alive / concurrency / target: medians over its rounds (peak RSS: the
    highest, errors: the sum), with the lowest and highest req/s of a round."""
    groups: dict[tuple, list[dict]] = {}
    for row in runs:
        groups.setdefault((*_cell(row), row["target"]), []).append(row)
    found = []
    for rows in groups.values():
        first = rows[0]
        row = {key: first[key] for key in ("mode", "keepalive", "connections", "target", "tool")}
        for key in ("rps", "p50_ms", "p99_ms", "cpu_s_per_1k", "upstream_cpu_s_per_1k"):
            values = [r[key] for r in rows if r.get(key) is not None and r[key] == r[key]]  # not None, not NaN
            row[key] = _median(values)
        rss = [r["peak_rss_mb"] for r in rows if r.get("peak_rss_mb") is not None]
        row["peak_rss_mb"] = max(rss) if rss else None
        row["rps_min"], row["rps_max"] = min(r["rps"] for r in rows), max(r["rps"] for r in rows)
        row["rounds"], row["errors"] = len(rows), sum(r["errors"] for r in rows)
        row["note"] = next((r["note"] for r in rows if r["note"]), "")
        found.append(row)
    return found


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def markdown_section_mcp(results: dict[str, Any]) -> list[str]:
    """The MCP front's rows: tools/call round trips direct, through bare mitmdump, through the front."""
    mcp = results.get("mcp")
    md: list[str] = []
    if mcp:
        trips = mcp["round_trip_ms"]
        direct = trips.get("direct to the MCP server")
        md += ["## MCP front: `tools/call`", ""]
        md.append("The same `tools/call` (an allowed tool, JSON answer) sent one after another on one kept-alive "
                  "connection: straight to a Streamable HTTP MCP server, through bare mitmdump in reverse mode, and "
                  "through the MCP front (`addons/mcp_gateway.py`: token, headers, rules, answer masking, audit); "
                  "p50 of the round trip, best of 3 interleaved rounds.")
        md.append("")
        md.append(_table(["target", "p50 round trip, ms", "sequential requests/s", "added vs direct, ms"], [
            [name, _fmt(ms, 2), _fmt(1000 / ms if ms else None), _fmt(None if direct is None else ms - direct, 2)]
            for name, ms in trips.items()]))
        md.append("")
        md.append(_table(["the front's own work, in process", "µs per message"],
                         [[name, _fmt(us)] for name, us in mcp["in_process_us"].items()]))
        md.append("")
    return md


def markdown(results: dict[str, Any], image_prefix: str = "") -> str:
    meta = results["meta"]
    md = [f"# jitgate benchmark, {meta['started']}", ""]
    rounds = f"{meta['rounds']} rounds of {meta['duration']} s" if "rounds" in meta else f"{meta['duration']} s"
    md.append(f"Machine: {meta['machine']}. Load average at start: {meta['loadavg']}. "
              f"Mode: {'quick' if meta['quick'] else 'full'}, {rounds} per target and row, "
              f"CPU pinning: {meta['pinning']}. Total run time: {meta.get('elapsed', 'n/a')} s.")
    md.append("")
    if meta.get("noisy_note"):
        md += [f"> {meta['noisy_note']}", ""]

    md += ["## Headline: jitgate (full chain) vs bare mitmdump, medians over interleaved rounds", ""]
    lines = headline(results)
    rows = []
    for h in lines:
        mark = ("✅" if h["throughput_met"] else "❌") if h["judged"] else "⚠️"
        spread = f"{h['spread_points']:.0f}" + ("" if h["judged"] else f" ⚠️ {_verdict(h)}")
        rows.append([h["mode"], "keep-alive" if h["keepalive"] else "new connection", str(h["connections"]),
                     str(h["rounds"]), f"{h['ratio']:.0%} {mark}", _range(h["ratio_min"], h["ratio_max"]), spread,
                     _percent(h["cpu_ratio"]), _range(h["cpu_ratio_min"], h["cpu_ratio_max"]),
                     f"{h['added_p50_ms']:+.2f} {'✅' if h['latency_met'] else '❌'}",
                     _fmt(h["gateway_cpu"], 2), _fmt(h["bare_cpu"], 2), _fmt(h["added_cpu_ms"], 2)])
    md.append(_table(["mode", "connections", "concurrency", "rounds", "throughput vs bare, median (target ≥ 80%)",
                      "throughput min–max", f"spread, points (≤ {SPREAD_LIMIT_POINTS} to judge)",
                      "CPU-bound ratio, median (bare ÷ gateway CPU)", "CPU-bound min–max",
                      "added p50 ms, median (target ≤ 1)", "gateway CPU s / 1k req", "bare CPU s / 1k req",
                      "added CPU ms / req"], rows))
    md.append("")
    md.append("Each round measures bare mitmdump and the gateway back to back (the order alternates from round to "
              "round) and gives one ratio of their throughputs; a row shows the median of those ratios and their "
              f"range. A spread (max − min) over {SPREAD_LIMIT_POINTS} points means other load on the machine moved the "
              "numbers more than the gateway did: ⚠️ rows get no verdict; re-run them quieter or with more "
              "`--rounds`. CPU per request is the steadier measure when the machine is shared: a CPU-bound proxy's "
              "throughput ratio equals the inverse ratio of its CPU per request (the CPU-bound columns). With more "
              "than one connection the proxy is saturated and p50 is mostly queueing (about concurrency × CPU per "
              "request), so the latency target speaks to the concurrency-1 rows.")
    md.append("")
    if any(h["rounds"] > 1 for h in lines):
        md.append(_table(["mode", "connections", "concurrency", "throughput ratio per round", "CPU-bound ratio per round"],
                         [[h["mode"], "keep-alive" if h["keepalive"] else "new connection", str(h["connections"]),
                           " ".join(f"{r:.0%}" for r in h["round_ratios"]),
                           " ".join(f"{r:.0%}" for r in h["round_cpu_ratios"]) or "n/a"] for h in lines]))
        md.append("")

    md += ["## Per target (medians over rounds)", ""]
    rows = []
    for r in per_target(results["runs"]):
        rows.append([r["mode"], "yes" if r["keepalive"] else "no", str(r["connections"]), TARGET_LABELS[r["target"]],
                     r["tool"], str(r["rounds"]), _fmt(r["rps"]), f"{_fmt(r['rps_min'])}–{_fmt(r['rps_max'])}",
                     _fmt(r["p50_ms"], 2), _fmt(r["p99_ms"], 2), _fmt(r.get("cpu_s_per_1k"), 2),
                     _fmt(r.get("peak_rss_mb")), _fmt(r.get("upstream_cpu_s_per_1k"), 3),
                     str(r["errors"]) + (f" ({r['note']})" if r["note"] else "")])
    md.append(_table(["mode", "keep-alive", "conns", "target", "client", "rounds", "req/s", "req/s min–max", "p50 ms",
                      "p99 ms", "proxy CPU s / 1k req", "proxy peak RSS MB", "nginx CPU s / 1k req", "errors"], rows))
    md.append("")
    for name, title in (("throughput.png", "throughput"), ("latency.png", "p50 latency")):
        if name in results.get("plots", []):
            md.append(f"![{title}]({image_prefix}{name})")
    md.append("")

    steady = results.get("steady_state", {})
    md += ["## Calls to the identity provider and STS in steady state (target: zero)", ""]
    md.append(_table(["", "calls during the load phases", "per 1,000 gateway requests"], [
        ["OIDC provider (discovery + JWKS, nginx access log)", str(steady.get("oidc_calls", "n/a")),
         _fmt(steady.get("oidc_per_1k"), 3)],
        ["STS AssumeRole (moto_server recording)", str(steady.get("sts_calls", "n/a")), _fmt(steady.get("sts_per_1k"), 3)],
    ]))
    md.append("")
    md.append(f"Gateway requests in the load phases: {_count(steady.get('gateway_requests'))}; audit events written "
              f"in them: {_count(steady.get('audit_events'))}. Warm-up (before counting): "
              f"{steady.get('warmup_oidc_calls', 'n/a')} OIDC and {steady.get('warmup_sts_calls', 'n/a')} STS calls.")
    md.append("")

    costs = results.get("feature_costs")
    if costs:
        md += ["## What each feature costs the full chain", ""]
        md.append(f"{costs['mode'].capitalize()} mode, keep-alive, {costs['connections']} connections, "
                  f"{costs['rounds']} rounds in which bare mitmdump, the full gateway and the gateway without one "
                  f"step ran back to back (the order rotating). A step's cost is the ratio against bare mitmdump "
                  f"without it minus the full chain's ratio, in points; the full chain ran at "
                  f"{_percent(costs['ratio_full'])} of bare (CPU-bound {_percent(costs['cpu_ratio_full'])}). "
                  f"The full chain also timed each step's hooks where they ran (CPU of the event loop's thread "
                  f"inside them, per call): the step's own cost without the drift between two processes, turned "
                  f"into points at each round's ratio; it leaves out what a step costs elsewhere (its garbage, "
                  f"its threads, the caches it cools), so it is a floor, the verdict stays with the difference.")
        md.append("")
        md.append(_table(["step", "budget, points", "cost, points of the CPU-bound ratio (median)",
                          "cost, points of throughput (median)", "throughput points min–max",
                          "CPU ms per request", "ratio without it", "inside its hooks, ms per call",
                          "inside its hooks, points", "verdict"], [
            [f"`{row['step']}`", str(row["budget_points"]), _fmt(row["cpu_points"]), _fmt(row["points"]),
             f"{_fmt(row['points_min'])} to {_fmt(row['points_max'])}", _fmt(row["cpu_ms_per_request"], 2),
             _percent(row["ratio_without"]), _fmt(row.get("inside_ms"), 2), _fmt(row.get("inside_points")),
             "n/a" if row["met"] is None else ("✅" if row["met"] else "❌")]
            for row in costs["rows"]]))
        md.append("")

    md += markdown_section_mcp(results)

    md += ["## Scaling curves", ""]
    for curve in results.get("curves", []):
        md.append(f"### {curve['name']}")
        md.append("")
        if curve["not_measurable"]:
            md += [f"Not yet measurable: {curve['not_measurable']}.", ""]
            continue
        labels = list(curve["series"])
        xs = sorted({x for points in curve["series"].values() for x, _ in points})
        values = {label: dict(points) for label, points in curve["series"].items()}
        md.append(f"{curve['y_label']}:")
        md.append("")
        md.append(_table([curve["x_label"], *labels],
                         [[f"{x:,}", *(_fmt(values[label].get(x), 2) for label in labels)] for x in xs]))
        md.append("")
        md += [f"- {note}" for note in curve["notes"]]
        md.append("")
    if results.get("parse_costs"):
        md += ["### Request attributes: `parse_request` cost", ""]
        md.append(_table(["request", "target", "µs per parse"],
                         [[name, f"`{target[:90]}`", _fmt(us, 2)] for name, target, us in results["parse_costs"]]))
        md.append("")
    watch = results.get("watches", [])
    if watch:
        md += ["### Memory per idle watch (reverse mode, RSS growth of the proxy process)", ""]
        rows = []
        for w in watch:
            for n, per in w["per_watch_kb"]:
                rss = dict(w["points"])[n]
                rows.append([w["proxy"], f"{n:,}", _fmt(rss / 1024), _fmt(per), "✅" if per <= WATCH_TARGET_KB else "❌"])
            if w["failures"]:
                rows.append([w["proxy"], "failed", "", w["failures"][0], ""])
        md.append(_table(["proxy", "open idle watches", "RSS MB", "kB per watch", f"≤ {WATCH_TARGET_KB} kB"], rows))
        md.append("")
        md.append("Bare mitmdump runs with `stream_large_bodies=1` here (otherwise it would hold every watch "
                  "response until it ends); baseline RSS is taken after three watches were opened and closed.")
        md.append("")
    if "curves.png" in results.get("plots", []):
        md += [f"![curves]({image_prefix}curves.png)", ""]

    if results.get("profile"):
        prof = results["profile"]
        bare, gateway = prof["bare"], prof["gateway"]
        md += ["## Where the CPU goes (py-spy)", ""]
        md.append(f"Sampled during: {prof['phase']}; {bare['samples']:,} samples of bare mitmdump, "
                  f"{gateway['samples']:,} of the gateway (on-CPU only). "
                  + (f"Flame graph of the gateway: [profile.svg]({image_prefix}profile.svg)." if prof.get("svg") else ""))
        md.append("")
        md.append(_table(["part of the stack (inclusive share of samples)", "bare mitmdump", "gateway"],
                         [[label, f"{bare['groups'].get(label, 0):.1%}", f"{share:.1%}"]
                          for label, share in gateway["groups"].items()]))
        md.append("")
        if gateway.get("jitgate_files"):
            md.append(_table(["gateway: jitgate file (inclusive)", "share of samples"],
                             [[f"`{name}`", f"{share:.1%}"] for name, share in gateway["jitgate_files"]]))
            md.append("")
        md.append(_table(["gateway: share of samples (self)", "function"],
                         [[f"{share:.1%}", f"`{name}`"] for name, share in gateway["top_self"]]))
        md.append("")

    if results.get("gateway_log"):
        md += ["## Gateway log: warnings and errors", "", "```", results["gateway_log"], "```", ""]

    md += ["## How this was measured", ""]
    md += [f"- {note}" for note in meta["notes"]]
    md.append("")
    md.append("Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".")
    md.append("")
    return "\n".join(md)


def plots(results: dict[str, Any], outdir: Path) -> list[str]:
    """Write throughput.png, latency.png and curves.png; returns the names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    runs = per_target(results["runs"])
    cells = sorted({(r["mode"], r["keepalive"]) for r in runs}, key=lambda c: (c[0] != "reverse", not c[1]))
    colors = {"direct": "#9e9e9e", "bare": "#1f77b4", "gateway": "#d62728"}
    for metric, name, label, log in (("rps", "throughput.png", "requests/s", True),
                                     ("p50_ms", "latency.png", "p50 latency (ms)", True)):
        if not cells:
            break
        fig, axes = plt.subplots(1, len(cells), figsize=(4.2 * len(cells), 3.8), squeeze=False)
        for ax, (mode, keepalive) in zip(axes[0], cells):
            conns = sorted({r["connections"] for r in runs if r["mode"] == mode and r["keepalive"] == keepalive})
            width = 0.8 / len(TARGETS)
            for i, target in enumerate(TARGETS):
                values, low, high = [], [], []
                for c in conns:
                    row = next((r for r in runs if (r["mode"], r["keepalive"], r["connections"], r["target"])
                                == (mode, keepalive, c, target)), None)
                    value = row[metric] if row and row[metric] is not None and row[metric] == row[metric] else 0
                    values.append(value)
                    # Whiskers: the slowest and fastest round of this target, for throughput.
                    low.append(value - row["rps_min"] if row and metric == "rps" and value else 0)
                    high.append(row["rps_max"] - value if row and metric == "rps" and value else 0)
                ax.bar([j + (i - 1) * width for j in range(len(conns))], values, width, label=TARGET_LABELS[target],
                       color=colors[target], yerr=[low, high] if metric == "rps" else None, capsize=2)
            ax.set_xticks(range(len(conns)), [str(c) for c in conns])
            ax.set_xlabel("concurrent connections")
            ax.set_title(f"{mode}, {'keep-alive' if keepalive else 'new connection per request'}", fontsize=9)
            if log:
                ax.set_yscale("log")
            ax.grid(axis="y", alpha=0.3)
        axes[0][0].set_ylabel(label)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=len(TARGETS), fontsize=8)
        fig.suptitle(f"jitgate benchmark {results['meta']['started']}: {label}", fontsize=10)
        fig.tight_layout(rect=(0, 0.07, 1, 1))
        fig.savefig(outdir / name, dpi=110)
        plt.close(fig)
        written.append(name)

    curves = [c for c in results.get("curves", []) if c["series"]]
    watches = [w for w in results.get("watches", []) if w["per_watch_kb"]]
    panels = len(curves) + (1 if watches else 0)
    if panels:
        fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.6), squeeze=False)
        for ax, curve in zip(axes[0], curves):
            values = [y for points in curve["series"].values() for _, y in points]
            for label, points in curve["series"].items():
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", label=label)
            ax.set_xscale("log")
            if min(values) > 0 and max(values) / min(values) > 30:
                ax.set_yscale("log")  # series orders of magnitude apart: keep the small one readable
            else:
                ax.set_ylim(bottom=0, top=max(values) * 1.3)
            if len(curve["series"]) > 1:
                ax.legend(fontsize=6)
            ax.set_xlabel(curve["x_label"])
            ax.set_ylabel(curve["y_label"])
            ax.set_title(curve["name"], fontsize=9)
            ax.grid(alpha=0.3)
        if watches:
            ax = axes[0][-1]
            for w in watches:
                xs, ys = zip(*w["per_watch_kb"])
                ax.plot(xs, ys, marker="o", label=w["proxy"])
            ax.axhline(WATCH_TARGET_KB, color="gray", linestyle="--", label=f"target {WATCH_TARGET_KB} kB")
            ax.set_xscale("log")
            ax.set_ylim(bottom=0)
            ax.set_xlabel("open idle watches")
            ax.set_ylabel("RSS growth per watch (kB)")
            ax.set_title("Memory per idle watch (reverse mode)", fontsize=9)
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(outdir / "curves.png", dpi=110)
        plt.close(fig)
        written.append("curves.png")
    return written


def write(results: dict[str, Any], outdir: Path, latest: Path | None, with_plots: bool = True) -> Path:
    """Write results.json, the plots, report.md in `outdir`, and `latest` (links into outdir)."""
    outdir.mkdir(parents=True, exist_ok=True)
    results["plots"] = plots(results, outdir) if with_plots else []
    (outdir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    report = outdir / "report.md"
    report.write_text(markdown(results))
    if latest is not None:
        prefix = outdir.relative_to(latest.parent).as_posix() + "/"
        latest.write_text(markdown(results, image_prefix=prefix))
    return report


if __name__ == "__main__":
    path = Path(sys.argv[1])
    data = json.loads(path.read_text())
    print(write(data, path.parent, None))
