"""Test accuracy on the digits set: baseline vs xvolified (two site policies), over several seeds, plus fusion.

    python examples/accuracy_study.py    # 5 seeds x 3 policies x 3 epochs: about 4 min on an idle core

For every seed, each policy starts from the same torchvision initialisation
(the X-volution sites keep the conv weights they replace; their attention
branches start silent) and sees the same batches in the same order: plain SGD
(momentum 0.9, weight decay 1e-4, lr 0.05), batch 64, 32 px images, a fixed
number of epochs, no augmentation, no tuning. The split is the fixed 80/20
split of examples/digits.py (1437 train / 360 test images). After training,
each xvolified model is fused into its deploy form and evaluated again: the
fused predictions must equal the unfused ones; the count of differing argmax
predictions is reported, not hidden.

The markdown table goes to stdout and to --out (docs/accuracy.md), with the
command that produced it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from classifiers import SITE_POLICIES, build_model, fuse_for_deploy, site_names
from digits import accuracy, digits_loaders, predict, train_steps

import xvol_compiler

POLICY_TEXT = {
    "none": "baseline (no X-volution)",
    "os16": "X-volution, default sites: 3x3 convs at output stride 16",
    "os8+16": "X-volution, 3x3 convs at output strides 8 and 16",
}


@dataclass
class Run:
    policy: str
    seed: int
    sites: int
    params: int
    accuracy: float
    fused_accuracy: float | None
    differing: int | None
    fused_rel_err: float | None
    n_test: int
    steps: int
    train_s: float


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--policies", default="none,os16,os8+16", help="comma-separated: " + ", ".join(SITE_POLICIES))
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds (at least 3 for a spread)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)")
    p.add_argument("--out", type=Path, default=Path("docs/accuracy.md"), help="markdown file ('-' for none)")
    args = p.parse_args(argv)
    args.policies = [s.strip() for s in args.policies.split(",") if s.strip()]
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    unknown = [q for q in args.policies if q not in SITE_POLICIES]
    if unknown:
        p.error(f"unknown policies {unknown}; choose from {sorted(SITE_POLICIES)}")
    if len(set(args.seeds)) < 3:
        p.error("give at least 3 distinct seeds: one or two runs say nothing about the spread")
    return args


def run_one(args: argparse.Namespace, policy: str, seed: int) -> Run:
    torch.manual_seed(seed)
    model = build_model(args.model, policy)
    train, test = digits_loaders(args.image_size, args.batch_size, seed)
    steps = args.epochs * len(train)
    start = time.perf_counter()
    train_steps(model, train, steps=steps, lr=args.lr)
    train_s = time.perf_counter() - start
    logits, labels = predict(model, test)
    run = Run(policy, seed, len(site_names(model)), sum(p.numel() for p in model.parameters()),
              accuracy(logits, labels), None, None, None, len(labels), steps, train_s)
    if run.sites:
        example = next(iter(test))[0]
        # No verification inside fuse: the comparison below covers the whole test set, and a difference is
        # reported in the table rather than stopping the study.
        fused = fuse_for_deploy(model, example, verify=False)
        fused_logits, _ = predict(fused, test)
        run.fused_accuracy = accuracy(fused_logits, labels)
        run.differing = int((fused_logits.argmax(1) != logits.argmax(1)).sum())
        run.fused_rel_err = float((fused_logits - logits).abs().max() / logits.abs().max())
    return run


def mean_std(values: list[float]) -> str:
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def paired_t(diffs: list[float]) -> tuple[float, float]:
    """(t statistic of the mean paired difference, two-sided 95% critical value for len - 1 degrees of freedom)."""
    from scipy.stats import t as student_t  # scipy comes with scikit-learn

    n = len(diffs)
    sd = statistics.stdev(diffs)
    t = statistics.mean(diffs) / (sd / n**0.5) if sd > 0 else float("inf")
    return t, float(student_t.ppf(0.975, n - 1))


def table(args: argparse.Namespace, runs: list[Run], command: str, wall_s: float, load: float) -> str:
    by_policy = {q: [r for r in runs if r.policy == q] for q in args.policies}
    base = {r.seed: r.accuracy for r in by_policy.get("none", [])}
    fuse_path = "xvol_compiler.fuse (whole model)" if hasattr(xvol_compiler, "fuse") else \
        "XVolution.fuse() per site (module level)"
    steps = runs[0].steps
    lines = [
        f"# Accuracy study: {args.model} on the scikit-learn digits set",
        "",
        f"Produced by `{command}` (torch {torch.__version__}, {args.threads} CPU thread(s), "
        f"{wall_s / 60:.1f} min wall; load average {load:.1f} when it started).",
        "",
        f"Budget, fixed before looking at results: {args.image_size} px images, batch {args.batch_size}, "
        f"{args.epochs} epochs ({steps} SGD steps: lr {args.lr}, momentum 0.9, weight decay 1e-4), no augmentation; "
        f"the fixed 80/20 split of `examples/digits.py` ({runs[0].n_test} test images); "
        f"seeds {', '.join(map(str, args.seeds))}. For a seed, every policy starts from the same initial "
        "network weights and sees the same batches. Test accuracy in %, mean ± sample std over seeds; "
        "Δ is the per-seed difference to the baseline (paired), mean ± std.",
        "",
        "| policy | sites | params | test accuracy % | Δ vs baseline (pp) | paired t (95%) | per seed "
        "| fused accuracy % | differing fused predictions | max fused/unfused logit rel. diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for q, rs in by_policy.items():
        accs = [r.accuracy for r in rs]
        delta, tstat = "—", "—"
        if q != "none" and base:
            d = [r.accuracy - base[r.seed] for r in rs if r.seed in base]
            if len(d) > 2:
                delta = f"{100 * statistics.mean(d):+.2f} ± {100 * statistics.stdev(d):.2f}"
                t, crit = paired_t(d)
                verdict = "significant" if abs(t) > crit else "not significant"
                tstat = f"{t:+.2f} ({verdict}: needs t beyond ±{crit:.2f})"
        if rs[0].sites:
            fused = mean_std([r.fused_accuracy for r in rs if r.fused_accuracy is not None])
            differing = f"{sum(r.differing or 0 for r in rs)} of {sum(r.n_test for r in rs)}"
            err = f"{max(r.fused_rel_err or 0.0 for r in rs):.1e}"
        else:
            fused, differing, err = "—", "—", "—"
        per_seed = " / ".join(f"{100 * a:.1f}" for a in accs)
        lines.append(f"| {POLICY_TEXT.get(q, q)} | {rs[0].sites} | {rs[0].params / 1e6:.2f}M | {mean_std(accs)} "
                     f"| {delta} | {tstat} | {per_seed} | {fused} | {differing} | {err} |")
    mean_train = statistics.mean(r.train_s for r in runs)
    lines += [
        "",
        f"Fusion: {fuse_path}; fused accuracy is measured on the fused model, not copied. "
        f"Mean training time per run: {mean_train:.1f} s.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python examples/accuracy_study.py" + ("" if not sys.argv[1:] else " " + shlex.join(sys.argv[1:]))
    runs = []
    load = os.getloadavg()[0]
    start = time.perf_counter()
    for seed in args.seeds:
        for policy in args.policies:
            run = run_one(args, policy, seed)
            runs.append(run)
            fused = "" if run.fused_accuracy is None else (
                f", fused {100 * run.fused_accuracy:.2f}% ({run.differing} differing predictions)")
            print(f"seed {seed} {policy:7s} {100 * run.accuracy:.2f}%{fused}  [{run.train_s:.0f} s]", flush=True)
    text = table(args, runs, command, time.perf_counter() - start, load)
    print()
    print(text)
    if str(args.out) != "-":
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(args.out)
    return 1 if any(r.differing for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
