"""``mmebm sample --run RUN_DIR --joint 64 --cross``: PNG grids of joint samples and of cross generation
(rows: source modality, columns: target). Text modalities are drawn as their decoded captions."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run directory written by `mmebm train`")
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint directory or name under RUN/checkpoints (default: the newest)")
    parser.add_argument("--joint", type=int, default=64, help="joint samples to draw (0: none)")
    parser.add_argument("--cross", action="store_true", help="also write the cross-generation matrix")
    parser.add_argument("--cross-examples", type=int, default=8, help="test tuples shown per matrix cell")
    parser.add_argument("--langevin-steps", type=int, default=None,
                        help="Langevin steps of joint sampling (default: the run's config)")
    parser.add_argument("--data", default=None, help="dataset directory (default: the run's data.path)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--out", default=None, help="output directory (default: RUN/samples)")


def run(args: argparse.Namespace) -> int:
    from mmebm_dist import export
    from mmebm_dist.evaluate import generate, report

    if args.joint <= 0 and not args.cross:
        raise SystemExit("nothing to do: pass --joint N (N > 0) and/or --cross")
    device = generate.resolve_device(args.device)
    loaded = generate.load_run(args.run, checkpoint=args.checkpoint, device=device)
    out = export.output_dir(args.run, args.out, "samples")
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data or loaded.cfg.data.path)
    vocabularies = generate.text_vocabularies(loaded.cfg, data, run_dir=loaded.run_dir)
    written = []
    if args.joint > 0:
        samples = generate.joint_samples(loaded.model, args.joint, seed=args.seed,
                                         langevin_steps=args.langevin_steps)
        steps = loaded.cfg.model.prior.langevin.steps if args.langevin_steps is None else args.langevin_steps
        detail = f", {steps} Langevin steps" if loaded.model.energy is not None else ""
        written.append(report.save_joint_grid(out / f"joint_step{loaded.step}.png", samples,
                                              title=f"joint samples, step {loaded.step}{detail}",
                                              vocabularies=vocabularies))
    if args.cross:
        generate.check_data(loaded, data)
        (batch,) = generate.read_chunks(data, num=args.cross_examples, batch_size=args.cross_examples)
        sources, generated = generate.cross_samples(loaded.model, batch, seed=args.seed)
        written.append(report.save_cross_grid(out / f"cross_step{loaded.step}.png", sources, generated,
                                              title=f"cross generation, step {loaded.step}",
                                              vocabularies=vocabularies))
    for path in written:
        print(f"wrote {path}")
    return 0
