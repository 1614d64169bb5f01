"""``mmebm questions --runs RUN ...``: the paper's open questions as tables from evaluated runs
(``mmebm_dist.evaluate.questions`` reads the runs and builds the document)."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from mmebm_dist.evaluate.questions import QuestionsError, build, read_runs
from mmebm_dist.evaluate.results import write_text_atomic


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", nargs="+", required=True, help="run directories or glob patterns")
    parser.add_argument("--out-md", default="docs/questions.md", help="markdown (default: %(default)s)")
    parser.add_argument("--out-json", default="docs/questions.json", help="JSON (default: %(default)s)")
    parser.add_argument("--notes", default=None, metavar="MD", help="hand-written markdown placed after the "
                        "generated header, marked as hand-written")


def run(args: argparse.Namespace) -> int:
    runs = read_runs(args.runs)
    notes = None
    if args.notes:
        if not Path(args.notes).is_file():
            raise QuestionsError(f"--notes {args.notes}: no such file")
        notes = Path(args.notes).read_text()
    command = shlex.join(["mmebm", "questions", "--runs", *args.runs, "--out-md", args.out_md,
                          "--out-json", args.out_json, *(["--notes", args.notes] if args.notes else [])])
    markdown, data = build(runs, command, notes)
    write_text_atomic(Path(args.out_md), markdown)
    write_text_atomic(Path(args.out_json), json.dumps(data, indent=2, sort_keys=True) + "\n")
    print(f"{len(runs)} evaluated runs: wrote {args.out_md} and {args.out_json}")
    return 0
