"""``mmebm export RUN --out DIR [--checkpoint NAME] [--push USER/REPO]``: a run's model as an export folder
(model.safetensors, config.json, a README.md model card; mmebm_dist/export.py), optionally pushed to the
Hugging Face Hub."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory written by `mmebm train`")
    parser.add_argument("--out", required=True, help="new folder for the export")
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint directory or name under RUN/checkpoints (default: the newest)")
    parser.add_argument("--eval-name", default="eval",
                        help="folder under RUN whose eval.json gives the card figures (default: %(default)s)")
    parser.add_argument("--data", default=None,
                        help="the run's data set, for the vocabulary of text modalities (default: data.path)")
    parser.add_argument("--push", default=None, metavar="USER/REPO",
                        help="also upload the export to this Hugging Face Hub model repo (the hub extra)")
    parser.add_argument("--private", action="store_true", help="create the Hub repo private (with --push)")


def run(args: argparse.Namespace) -> int:
    from mmebm_dist import export

    out = export.export_run(args.run, args.out, checkpoint=args.checkpoint, eval_name=args.eval_name,
                            data=args.data)
    print(f"wrote {out}: {export.WEIGHTS_FILE}, config.json, {export.CARD_FILE}")
    if args.push:
        url = export.push_export(out, args.push, private=args.private)
        print(f"pushed {out} to {url}")
    return 0
