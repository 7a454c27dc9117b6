"""Summary tables and plots of a GSM8K run, from its ``results.jsonl`` records alone (pandas, matplotlib).

Definitions (sums over questions, never means of ratios, as ``core.metrics``):
- ``tokens_per_s`` = new tokens / wall seconds; ``acceptance_rate`` = accepted / verified draft tokens;
  ``mean_accepted_len`` = accepted draft tokens / runs (a run: a streak of accepted draft tokens ended by a
  rejection or the request's end; recovered and bonus tokens not counted); ``tokens_per_target_forward``.
- ``speedup_vs_X`` of a method = its tokens/s over X's on the same questions, **timed on the same pair** (a
  question whose two records came from different pairs, or sessions, is left out of that ratio). Spread:
  a 95% bootstrap interval over questions (``_ci_lo``/``_ci_hi``) and the quartiles of per-question ratios.
- Losslessness: at temperature 0 every method must emit the same tokens; ``lossless_failures`` lists the
  questions where they differ.
- A drafting method (sd, pearl) that drafted no token at all (the adaptive policy chose plain decoding in
  every round, or the draft was unavailable) has no acceptance and no MAL: they stay NaN in ``summary.csv``
  (None in ``results.jsonl``), never 0, and the table says "never drafted (...)" with the round count.

Run ``python -m pearl_ray.evals.gsm8k_report OUT_DIR`` to rebuild the tables and plots of a run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from .records import read_records

METHOD_ORDER = ("ar", "sd", "pearl")
PLOTS = {"tokens_per_s": "tokens_per_s.png", "speedup": "speedup.png",
         "acceptance": "acceptance_by_position.png", "timeline": "round_timeline.png"}


def to_frame(records: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame.from_records(records)
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    return df.sort_values(["qid", "method"], key=lambda c: c.map(order) if c.name == "method" else c,
                          ignore_index=True) if len(df) else df


def methods_in(df: pd.DataFrame) -> list[str]:
    present = set(df["method"])
    return [m for m in METHOD_ORDER if m in present] + sorted(present - set(METHOD_ORDER))


def lossless_failures(df: pd.DataFrame) -> list[int]:
    """Questions whose greedy outputs differ between methods (only greedy records are compared)."""
    greedy = df[df["temperature"] == 0.0]
    bad = [qid for qid, g in greedy.groupby("qid") if len({tuple(ids) for ids in g["token_ids"]}) > 1]
    return sorted(int(q) for q in bad)


def matched(df: pd.DataFrame, method: str, baseline: str) -> pd.DataFrame:
    """One row per question timed with both methods on the same pair: tokens and wall time of each."""
    cols = ["qid", "pair", "new_tokens", "wall_s"]
    a = df.loc[df["method"] == method, cols]
    b = df.loc[df["method"] == baseline, cols]
    return a.merge(b, on=["qid", "pair"], suffixes=("", "_base"))


def speedup(df: pd.DataFrame, method: str, baseline: str, n_boot: int = 2000, seed: int = 0) -> dict:
    """Aggregate speedup of ``method`` over ``baseline`` (same questions, same pair), its 95% bootstrap
    interval over questions, and the quartiles of the per-question ratios."""
    m = matched(df, method, baseline)
    if m.empty or method == baseline:
        return {}
    tok, wall = m["new_tokens"].to_numpy(float), m["wall_s"].to_numpy(float)
    tok_b, wall_b = m["new_tokens_base"].to_numpy(float), m["wall_s_base"].to_numpy(float)
    ratio = lambda t, w, tb, wb: (t.sum(-1) / w.sum(-1)) / (tb.sum(-1) / wb.sum(-1))  # noqa: E731
    idx = np.random.default_rng(seed).integers(0, len(m), size=(n_boot, len(m)))
    boot = ratio(tok[idx], wall[idx], tok_b[idx], wall_b[idx])
    per_q = (tok / wall) / (tok_b / wall_b)
    return {"": ratio(tok, wall, tok_b, wall_b), "_ci_lo": np.percentile(boot, 2.5),
            "_ci_hi": np.percentile(boot, 97.5), "_q25": np.percentile(per_q, 25),
            "_q75": np.percentile(per_q, 75), "_questions": len(m)}


SPREAD = ("", "_ci_lo", "_ci_hi", "_q25", "_q75", "_questions")
COLUMNS = (["method", "questions", "accuracy_strict", "accuracy_flexible", "new_tokens", "wall_s", "tokens_per_s"]
           + [f"speedup_vs_{b}{k}" for b in ("ar", "sd") for k in SPREAD]
           + ["acceptance_rate", "mean_accepted_len", "tokens_per_target_forward", "rounds", "pre_rounds",
              "post_rounds", "draft_idle_s", "target_idle_s", "draft_failures", "pairs", "drafted_tokens",
              "total_rounds", "plain_rounds", "turn_rounds", "once_rounds", "fallback_rounds"])


def _total(g: pd.DataFrame, column: str) -> float:
    """Sum of a count column over a method's records; NaN when some records (older runs) lack it."""
    if column not in g or g[column].isna().any():
        return np.nan
    return int(g[column].sum())


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """One row per method, columns ``COLUMNS`` (definitions in the module docstring)."""
    rows = []
    for method in methods_in(df):
        g = df[df["method"] == method]
        row = {"method": method, "questions": len(g), "accuracy_strict": g["correct_strict"].mean(),
               "accuracy_flexible": g["correct_flexible"].mean(), "new_tokens": int(g["new_tokens"].sum()),
               "wall_s": g["wall_s"].sum(), "tokens_per_s": g["new_tokens"].sum() / g["wall_s"].sum()}
        for base in ("ar", "sd"):
            row.update({f"speedup_vs_{base}{k}": v for k, v in speedup(df, method, base).items()})
        verified = g["verified_tokens"].sum()
        drafted = _total(g, "drafted_tokens")
        drew = verified and drafted != 0  # never drafted: no acceptance to show (NaN, not 0)
        row.update(acceptance_rate=g["accepted_tokens"].sum() / verified if drew else np.nan,
                   mean_accepted_len=g["accepted_tokens"].sum() / g["runs"].sum() if drew and g["runs"].sum() else np.nan,
                   tokens_per_target_forward=g["new_tokens"].sum() / g["target_forwards"].sum(),
                   rounds=g["rounds"].mean(), pre_rounds=g["pre_rounds"].mean(), post_rounds=g["post_rounds"].mean(),
                   draft_idle_s=g["draft_idle_s"].mean(), target_idle_s=g["target_idle_s"].mean(),
                   draft_failures=int(g["draft_failures"].sum()), pairs=g["pair"].nunique(), drafted_tokens=drafted,
                   total_rounds=int(g["rounds"].sum()), plain_rounds=_total(g, "plain_rounds"),
                   turn_rounds=_total(g, "turn_rounds"), once_rounds=_total(g, "once_rounds"),
                   fallback_rounds=_total(g, "fallback_rounds"))
        rows.append(row)
    return pd.DataFrame(rows).reindex(columns=COLUMNS)


def _count(v) -> int | None:
    return None if v is None or (isinstance(v, float) and np.isnan(v)) else int(v)


def never_drafted(r: dict) -> str | None:
    """For a drafting method's summary row that drafted no token at all: what the table says instead of an
    acceptance of 0 (which would read as a draft that is always rejected); None otherwise."""
    if r["method"] == "ar" or _count(r.get("drafted_tokens")) != 0:
        return None
    rounds, plain = _count(r.get("total_rounds")), _count(r.get("plain_rounds"))
    fallback = _count(r.get("fallback_rounds")) or 0
    if fallback or r.get("draft_failures"):
        return f"never drafted (the draft was unavailable: {fallback} of {rounds} rounds ran without it)"
    if plain is not None and plain < rounds:  # some rounds asked for a window and got no token
        return f"never drafted (the policy chose plain decoding in {plain} of {rounds} rounds)"
    return f"never drafted (the policy chose plain decoding in {rounds} rounds)"


def schedule_shares(r: dict) -> str:
    """The share of a method's rounds per schedule (plain decoding, SD in turn, PEARL at once) in percent,
    or "-" for runs that did not count them."""
    counts = [_count(r.get(f"{s}_rounds")) for s in ("plain", "turn", "once")]
    total = _count(r.get("total_rounds"))
    if None in counts or not total:
        return "-"
    return "/".join(f"{100 * c / total:.0f}%" for c in counts)


def markdown_table(summary: pd.DataFrame) -> str:
    """The summary as a compact Markdown table (speedups with their 95% bootstrap interval)."""
    def num(v, fmt="{:.2f}"):
        return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else fmt.format(v)

    def spd(r, base):
        v = r.get(f"speedup_vs_{base}")
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return "-"
        if r.get(f"speedup_vs_{base}_questions", 0) < 2:  # no interval from one question
            return f"{v:.2f}"
        return f"{v:.2f} [{r[f'speedup_vs_{base}_ci_lo']:.2f}, {r[f'speedup_vs_{base}_ci_hi']:.2f}]"

    def drafting(r) -> bool:  # target-only decoding has no PRE/POST rounds and no draft to idle
        return r["method"] != "ar"

    table = pd.DataFrame([{
        "method": r["method"], "questions": r["questions"],
        "acc strict": num(r["accuracy_strict"], "{:.3f}"), "acc flexible": num(r["accuracy_flexible"], "{:.3f}"),
        "tokens/s": num(r["tokens_per_s"]), "speedup vs AR": spd(r, "ar"), "speedup vs SD": spd(r, "sd"),
        "acceptance": never_drafted(r) or num(r["acceptance_rate"], "{:.3f}"), "MAL": num(r["mean_accepted_len"]),
        "tokens/target fwd": num(r["tokens_per_target_forward"]), "rounds": num(r["rounds"], "{:.1f}"),
        "PRE/POST rounds": f"{r['pre_rounds']:.1f}/{r['post_rounds']:.1f}" if drafting(r) else "-",
        "rounds plain/turn/once": schedule_shares(r),
        "idle s draft/target": (f"{r['draft_idle_s']:.2f}/{r['target_idle_s']:.2f}" if drafting(r)
                                else f"-/{r['target_idle_s']:.2f}"),
    } for r in summary.to_dict("records")])
    return table.to_markdown(index=False, disable_numparse=True)


def write_summary(df: pd.DataFrame, out_dir: Path, header: str = "") -> tuple[pd.DataFrame, list[int], str]:
    """Write ``summary.csv`` and ``summary.md``; return (summary, lossless failures, the Markdown text)."""
    summary = summarize(df)
    summary.to_csv(out_dir / "summary.csv", index=False, float_format="%.6g")
    bad = lossless_failures(df)
    lines = [header, markdown_table(summary), "",
             "What the table shows: speed (tokens/s, and speedup = tokens/s over the baseline's on the same "
             "questions timed on the same pair, [95% bootstrap interval] from 2 questions on), acceptance (MAL: "
             "accepted draft tokens per run) and, below, losslessness; idle: seconds per question."]
    if len(summary) and (summary["accuracy_flexible"].fillna(0) == 0).all():
        cut = int((df.get("finish_reason", pd.Series(dtype=str)) == "length").sum())
        lines += ["", f"accuracy is 0 for every method: {cut} of {len(df)} answers were cut at the token limit "
                      "before their final number (a 135M-parameter target writes long chains of thought and "
                      "rarely solves GSM8K anyway). The methods decode the same tokens, so accuracy cannot "
                      "differ between them; this run measures speed and losslessness, not accuracy."]
    if bad:
        lines += ["", f"**LOSSLESSNESS FAILURE**: greedy outputs differ between methods on {len(bad)} "
                      f"question(s): {bad[:20]}"]
    elif (df["temperature"] == 0.0).all() and len(methods_in(df)) > 1:
        lines += ["", "lossless: every question's greedy tokens are identical across methods."]
    text = "\n".join(line for line in lines if line is not None).strip() + "\n"
    (out_dir / "summary.md").write_text(text)
    return summary, bad, text


# -- plots -------------------------------------------------------------------------------------------------
SUBTITLE = {"text": ""}
"""The line under every plot's title: pair, prompt format, questions, machine (``subtitle_for``)."""


def subtitle_for(df: pd.DataFrame, pair: str = "") -> str:
    import os
    import platform

    fmt = df["prompt_format"].iloc[0] if "prompt_format" in df and len(df) else "?"
    return (f"{pair + ', ' if pair else ''}{fmt} prompts, {df['qid'].nunique()} question(s); "
            f"{platform.machine()} machine, {os.cpu_count()} CPUs")


def _figure(width: float = 6.4, height: float = 4.0, rows: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(rows, 1, figsize=(width, height * rows), squeeze=False)
    if SUBTITLE["text"]:
        fig.text(0.5, 0.005, SUBTITLE["text"], ha="center", va="bottom", fontsize=7, color="dimgray")
    return plt, fig, ax


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout(rect=(0, 0.04 if SUBTITLE["text"] else 0, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tokens_per_s(df: pd.DataFrame, path: Path) -> None:
    plt, fig, ax = _figure()
    methods = methods_in(df)
    groups = [df[df["method"] == m] for m in methods]
    ax[0, 0].boxplot([(g["new_tokens"] / g["wall_s"]).to_numpy() for g in groups], tick_labels=methods)
    agg = [g["new_tokens"].sum() / g["wall_s"].sum() for g in groups]
    ax[0, 0].plot(range(1, len(methods) + 1), agg, "D", color="tab:red", label="all questions")
    ax[0, 0].set(ylabel="tokens/s", title="Decoding speed per question")
    ax[0, 0].legend()
    _save(plt, fig, path)


def plot_speedup(df: pd.DataFrame, path: Path) -> bool:
    pairs = [(m, b) for b in ("ar", "sd") for m in methods_in(df) if m != b and m != "ar"]
    data, labels = [], []
    for m, b in pairs:
        mm = matched(df, m, b)
        if not mm.empty:
            data.append(((mm["new_tokens"] / mm["wall_s"]) / (mm["new_tokens_base"] / mm["wall_s_base"])).to_numpy())
            labels.append(f"{m} / {b}")
    if not data:
        return False
    plt, fig, ax = _figure()
    ax[0, 0].boxplot(data, tick_labels=labels)
    ax[0, 0].axhline(1.0, color="grey", lw=0.8, ls="--", label="1.0 = as fast as the baseline")
    ax[0, 0].set(ylabel="speedup (per question, same pair)", title="Speedup")
    ax[0, 0].legend(loc="best", fontsize=8)
    _save(plt, fig, path)
    return True


def plot_acceptance(df: pd.DataFrame, path: Path) -> bool:
    plt, fig, ax = _figure()
    drawn = False
    for m in methods_in(df):
        acc, ver = np.zeros(0), np.zeros(0)
        g = df[df["method"] == m]
        for a, v in zip(g["accepted_by_position"], g["verified_by_position"]):
            n = max(len(acc), len(v))
            acc, ver = np.pad(acc, (0, n - len(acc))), np.pad(ver, (0, n - len(ver)))
            acc[: len(a)] += a
            ver[: len(v)] += v
        if ver.sum() == 0:
            continue
        keep = ver > 0
        ax[0, 0].plot(np.arange(len(ver))[keep], acc[keep] / ver[keep], "o-", label=m)
        drawn = True
    if drawn:
        from matplotlib.ticker import MaxNLocator

        ax[0, 0].set(xlabel="position in the draft window (0 = first drafted token)",
                     ylabel="accepted / verified at that position", ylim=(0, 1.05),
                     title="Acceptance by window position (conditional: verified only if all before it passed)")
        ax[0, 0].title.set_fontsize(9)
        ax[0, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
        ax[0, 0].legend()
        _save(plt, fig, path)
    else:
        plt.close(fig)
    return drawn


def plot_timeline(df: pd.DataFrame, path: Path) -> bool:
    """Draft and target busy time per round for one question (the first with a PEARL record), PEARL and SD."""
    shown = [m for m in ("pearl", "sd") if m in set(df["method"])]
    if not shown:
        return False
    qid = int(df.loc[df["method"] == shown[0], "qid"].min())
    plt, fig, ax = _figure(9.0, 2.6, rows=len(shown))
    for row, m in zip(ax[:, 0], shown):
        rec = df[(df["method"] == m) & (df["qid"] == qid)]
        if rec.empty:
            continue
        rec = rec.iloc[0]
        for side, y, color in (("draft", 1, "tab:orange"), ("target", 0, "tab:blue")):
            spans = [(r[f"{side}_t"], r[f"{side}_busy_s"]) for r in rec["round_timings"] if r[f"{side}_t"] is not None]
            row.broken_barh(spans, (y - 0.35, 0.7), color=color)
        for i, r in enumerate(rec["round_timings"]):
            if r["mode"] == "post":
                row.axvspan(r["t"], r["t"] + r["round_s"], color="grey", alpha=0.08, lw=0)
            if i == 0 and r["t"] is not None:  # the first round's target forward reads the whole prompt
                row.annotate("prompt pass", (r["t"], 0.45), fontsize=7, color="tab:blue")
        row.set(yticks=[0, 1], yticklabels=["target", "draft"], xlabel="seconds since the first round",
                title=f"{m}, question {qid}: {len(rec['round_timings'])} rounds; idle draft "
                      f"{rec['draft_idle_s']:.2f} s, target {rec['target_idle_s']:.2f} s (shaded: POST rounds)")
        row.title.set_fontsize(9)
    _save(plt, fig, path)
    return True


def make_plots(df: pd.DataFrame, out_dir: Path, pair: str = "") -> list[Path]:
    """Write the PNG plots that the records support; return their paths. Each has a subtitle naming the
    pair, the prompt format, the number of questions and the machine."""
    SUBTITLE["text"] = subtitle_for(df, pair)
    written = []
    plot_tokens_per_s(df, out_dir / PLOTS["tokens_per_s"])
    written.append(out_dir / PLOTS["tokens_per_s"])
    for name, fn in (("speedup", plot_speedup), ("acceptance", plot_acceptance), ("timeline", plot_timeline)):
        if fn(df, out_dir / PLOTS[name]):
            written.append(out_dir / PLOTS[name])
    return written


USAGE = "usage: python -m pearl_ray.evals.gsm8k_report OUT_DIR   (a GSM8K job's --out folder, with results.jsonl)"


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr if len(args) != 1 else sys.stdout)
        return 2 if len(args) != 1 else 0
    out_dir = Path(args[0])
    if not (out_dir / "results.jsonl").exists():
        print(f"no {out_dir / 'results.jsonl'}\n{USAGE}", file=sys.stderr)
        return 1
    df = to_frame(read_records(out_dir / "results.jsonl"))
    if df.empty:
        print(f"no records in {out_dir / 'results.jsonl'}", file=sys.stderr)
        return 1
    _, bad, text = write_summary(df, out_dir)
    print(text)
    for p in make_plots(df, out_dir):
        print(f"plot: {p}")
    return 3 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
