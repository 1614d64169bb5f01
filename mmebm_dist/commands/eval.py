"""``mmebm eval --run RUN_DIR``: coherence (joint, cross matrix, k-of-M subsets, aggregate-posterior ceiling,
Langevin sweep), test-set objective terms and a linear probe; writes eval.json, report.md and PNGs.

Digit data sets are judged by one classifier per modality (``mmebm classifiers train``); the generated birds
by their known attributes (``mmebm_dist.evaluate.judges.birds``: exact caption reader, image attribute
classifier), in the same layout. Generated captions are drawn into the grids and listed in report.md.

Under torchrun / ``accelerate launch`` (WORLD_SIZE > 1) the samples and test tuples are split over the
processes and the counts summed with one all_reduce; rank 0 writes the files. Example:
``torchrun --nproc_per_node 2 -m mmebm_dist eval --run-dir RUN`` (torchrun's parser rejects ``--run``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mmebm_dist.evaluate.latent_samplers import FlowOptions

DEFAULT_BATCH = 250
PICTURE_JOINT = 64
PICTURE_CROSS = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", "--run-dir", dest="run", required=True,
                        help="run directory written by `mmebm train` (spell it --run-dir under torchrun, "
                             "whose parser mistakes --run for its own --run-path)")
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint directory or name under RUN/checkpoints (default: the newest)")
    parser.add_argument("--classifiers", default=None,
                        help="classifier directory (default: eval.classifiers, else DATA/classifiers)")
    parser.add_argument("--data", default=None, help="dataset directory (default: the run's data.path)")
    parser.add_argument("--num-samples", type=int, default=None,
                        help="joint samples and test tuples per figure (default: the run's eval.num_samples)")
    parser.add_argument("--langevin-sweep", type=int, nargs="*", default=None,
                        help="Langevin step counts of the sweep (EBM runs; default: eval.langevin_sweep; "
                             "give the flag alone to skip the sweep)")
    parser.add_argument("--subset-sizes", type=int, nargs="*", default=None,
                        help="k of the k-of-M conditioning figures, 2 <= k < M (default: all)")
    parser.add_argument("--probe-fit", type=int, default=None,
                        help="train tuples the linear probe is fit on (default: --num-samples; 0 skips it)")
    parser.add_argument("--no-elbo", action="store_true", help="skip the test-set objective terms")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="generation / test batch size")
    parser.add_argument("--seed", type=int, default=0, help="seed of every sample drawn")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--out", default=None, help="output directory (default: RUN/eval)")
    add_beyond_coherence_arguments(parser)
    add_sampler_arguments(parser)


def add_beyond_coherence_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the figures beyond coherence (``evaluate.beyond_coherence.BeyondOptions``)."""
    group = parser.add_argument_group("beyond coherence (sample quality, likelihood, posterior refinement)")
    group.add_argument("--no-frechet", action="store_true",
                       help="skip the Frechet distance in the classifiers' penultimate features (digit "
                            "data sets; the birds have none)")
    group.add_argument("--inception-weights", default=None, metavar="PTH",
                       help="local InceptionV3 weights file (torch-fidelity's): also compute the standard "
                            "FID of image modalities; nothing is downloaded")
    group.add_argument("--likelihood-particles", type=int, default=0, metavar="K",
                       help="importance-weighted test log p(X) and log p(x_m) with K particles (e.g. 1000; "
                            "default 0: skip)")
    group.add_argument("--likelihood-tuples", type=int, default=100, metavar="N",
                       help="test tuples the log-likelihood is averaged over (default: %(default)s)")
    group.add_argument("--log-z-samples", type=int, default=100_000,
                       help="reference draws of the Monte Carlo log Z of an EBM prior (default: %(default)s)")
    group.add_argument("--log-z-max-stderr", type=float, default=0.05,
                       help="above this Monte Carlo standard error, log Z comes from AIS "
                            "(default: %(default)s)")
    group.add_argument("--ais-chains", type=int, default=1000, help="AIS chains (default: %(default)s)")
    group.add_argument("--ais-temperatures", type=int, default=300,
                       help="AIS temperatures, one MALA step each (default: %(default)s)")
    group.add_argument("--ais-step-size", type=float, default=0.2,
                       help="AIS MALA step (default: %(default)s)")
    group.add_argument("--refine-steps", type=int, nargs="*", default=None, metavar="K",
                       help="posterior-refinement Langevin steps to measure, e.g. 0 10 30 (default: skip)")
    group.add_argument("--refine-step-size", type=float, default=0.02,
                       help="posterior-refinement Langevin step size s (drift s^2/2; default: %(default)s)")


def add_sampler_arguments(parser: argparse.ArgumentParser) -> None:
    """The post-hoc latent sampler flags (``evaluate.latent_samplers.SamplerOptions``)."""
    from mmebm_dist.evaluate.latent_samplers import DEFAULT_FIT_TUPLES, FlowOptions

    group = parser.add_argument_group("post-hoc latent samplers (baselines for the EBM prior)")
    group.add_argument("--gmm-components", type=int, nargs="+", default=None, metavar="K",
                       help="fit a K-component Gaussian mixture (full covariances) to the aggregate "
                            "posterior of the train split and measure the joint coherence of its decoded "
                            "draws, per K (e.g. 10 50; default: skip)")
    group.add_argument("--flow", action="store_true",
                       help="fit a masked autoregressive flow (zuko MAF) to the same aggregate-posterior "
                            "draws by maximum likelihood and measure the joint coherence of its decoded "
                            "draws")
    defaults = FlowOptions()
    for name, kind, text in (
            ("transforms", int, "autoregressive transforms"), ("hidden", int, "width of the 2 hidden layers"),
            ("steps", int, "Adam steps (the best held-out likelihood's parameters are kept)"),
            ("lr", float, "Adam learning rate"), ("batch_size", int, "minibatch size"),
            ("eval_every", int, "steps between held-out evaluations")):
        group.add_argument(f"--flow-{name.replace('_', '-')}", type=kind, default=None,
                           help=f"with --flow: {text} (default: {getattr(defaults, name)})")
    group.add_argument("--sampler-fit", "--gmm-fit", dest="sampler_fit", type=int, default=DEFAULT_FIT_TUPLES,
                       metavar="N",
                       help="train tuples the samplers are fitted to (default: %(default)s, or the whole "
                            "split when smaller; the flow holds out a tenth of them)")


def flow_options(args: argparse.Namespace) -> FlowOptions | None:
    """The ``--flow-*`` options (None without ``--flow``); a bad or orphaned one is a one-line SystemExit."""
    from mmebm_dist.evaluate.latent_samplers import FlowOptions

    given = {name: getattr(args, f"flow_{name}") for name in FlowOptions.__dataclass_fields__
             if getattr(args, f"flow_{name}", None) is not None}
    if not args.flow:
        if given:
            flags = ", ".join(f"--flow-{k.replace('_', '-')}" for k in given)
            raise SystemExit(f"{flags} given without --flow: add --flow to fit the flow, or drop them")
        return None
    bad = {k: v for k, v in given.items() if not v > 0}
    if bad:
        k, v = next(iter(bad.items()))
        raise SystemExit(f"--flow-{k.replace('_', '-')} {v}: must be > 0")
    return FlowOptions(**given)


def check_sampler_arguments(args: argparse.Namespace) -> FlowOptions | None:
    """Check the sampler flags before any work (one-line SystemExit naming the flag); the flow's options."""
    if args.gmm_components and min(args.gmm_components) < 1:
        raise SystemExit(f"--gmm-components {args.gmm_components}: every K must be >= 1")
    if args.sampler_fit < 1:
        raise SystemExit(f"--sampler-fit {args.sampler_fit}: must be >= 1")
    return flow_options(args)




def _print_summary(results: dict, out_dir: Path) -> None:
    coh = results["coherence"]
    print(f"step {results['run']['step']}: joint coherence {coh['joint']['coherence']:.4f} "
          f"+- {coh['joint']['stderr']:.4f} (n={coh['joint']['n']}), cross coherence "
          f"{coh['cross'].get('coherence', math.nan):.4f}, aggregate-posterior ceiling "
          f"{coh.get('prior_ceiling', {}).get('coherence', math.nan):.4f}")
    if coh.get("measure") == "attributes":
        cross = coh["cross"]
        print(f"  by attributes (image classifier mean test accuracy "
              f"{results['classifiers']['test_accuracy'].get('mean', math.nan):.4f}): cross coherence "
              f"{cross['coherence']:.4f} +- {cross['stderr']:.4f} (n={cross['n']})")
        entries = [("joint", coh["joint"]), *cross["cells"].items(), ("real test tuples", coh["real_data"])]
        for name, entry in entries:
            print(f"  {name}: coherence {entry['coherence']:.4f} +- {entry['stderr']:.4f} (n={entry['n']}), "
                  f"mean attribute accuracy {entry['mean_attribute_accuracy']:.4f} "
                  f"+- {entry['mean_attribute_stderr']:.4f}")
    for entry in coh.get("langevin_sweep", []):
        print(f"  langevin K={entry['steps']:4d}: joint coherence {entry['coherence']:.4f} "
              f"({entry['ms_per_sample']:.3f} ms/sample)")
    print(f"wrote {out_dir / 'eval.json'} and {out_dir / 'report.md'}")


def run(args: argparse.Namespace) -> int:
    from mmebm_dist.evaluate import generate

    rank, world = generate.init_distributed_from_env()
    try:
        code = evaluate(args, rank, world)
        if world > 1:
            torch.distributed.barrier()  # rank 0 writes the files while the others wait
        return code
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _linear_probe(model, data_path: Path, chunks, *, fit: int, batch_size: int, seed: int,
                  device: torch.device) -> dict:
    """Linear-probe accuracy of the posterior mean of z, fitted on ``fit`` train tuples, scored on chunks."""
    from mmebm_dist.evaluate import generate, latent

    fit_chunks = generate.read_chunks(data_path, num=fit, batch_size=batch_size, split="train")
    features = lambda batch: latent.posterior_mean(model, batch)
    train_x, train_y = latent.collect_features(features, fit_chunks, device)
    test_x, test_y = latent.collect_features(features, [c for c in chunks if c is not None], device)
    return {"accuracy": latent.linear_probe_accuracy(train_x, train_y, test_x, test_y, seed=seed),
            "n_fit": len(train_y), "fit_split": "train", "n_eval": len(test_y), "eval_split": "test",
            "features": "posterior mean of the shared latent z"}


def evaluate(args: argparse.Namespace, rank: int, world: int) -> int:
    """Every figure of ``mmebm eval``; this process is ``rank`` of ``world`` (rank 0 writes the files)."""
    from mmebm_dist import export
    from mmebm_dist.evaluate import generate, latent, latent_samplers, report
    from mmebm_dist.evaluate.coherence import measure_coherence
    from mmebm_dist.evaluate.judges import judge_module

    start = time.perf_counter()
    out_dir = export.output_dir(args.run, args.out, "eval")
    device = generate.resolve_device(args.device)
    loaded = generate.load_run(args.run, checkpoint=args.checkpoint, device=device)
    cfg, model = loaded.cfg, loaded.model
    data_path = Path(args.data or cfg.data.path)
    data_hash = generate.check_data(loaded, data_path)
    vocabularies = generate.text_vocabularies(cfg, data_path)
    clf_dir = Path(args.classifiers or cfg.eval.classifiers or data_path / "classifiers")
    num = args.num_samples or cfg.eval.num_samples
    is_ebm = model.energy is not None
    sweep = tuple(cfg.eval.langevin_sweep if args.langevin_sweep is None else args.langevin_sweep)
    m = len(model.modalities)
    subset_sizes = tuple(range(2, m)) if args.subset_sizes is None else tuple(args.subset_sizes)
    joint_steps = cfg.model.prior.langevin.steps if is_ebm else None
    common = {"num_samples": num, "batch_size": args.batch_size, "seed": args.seed,
              "joint_langevin_steps": joint_steps, "langevin_sweep": sweep if is_ebm else (), "rank": rank,
              "world_size": world, "show_progress": rank == 0}

    bad = [k for k in subset_sizes if not 2 <= k < m]
    if bad:
        raise SystemExit(f"--subset-sizes {bad}: with {m} modalities a subset size k must be in 2..{m - 1}")
    flow = check_sampler_arguments(args)
    kind = judge_module(data_path)
    judge = kind.load_judge(clf_dir, data_path, manifest_hash=data_hash, modalities=model.modalities,
                            device=device)
    chunks = kind.read_test_chunks(data_path, num=num, batch_size=args.batch_size, rank=rank,
                                   world_size=world)
    coherence = measure_coherence(model, judge, chunks, subset_sizes=subset_sizes, **common)
    from mmebm_dist.evaluate import beyond_coherence

    beyond_options = beyond_coherence.BeyondOptions(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(beyond_coherence.BeyondOptions)})
    beyond = beyond_coherence.measure(
        beyond_options, model=model, classifiers=judge.classifiers,
        chunks=chunks, num_samples=num, joint_langevin_steps=joint_steps, subset_sizes=subset_sizes,
        device=device, rank=rank, world_size=world)
    sampler_options = latent_samplers.SamplerOptions(
        batch_size=args.batch_size, seed=args.seed, gmm_components=args.gmm_components, flow=flow,
        sampler_fit=args.sampler_fit)
    samplers = latent_samplers.measure_requested(sampler_options, model, judge, data_path, num_samples=num,
                                                 rank=rank, world_size=world)
    elbo = None if args.no_elbo else latent.objective_terms(model, chunks, rank=rank, world_size=world,
                                                            seed=args.seed)
    if rank != 0:
        return 0

    fit = num if args.probe_fit is None else args.probe_fit
    probe = _linear_probe(model, data_path, chunks, fit=fit, batch_size=args.batch_size, seed=args.seed,
                          device=device) if fit > 0 else None

    out_dir.mkdir(parents=True, exist_ok=True)
    images = {"joint samples": report.JOINT_PNG, "cross generation (rows: source, columns: target)":
              report.CROSS_PNG, "cross-coherence matrix": report.HEATMAP_PNG}
    pictures = generate.joint_samples(model, PICTURE_JOINT, seed=args.seed, langevin_steps=joint_steps)
    per_row = report.joint_per_row(pictures)
    report.save_joint_grid(out_dir / report.JOINT_PNG, pictures, title=f"joint samples, step {loaded.step}",
                           vocabularies=vocabularies, per_row=per_row)
    first = next(c for c in chunks if c is not None)
    picture_batch = {k: v[:PICTURE_CROSS] for k, v in first.items()}
    sources, generated = generate.cross_samples(model, picture_batch, seed=args.seed)
    report.save_cross_grid(out_dir / report.CROSS_PNG, sources, generated,
                           title=f"cross generation, step {loaded.step}", vocabularies=vocabularies)
    report.save_heatmap(out_dir / report.HEATMAP_PNG, coherence["cross"]["matrix"], coherence["modalities"])
    if coherence["langevin_sweep"]:
        report.save_sweep_plot(out_dir / report.SWEEP_PNG, coherence["langevin_sweep"],
                               coherence.get("prior_ceiling", {}).get("coherence"))
        images["joint coherence vs Langevin steps"] = report.SWEEP_PNG

    from mmebm_dist.config import config_hash

    results = {
        "run": {"run_dir": str(loaded.run_dir), "checkpoint": str(loaded.checkpoint), "step": loaded.step,
                "prior": cfg.model.prior.kind, "config_hash": config_hash(cfg), "data_path": str(data_path),
                "manifest_hash": data_hash},
        "seed": args.seed,
        "world_size": world,
        "device": str(device),
        "classifiers": judge.describe(),
        "coherence": coherence,
        "elbo": elbo,
        "linear_probe": probe,
        "images": images,
        **beyond,
        **({"latent_samplers": samplers} if samplers else {}),
        "seconds": time.perf_counter() - start,
    }
    if vocabularies:
        results["captions"] = {
            "joint": report.decoded_texts(pictures, vocabularies, per_row),
            "cross": {"source": report.decoded_texts(sources, vocabularies, PICTURE_CROSS),
                      "generated": {src: report.decoded_texts(out, vocabularies, PICTURE_CROSS)
                                    for src, out in generated.items()}},
        }
    report.write_report(out_dir, results, images)
    _print_summary(results, out_dir)
    return 0
