"""`bench`'s table: one line per problem, one column per method, then where the project's time
goes and the memory rows. Reads only the result dict `bench.run` returns (and prints as JSON)."""

from __future__ import annotations

from typing import Any


def format_table(result: dict[str, Any]) -> str:
    """One line per problem, one column per method (tasks/s), and in_process / bare."""
    rows = result["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    problems = list(dict.fromkeys((r["model"], r["meta_batch"], r["inner_steps"], r["first_order"]) for r in rows))
    speed = {
        (r["model"], r["meta_batch"], r["inner_steps"], r["first_order"], r["method"]): r["tasks_per_s"] for r in rows
    }
    gpu = "gpu_graph" in methods and "bare_graph" in methods
    head = [
        "model",
        "meta-batch",
        "steps",
        "order",
        *methods,
        "in_process/bare",
        *(["gpu_graph/bare_graph"] if gpu else []),
    ]
    vs_bare = {
        (r["model"], r["meta_batch"], r["inner_steps"], r["first_order"]): r["vs_bare_graph"]
        for r in rows
        if r["method"] == "gpu_graph" and "vs_bare_graph" in r
    }
    lines = [
        f"{result['benchmark']}; {result['machine']['cpus']} CPUs, torch {result['machine']['torch']}",
        " | ".join(head),
        " | ".join("-" * len(h) for h in head),
    ]
    for p in problems:
        cols = [speed.get((*p, m)) for m in methods]
        ratio = speed.get((*p, "in_process"), 0) / speed[(*p, "bare")] if (*p, "bare") in speed else None
        lines.append(
            " | ".join(
                [p[0], str(p[1]), str(p[2]), "first" if p[3] else "second"]
                + ["-" if c is None else f"{c:,.0f}" for c in cols]
                + ["-" if ratio is None else f"{ratio:.2f}x"]
                + ([f"{vs_bare[p]:.2f}x" if p in vs_bare else "-"] if gpu else [])
            )
        )
    agree = ", ".join(f"{m} {d:.1e}" for m, d in result["gradients_max_rel_diff"].items())
    lines += ["", f"meta-gradients agree (max rel diff vs the loop): {agree}"]
    for r in rows:
        if "script_alone_ms" in r:
            lines.append(
                f"bare row vs bench/minimal_script.py on its own, meta-batch {r['meta_batch']}: {r['step_ms']:.2f} vs "
                f"{r['script_alone_ms']:.2f} ms/step ({r['step_ms'] / r['script_alone_ms']:.2f}x)"
            )
    lines.append("")
    lines += [
        "the project's path | model | meta-batch | steps | order | learner share | KiB out / in per step "
        "| worker peak RSS MiB",
        "------------------ | ----- | ---------- | ----- | ----- | ------------- | --------------------- "
        "| -------------------",
    ]
    for r in rows:
        if r["method"] not in ("loop", "bare", "bare_funcgrad", "bare_graph"):
            kib = (
                f"{r['weights_out_bytes'] / 1024:.1f} / {r['gradients_in_bytes'] / 1024:.1f}"
                if "weights_out_bytes" in r
                else "- (in-process)"
            )
            rss = f"{r['worker_peak_rss_mib']:.0f}" if "worker_peak_rss_mib" in r else "-"
            share = f"{100 * r['learner_share']:.1f}%" if "learner_share" in r else "- (in rank 0)"
            lines.append(
                f"{r['method']} | {r['model']} | {r['meta_batch']} | {r['inner_steps']} | "
                f"{'first' if r['first_order'] else 'second'} | {share} | {kib} | {rss}"
            )
    if result.get("memory"):
        lines += ["", "peak memory per task (vmap) | model | meta-batch | inner steps | order | MiB per task"]
        lines += [
            f"| {r['model']} | {r['meta_batch']} | {r['inner_steps']} | {'first' if r['first_order'] else 'second'} "
            f"| {r['mib_per_task']:.3f}"
            for r in result["memory"]
        ]
    return "\n".join(lines)
