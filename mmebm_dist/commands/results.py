"""``mmebm results --runs RUN ...``: aggregate evaluated runs into docs/results.{md,json} and PNGs
(``mmebm_dist.evaluate.results`` reads the runs and writes the documents)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from mmebm_dist.evaluate.results import (
    ResultsError,
    build_results,
    find_run_dirs,
    load_run_checked,
    render_markdown,
    write_images,
    write_text_atomic,
)
from mmebm_dist.reporting.tables import json_safe
from mmebm_dist.rundir import EVAL_JSON, portable_argv


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", nargs="+", required=True,
                        help="run directories or glob patterns (e.g. runs/results/*); files are ignored")
    parser.add_argument("--eval-name", default="eval",
                        help="eval directory inside each run, as written by `mmebm eval --out RUN/NAME`")
    parser.add_argument("--likelihood-eval", default=None, metavar="NAME",
                        help="eval directory inside each run whose test log-likelihood (`mmebm eval "
                             "--likelihood-particles`) fills the log p(X) figures where --eval-name's has "
                             "none")
    parser.add_argument("--out-md", default="docs/results.md", help="markdown report (default: %(default)s)")
    parser.add_argument("--out-json", default="docs/results.json",
                        help="JSON of every figure (default: %(default)s)")
    parser.add_argument("--img-dir", default="docs/img/results", help="PNG directory (default: %(default)s)")
    parser.add_argument("--notes", default=None, metavar="MD",
                        help="hand-written markdown (the budget, the choices made and why) placed after "
                             "the generated header, marked as hand-written")


def command_line(args: argparse.Namespace) -> str:
    """The ``mmebm results`` command equivalent to ``args`` (globs expanded as the shell gave them)."""
    notes = ["--notes", args.notes] if getattr(args, "notes", None) else []
    ll = ["--likelihood-eval", args.likelihood_eval] if getattr(args, "likelihood_eval", None) else []
    return shlex.join(portable_argv(["mmebm", "results", "--runs", *args.runs, "--eval-name", args.eval_name,
                                     *ll, "--out-md", args.out_md, "--out-json", args.out_json, "--img-dir",
                                     args.img_dir, *notes]))


def run(args: argparse.Namespace) -> int:
    runs = []
    for run_dir in find_run_dirs(args.runs):
        record, missing = load_run_checked(run_dir, args.eval_name, getattr(args, "likelihood_eval", None))
        if record is None:
            print(f"warning: skipping {run_dir}: {missing}", file=sys.stderr)
            continue
        runs.append(record)
    if not runs:
        raise ResultsError(f"none of the {len(args.runs)} --runs paths holds a run with a complete "
                           f"{args.eval_name}/{EVAL_JSON}; evaluate one with `mmebm eval --run RUN "
                           f"--out RUN/{args.eval_name}`")
    report = build_results(runs, command=command_line(args))
    out_md, out_json, img_dir = Path(args.out_md), Path(args.out_json), Path(args.img_dir)
    images = write_images(report, runs, img_dir)
    strict = json.dumps(json_safe(report), indent=2, sort_keys=True, allow_nan=False)
    write_text_atomic(out_json, strict + "\n")
    notes = None
    if getattr(args, "notes", None):
        notes_path = Path(args.notes)
        if not notes_path.is_file():
            raise ResultsError(f"--notes {notes_path}: no such file")
        notes = notes_path.read_text()
    markdown = render_markdown(report, images, out_md.parent, notes=notes, notes_path=args.notes)
    write_text_atomic(out_md, markdown)
    pictures = sum(len(v) for v in images.values())
    print(f"{len(runs)} runs in {len(report['settings'])} settings: wrote {out_md}, {out_json} and "
          f"{pictures} pictures under {img_dir}")
    return 0
