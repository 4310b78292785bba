"""What a run leaves behind: the results table, the JSON run (write, load), the comparison of two
runs with its regression rule, and the plots.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Sequence
from pathlib import Path

from .registry import AUTO_PROVIDER, UsageError

SCHEMA_VERSION = 1

# Regression thresholds on the median (the rule is in classify; the reasons in NOTES.md).
DEFAULT_THRESHOLD = {"cuda": 0.10, "cpu": 0.25}

DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "out"


# ---------------------------------------------------------------------------------------------
# Output: table and JSON
# ---------------------------------------------------------------------------------------------


def _fmt(x: float | None, spec: str = ".4g") -> str:
    return "-" if x is None else format(x, spec)


def _ceiling_cell(r: dict) -> str:
    """The nearer ceiling: a kernel is bound by whichever of GEMM rate and bandwidth it is closer to."""
    if r["pct_gemm"] is None:
        return "-"
    if r["pct_gemm"] >= r["pct_copy"]:
        return f"{r['pct_gemm']:.0f}% gemm"
    return f"{r['pct_copy']:.0f}% copy"


def format_table(rows: list[list[str]], header: Sequence[str]) -> str:
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=False)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def results_table(run_doc: dict, check_width: int = 48) -> str:
    device = run_doc["device"]
    kind = "CPU" if device["kind"] == "cpu" else "GPU"
    ceil = run_doc["ceilings"]
    head = [
        f"{kind}: {device['name']}, dtype {run_doc['dtype']}",
        f"timer: {run_doc['timer']}",
        (
            f"ceilings: {ceil['gemm']['what']}: {ceil['gemm']['tflops']:.4g} TFLOP/s; "
            f"{ceil['copy']['what']}: {ceil['copy']['gbps']:.4g} GB/s"
        ),
    ]
    rows = []
    for r in run_doc["results"]:
        check = r["check"] if len(r["check"]) <= check_width else r["check"][: check_width - 3] + "..."
        rows.append(
            [
                r["op"],
                r["case"],
                r["mode"],
                r["provider"],
                _fmt(r["median_ms"]),
                _fmt(r["p20_ms"]),
                _fmt(r["p80_ms"]),
                _fmt(r["tflops"], ".3g"),
                _fmt(r["gbps"], ".3g"),
                _ceiling_cell(r),
                "-" if r["ratio_to_base"] is None else f"{r['ratio_to_base']:.2f}x",
                check,
            ]
        )
    header = [
        "op",
        "case",
        "mode",
        "provider",
        f"median ms ({kind})",
        "p20",
        "p80",
        "TFLOP/s",
        "GB/s",
        "%ceiling",
        "x base",
        "check",
    ]
    return "\n".join(head) + "\n\n" + format_table(rows, header)


def auto_checks(results: list[dict], rivals: dict[str, Sequence[str]]) -> list[dict]:
    """Issue 10's rule: in every case and mode, what ``auto`` (:data:`AUTO_PROVIDER`) picks is no
    slower than the better of the op's rivals (``rivals[op]``, e.g. ``addmm`` and ``hf-peft``)
    in the same run. One row per timed ``auto`` result that has at least one timed rival.

    ``verdict``: ``ok`` (median at most the best rival's), ``slower`` (median above it and the
    p20-p80 ranges disjoint) or ``slower (p20-p80 ranges overlap)``: above on the median, but
    within the run's spread, so a rerun may say otherwise. ``timers_differ`` marks a comparison
    across timers (a provider whose CUDA graph capture failed was timed eagerly, host time
    included): such a row compares unlike figures.
    """
    timed = {(r["op"], r["case"], r["mode"], r["provider"]): r for r in results if r["median_ms"] is not None}
    rows = []
    for r in results:
        names = rivals.get(r["op"], ())
        if r["provider"] != AUTO_PROVIDER or r["median_ms"] is None or not names:
            continue
        present = [timed[k] for k in ((r["op"], r["case"], r["mode"], n) for n in names) if k in timed]
        if not present:
            continue
        best = min(present, key=lambda o: o["median_ms"])
        if r["median_ms"] <= best["median_ms"]:
            verdict = "ok"
        elif r["p20_ms"] > best["p80_ms"]:
            verdict = "slower"
        else:
            verdict = "slower (p20-p80 ranges overlap)"
        rows.append(
            {
                "op": r["op"],
                "case": r["case"],
                "mode": r["mode"],
                "picked": r.get("picked"),
                "auto_ms": r["median_ms"],
                "rivals": [o["provider"] for o in present],
                "best_rival": best["provider"],
                "best_rival_ms": best["median_ms"],
                "ratio": r["median_ms"] / best["median_ms"],
                "verdict": verdict,
                "timers_differ": r["timer"] != best["timer"],
            }
        )
    return rows


def auto_check_text(rows: list[dict]) -> str:
    """The auto rule's table, then one ``AUTO SLOWER`` line per case and mode that breaks it."""
    if not rows:
        return "auto rule: no case with a timed auto provider and a timed rival"
    table = format_table(
        [
            [
                r["op"],
                r["case"],
                r["mode"],
                r["picked"] or "?",
                f"{r['auto_ms']:.4g}",
                r["best_rival"],
                f"{r['best_rival_ms']:.4g}",
                f"{r['ratio']:.3f}x",
                r["verdict"],
            ]
            for r in rows
        ],
        ["op", "case", "mode", "auto picked", "auto ms", "best rival", "rival ms", "auto/rival", "verdict"],
    )
    slower = [r for r in rows if r["verdict"] != "ok"]
    lines = [
        f"AUTO SLOWER: {r['op']} / {r['case']} / {r['mode']}: {AUTO_PROVIDER} (picked {r['picked'] or '?'}) "
        f"{r['auto_ms']:.4g} ms > {r['best_rival']} {r['best_rival_ms']:.4g} ms ({r['ratio']:.3f}x)"
        + ("" if r["verdict"] == "slower" else ", p20-p80 ranges overlap")
        + (", timed with different timers" if r["timers_differ"] else "")
        for r in slower
    ]
    summary = f"auto rule (no slower than the better of its rivals, same run): {len(slower)} of {len(rows)} broken"
    return "\n".join([table, "", summary, *lines])


def default_json_path(run_doc: dict) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", run_doc["device"]["name"]).strip("-")
    stamp = datetime.datetime.fromisoformat(run_doc["timestamp"]).strftime("%Y%m%dT%H%M%SZ")
    return DEFAULT_OUT_DIR / f"{slug}-{stamp}.json"


def write_json(run_doc: dict, path: Path) -> None:
    """The run document: schema, device (name, kind), versions (torch, triton, python, peftops),
    git_commit (None outside a checkout), git_dirty, timestamp, timer, dtype, suite, ceilings,
    results (every quantile and derived figure), auto_rule and auto_check (:func:`auto_checks`),
    and complete (false in the copy written after each case while the run goes on)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(run_doc, indent=1) + "\n")


def load_json(path: Path) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read run {path}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA_VERSION:
        raise UsageError(f"{path}: not a benchmark run of schema {SCHEMA_VERSION}")
    return doc


# ---------------------------------------------------------------------------------------------
# Compare
# ---------------------------------------------------------------------------------------------


def _key(r: dict) -> tuple:
    return (r["op"], r["case"], r["mode"], r["provider"], r["dtype"])


def classify(old: dict, new: dict, threshold: float) -> str:
    """``regression``, ``improvement`` or ``same`` for one matched result.

    A regression needs both a median beyond the threshold and disjoint inter-quantile ranges
    (new p20 above old p80), so one noisy run does not fail the comparison; improvements mirror it.
    """
    if new["median_ms"] > old["median_ms"] * (1 + threshold) and new["p20_ms"] > old["p80_ms"]:
        return "regression"
    if new["median_ms"] * (1 + threshold) < old["median_ms"] and new["p80_ms"] < old["p20_ms"]:
        return "improvement"
    return "same"


def check_same_device(old_name: str, new_name: str, force: bool) -> None:
    if old_name != new_name and not force:
        raise UsageError(
            f"refusing to compare runs from different devices: {old_name!r} vs {new_name!r} "
            "(pass --force to compare anyway)"
        )


def compare_runs(old: dict, new: dict, threshold: float | None, force: bool) -> tuple[str, int]:
    """Match results by (op, case, mode, provider, dtype); return a report and the number of
    regressions. Refuses runs from different devices unless ``force``."""
    check_same_device(old["device"]["name"], new["device"]["name"], force)
    if threshold is None:
        threshold = DEFAULT_THRESHOLD.get(new["device"]["kind"], DEFAULT_THRESHOLD["cpu"])
    old_by_key = {_key(r): r for r in old["results"] if r["median_ms"] is not None}
    new_by_key = {_key(r): r for r in new["results"] if r["median_ms"] is not None}
    rows, notable = [], {"regression": [], "improvement": []}
    for key, r in new_by_key.items():
        o = old_by_key.get(key)
        if o is None:
            continue
        kind = classify(o, r, threshold)
        change = f"{o['median_ms']:.4g} -> {r['median_ms']:.4g} ms ({r['median_ms'] / o['median_ms']:.3f}x)"
        if r["timer"] != o["timer"]:  # e.g. a graph capture that failed in one run only
            change += f" [timer {o['timer']} -> {r['timer']}]"
        if kind != "same":
            notable[kind].append(f"{kind.upper()}: {' / '.join(key)}: {change}")
        rows.append(
            [
                *key,
                f"{o['median_ms']:.4g}",
                f"{r['median_ms']:.4g}",
                f"{r['median_ms'] / o['median_ms']:.3f}",
                "" if kind == "same" else kind,
            ]
        )
    only_new, only_old = len(new_by_key.keys() - old_by_key.keys()), len(old_by_key.keys() - new_by_key.keys())
    summary = (
        f"compared {len(rows)} results (threshold {threshold:.0%} on the median, and disjoint p20-p80 ranges): "
        f"{len(notable['regression'])} regressions, {len(notable['improvement'])} improvements"
        + (f"; {only_new} only in the new run, {only_old} only in the old run" if only_new or only_old else "")
    )
    header = ["op", "case", "mode", "provider", "dtype", "old ms", "new ms", "new/old", "verdict"]
    text = "\n".join(
        [
            f"old: {old['timestamp']} {old['device']['name']} (commit {old.get('git_commit')})",
            f"new: {new['timestamp']} {new['device']['name']} (commit {new.get('git_commit')})",
            "",
            format_table(rows, header),
            "",
            summary,
            *notable["regression"],
            *notable["improvement"],
        ]
    )
    return text, len(notable["regression"])


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def _require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install matplotlib (or pip install -e '.[bench]')") from None
    return matplotlib


def write_plots(run_doc: dict, out_dir: Path) -> list[Path]:
    """One PNG per op: a panel per mode, a group of bars per case, one bar per provider, p20-p80
    as the error bar. Bars show time relative to the case's base provider when every bar has a
    base in the run (cases of very different sizes then share one linear axis), else median ms."""
    matplotlib = _require_matplotlib()
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    timed = [r for r in run_doc["results"] if r["median_ms"] is not None]
    for op in dict.fromkeys(r["op"] for r in timed):
        rows = [r for r in timed if r["op"] == op]
        modes = list(dict.fromkeys(r["mode"] for r in rows))
        cases = list(dict.fromkeys(r["case"] for r in rows))
        providers = list(dict.fromkeys(r["provider"] for r in rows))
        relative = all(r["ratio_to_base"] is not None for r in rows)
        fig, axes = plt.subplots(1, len(modes), figsize=(max(6, 2 + 1.6 * len(cases)) * len(modes), 4.5), squeeze=False)
        width = 0.8 / len(providers)
        for ax, mode in zip(axes[0], modes, strict=False):
            for i, provider in enumerate(providers):
                xs, ys, lo, hi = [], [], [], []
                for j, case in enumerate(cases):
                    r = next((r for r in rows if (r["mode"], r["case"], r["provider"]) == (mode, case, provider)), None)
                    if r is None:
                        continue
                    unit = r["median_ms"] / r["ratio_to_base"] if relative else 1.0  # the base's median
                    xs.append(j + (i - (len(providers) - 1) / 2) * width)
                    ys.append(r["median_ms"] / unit)
                    lo.append((r["median_ms"] - r["p20_ms"]) / unit)
                    hi.append((r["p80_ms"] - r["median_ms"]) / unit)
                ax.bar(xs, ys, width, yerr=[lo, hi], label=provider, capsize=2)
            if relative:
                ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xticks(range(len(cases)), cases, rotation=20, ha="right", fontsize=8)
            ax.set_ylabel("time / base provider's time" if relative else "median ms")
            ax.set_title(mode)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"{op} on {run_doc['device']['name']} ({run_doc['dtype']}, {run_doc['timestamp']})", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"{op}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
