"""``train.compile``: the mode names, the CPU refusal of CUDA graphs, and a compiled training step (forward,
backward, optimizer update) that gives the eager step's losses and parameters."""

from __future__ import annotations

import pytest
import torch
from test_models import batch_for, tiny

from mmebm_dist.config import Config, OptimConfig, TrainConfig
from mmebm_dist.models import build_model
from mmebm_dist.train.capture import capture_step, compile_mode, mode_name
from mmebm_dist.train.loop import build_optimizer

CPU = torch.device("cpu")


def test_compile_mode_names():
    assert mode_name(False) == "off" and mode_name("reduce-overhead") == "reduce-overhead"
    assert [compile_mode(v, CPU) for v in ("off", "false", "true", "default", "DEFAULT")] == [
        "off", "off", "default", "default", "default"]
    assert compile_mode("reduce-overhead", torch.device("cuda")) == "reduce-overhead"
    with pytest.raises(ValueError, match="reduce-overhead captures CUDA graphs.*on cpu"):
        compile_mode("reduce-overhead", CPU)
    with pytest.raises(ValueError, match="train.compile must be one of .*got 'max-autotune'"):
        compile_mode("max-autotune", CPU)


def _three_steps(mode: str, device: torch.device = CPU) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Three steps of the tiny EBM model (Langevin chain inside) with Adam, from the same initialisation.

    The chain runs the torch backend: eagerly the fused loop, compiled the traced chain in the step's one
    graph; both draw the step's noise as torch.randn would, which inductor's fallback_random reproduces."""
    import torch._inductor.config as inductor_config

    torch.manual_seed(0)
    model_cfg = tiny(aggregation="moe", prior="ebm")
    model_cfg.prior.langevin.backend = "torch"
    cfg = Config(model=model_cfg, optim=OptimConfig(lr=1e-2), train=TrainConfig(compile=mode))
    model = build_model(cfg.model).to(device)
    optimizer = build_optimizer(model, cfg)
    assert capture_step(model, optimizer, cfg, device) == compile_mode(mode, device)
    losses = []
    torch.manual_seed(1)
    for step in range(3):
        with inductor_config.patch(fallback_random=True):  # inductor draws eager's random numbers
            batch = {k: v.to(device) for k, v in batch_for(cfg.model, seed=step).items()}
            out = model(batch)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out["loss"].item())
    return losses, {n: p.detach().cpu().clone() for n, p in model.named_parameters()}


@pytest.mark.slow  # inductor compiles forward, backward and Adam: minutes on a loaded 2-core machine
def test_captured_step_gives_the_eager_losses_and_parameters():
    """Same draws, same updates: the losses of steps 2-3 depend on the compiled optimizer's updates too.

    Tolerance 1e-4 relative: inductor fuses and reorders float32 sums (~1e-6 per op), and three Adam steps
    at lr 1e-2 move parameters by ~3e-2, so a wrong or skipped update is off by far more.
    """
    eager_losses, eager_params = _three_steps("off")
    compiled_losses, compiled_params = _three_steps("default")
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-4, atol=1e-5)
    for name, value in eager_params.items():
        torch.testing.assert_close(compiled_params[name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert eager_losses[0] != eager_losses[2]  # the steps did update the model


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_step_gives_the_eager_losses_and_parameters():
    """train.compile=reduce-overhead on a GPU: the CUDA-graph step replays to the eager step's numbers (same
    tolerance and reason as the CPU test above)."""
    cuda = torch.device("cuda")
    eager_losses, eager_params = _three_steps("off", cuda)
    graph_losses, graph_params = _three_steps("reduce-overhead", cuda)
    torch.testing.assert_close(graph_losses, eager_losses, rtol=1e-4, atol=1e-5)
    for name, value in eager_params.items():
        torch.testing.assert_close(graph_params[name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("prior,aggregation,stages", [
    ("ebm", "moe", ("reference", "energy", "joint")),  # stratified objective, every stage of a schedule
    ("ebm", "poe", ("joint",)),
    ("laplace", "moe", ("joint",)),
])
def test_the_forward_traces_without_a_graph_break(prior, aggregation, stages):
    """The forward of every stage (encoders, Langevin chain, decoders, objective, energy loss and its
    diagnostics) is one dynamo graph with backend ``auto``: what train.compile compiles whole."""
    import torch._dynamo

    torch.manual_seed(0)
    cfg = tiny(aggregation=aggregation, posterior="gaussian", prior=prior)
    cfg.prior.langevin.backend = "auto"
    model, batch = build_model(cfg), batch_for(cfg)
    for stage in stages:
        model.set_stage(stage)
        explained = torch._dynamo.explain(model.forward)(batch)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), (
            stage, [str(r.reason) for r in explained.break_reasons])


def test_lr_decay_and_a_stage_boundary_do_not_recompile_the_step(tmp_path, in_process, monkeypatch):
    """Six loop steps (train_step: stage switch, Adam reset of the starting group, scheduler) with the lr
    halved at every step and a reference -> joint boundary after step 2: the forward compiles once per stage
    (it guards on the stage), the optimizer step once plus once more when the boundary resets the energy's
    Adam state. A float lr would add a graph per lr value (torch's recompile limit is 8)."""
    from torch._dynamo.testing import CompileCounter
    from train_helpers import tiny_config

    import mmebm_dist.train.capture as capture
    from mmebm_dist.config import load_config
    from mmebm_dist.train.loop import setup, train_step

    counters, real_compile = [], torch.compile

    def counting_compile(fn, *, mode, dynamic):  # dynamo's graphs counted, run eagerly (no inductor)
        counters.append(CompileCounter())
        return real_compile(fn, backend=counters[-1], dynamic=dynamic)

    monkeypatch.setattr(capture.torch, "compile", counting_compile)
    torch._dynamo.reset()
    path = tiny_config(tmp_path / "c.yaml", tmp_path / "unused",
                       model={"prior": {"langevin": {"backend": "auto"}}},
                       optim={"lr_decay": 0.5, "lr_decay_every": 1},
                       train={"steps": 6, "compile": "default", "out_dir": str(tmp_path / "run"),
                              "schedule": [{"stage": "reference", "steps": 2},
                                           {"stage": "joint", "steps": 4}]})
    cfg = load_config(path)
    batch = {m.name: torch.rand(8, *m.shape) for m in cfg.model.modalities}
    session = setup(cfg, record=False, batches=iter([(0, 0, batch)] * 6))
    lrs = []
    for step in range(1, 7):
        train_step(session, step)
        lrs.append(session.scheduler.get_last_lr()[0])
    forward, optimizer_step = counters
    assert len(set(lrs)) == 6 and all(isinstance(lr, float) for lr in lrs)  # the floats stay the record
    assert forward.frame_count == 2
    assert optimizer_step.frame_count == 2
