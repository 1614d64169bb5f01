"""``mmebm train``: train from a config or resume a run dir (plain, DDP or DeepSpeed: the launcher decides).

mmebm train --config configs/tiny.yaml train.out_dir=runs/tiny train.steps=100
mmebm train --resume runs/tiny train.steps=200
mmebm train --config configs/tiny.yaml --dry-run
mmebm train --resume runs/tiny --checkpoint step-0000100 model.prior.lr=1e-5
accelerate launch --config_file launch/accelerate/cpu_ddp_2proc.yaml -m mmebm_dist.train --config ...

This command sits above ``train`` and ``evaluate``: it hands the training loop the periodic evaluation
(``train.eval_every``) as a callback, so that neither package imports the other.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmebm_dist.config import Config, ConfigError, config_to_dict, load_config
from mmebm_dist.rundir import CONFIG_FILE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="experiment YAML (configs/...)")
    source.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue RUN_DIR from its newest checkpoint that loads, with its saved config.json; overrides "
        "of lrs, betas, the lr schedule, loss weights, guards and logging apply, others are refused",
    )
    parser.add_argument(
        "--checkpoint",
        metavar="NAME",
        help="with --resume: continue from checkpoints/NAME (e.g. step-0000100) instead of the newest; "
        "newer checkpoints are renamed NAME.abandoned",
    )
    parser.add_argument(
        "--trace-samples",
        action="store_true",
        help="write RUN_DIR/trace/rank-<i>.jsonl: a hash of every sample each rank consumed "
        "(audits data splitting and exact resume; costs a hash per sample)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="resolve and validate the config, build the model and read one batch, print the resolved "
        "config and the parameter count, and exit without writing the run directory",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")


def resolve_config(args: argparse.Namespace) -> tuple[Config, bool]:
    """The config to train and whether it resumes; a resumed run keeps its directory."""
    if args.config:
        if getattr(args, "checkpoint", None):
            raise ConfigError("--checkpoint NAME picks a checkpoint of --resume RUN_DIR; add --resume")
        return load_config(args.config, args.overrides), False
    run_dir = Path(args.resume)
    saved = run_dir / CONFIG_FILE
    if not saved.is_file():
        raise ConfigError(
            f"--resume {run_dir}: {saved} does not exist; is it a run directory of `mmebm train`?"
        )
    cfg = load_config(saved, args.overrides)  # JSON is YAML, so the strict loader and overrides apply as-is
    if Path(cfg.train.out_dir).resolve() != run_dir.resolve():
        if any(o.split("=", 1)[0].strip() == "train.out_dir" for o in args.overrides):
            raise ConfigError("--resume RUN_DIR fixes train.out_dir; drop the train.out_dir override")
        cfg.train.out_dir = str(run_dir)  # the directory was moved since it was created
    return cfg, True


def dry_run(cfg: Config, *, resume: bool) -> dict:
    """Build everything a run needs (model, optimizer, restored state when resuming, the data stream) and
    read one batch, writing nothing; returns the resolved config and the parameter counts."""
    from mmebm_dist.train.loop import setup

    session = setup(cfg, resume=resume, record=False)
    _, _, batch = next(session.batches)
    params = list(session.unwrapped.parameters())
    summary = {
        "config": config_to_dict(cfg),
        "parameters": sum(p.numel() for p in params),
        "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
        "batch": {k: list(v.shape) for k, v in batch.items() if hasattr(v, "shape")},
        "start_step": session.state.step,
        "world_size": session.world,
    }
    session.accelerator.end_training()
    return summary


def run_dir_of(argv: list[str]) -> str:
    """The run directory of ``mmebm train ARGV`` (launch/slurm_multinode.sh resumes it after a requeue)."""
    parser = argparse.ArgumentParser(prog="mmebm train")
    add_arguments(parser)
    return resolve_config(parser.parse_args(argv))[0].train.out_dir


def run(args: argparse.Namespace) -> int:
    """Train; exit status 0 when done, EXIT_PREEMPTED (75) when SIGTERM/SIGUSR1 stopped it after a
    checkpoint (resume it)."""
    from mmebm_dist.train.loop import train
    from mmebm_dist.train.signals import EXIT_PREEMPTED

    cfg, resume = resolve_config(args)
    if args.dry_run:
        summary = dry_run(cfg, resume=resume)
        print(json.dumps(summary, indent=2, sort_keys=True))
        print(f"dry run: {summary['parameters']:,} parameters; config valid, model and data built; "
              f"nothing written to {cfg.train.out_dir}")
        return 0
    evaluate = None
    if cfg.train.eval_every > 0:
        from mmebm_dist.evaluate.periodic import periodic_eval as evaluate
    checkpoint = getattr(args, "checkpoint", None)
    summary = train(cfg, resume=resume, trace_samples=args.trace_samples, evaluate=evaluate,
                    checkpoint=checkpoint)
    if summary["is_main_process"]:
        print(json.dumps({k: v for k, v in summary.items() if k != "is_main_process"}))
    return EXIT_PREEMPTED if summary["stopped_by"] else 0
