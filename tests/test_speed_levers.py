"""The training-step speed levers keep the math: sub-pixel upsampling, channels_last and batched decoding give
the plain path's loss and gradients (float32 round-off only), and bf16 autocast stays near float32.

The plain ("levers off") path is the authors' structure: NCHW activations, nn.Upsample before each decoder
block, and one decoder call per (stratum, target) pair instead of one call per target.
"""

import pytest
import torch
from torch.nn import functional as F

from mmebm_dist.config import ModalityConfig, ModelConfig, PriorConfig
from mmebm_dist.models import build_model
from mmebm_dist.models.blocks import ResidualBlock, upsample2x, upsampled_conv3x3

B = 3
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny, overhead-bound models (see conftest.py)


def _relative_close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    """max |got - want| <= tol * max |want|: float32 sums of many products differ in their last bits, so
    errors are judged against the tensor's scale, not element by element (near-zero elements)."""
    scale = want.abs().max().clamp_min(1e-12)
    err = (got - want).abs().max() / scale
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_upsampled_conv3x3_is_conv_of_the_upsampled_map(channels_last, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 4, generator=g)  # H != W: catches swapped row/column taps
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(6, 5, 3, 3, generator=g)
    b = torch.randn(6, generator=g) if bias else None
    x.requires_grad_(True)
    w.requires_grad_(True)
    got = upsampled_conv3x3(x, w, b)
    want = F.conv2d(upsample2x(x), w, b, padding=1)
    assert got.shape == (2, 6, 6, 8)
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last
    # float32: each output sums 45 products, grouped differently (taps summed first): ~1e-7 relative.
    _relative_close(got, want, 1e-5, "output")
    grad_out = torch.randn(got.shape, generator=g)
    got_grads = torch.autograd.grad(got, (x, w), grad_out)
    want_grads = torch.autograd.grad(want, (x, w), grad_out)
    for name, a, c in zip(("x", "weight"), got_grads, want_grads, strict=True):
        _relative_close(a, c, 1e-5, f"grad {name}")


@pytest.mark.parametrize("fin,fout", [(4, 4), (6, 3)])
def test_residual_block_on_an_upsampled_input_matches_upsampling_first(fin, fout):
    torch.manual_seed(1)
    block = ResidualBlock(fin, fout)
    x = torch.randn(2, fin, 5, 5, requires_grad=True)
    got = block(x, upsample=True)
    want = block(upsample2x(x))
    _relative_close(got, want, 1e-5, "output")
    grad_out = torch.randn_like(want)
    params = [x, *block.parameters()]
    for a, c in zip(torch.autograd.grad(got, params, grad_out), torch.autograd.grad(want, params, grad_out),
                    strict=True):
        _relative_close(a, c, 1e-5, "gradient")


# ------------------------------------------------------------------------------------------- whole model
def reference_net(*, width=4, private=3, levers=True, m=3) -> ModelConfig:
    """A small MMVAE+ network (3x12x12 images), DReG with K = 1 and beta 2.5 as the reference config."""
    mods = [ModalityConfig(name=f"m{i}", shape=(3, 12, 12), family="mmvaeplus") for i in range(m)]
    return ModelConfig(modalities=mods, latent_dim=4, private_dim=private, width=width, objective="dreg",
                       particles=1, beta=2.5, prior=PriorConfig(kind="laplace"),
                       channels_last=levers, subpixel_upsample=levers, batched_decode=levers)


def _loss_and_grads(model, batch, seed):
    model.zero_grad()
    torch.manual_seed(seed)
    out = model(batch)
    out["loss"].backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


def _paired(**kw):
    torch.manual_seed(2)
    fast = build_model(reference_net(levers=True, **kw))
    plain = build_model(reference_net(levers=False, **kw))
    plain.load_state_dict(fast.state_dict())  # the levers change no parameter: the same state dict loads
    g = torch.Generator().manual_seed(3)
    batch = {n: torch.rand(B, 3, 12, 12, generator=g) for n in plain.modalities}
    return fast, plain, batch


def test_levers_on_give_the_plain_paths_loss_and_gradients():
    fast, plain, batch = _paired()
    assert fast.encoders["m0"].channels_last and fast.decoders["m0"].subpixel_upsample
    assert not plain.decoders["m0"].subpixel_upsample and not plain.cfg.batched_decode
    out_fast, grads_fast = _loss_and_grads(fast, batch, seed=4)
    out_plain, grads_plain = _loss_and_grads(plain, batch, seed=4)
    for key in out_plain:  # loss, elbo, rec/*, kl_z, kl_w, posterior stats: same draws, same values
        torch.testing.assert_close(out_fast[key], out_plain[key], rtol=1e-5, atol=1e-5, msg=key)
    assert set(grads_fast) == set(grads_plain)
    for name, grad in grads_plain.items():
        # float32 round-off of conv sums regrouped (sub-pixel taps, NHWC kernels): ~1e-6 relative measured.
        _relative_close(grads_fast[name], grad, 1e-5, name)


def test_levers_keep_the_state_dict_and_the_comparison_sees_a_small_weight_change():
    fast, plain, batch = _paired()
    assert [(k, v.shape) for k, v in fast.state_dict().items()] == \
        [(k, v.shape) for k, v in plain.state_dict().items()]
    # The comparison above is not vacuous: scaling one decoder conv by 1.01 moves the gradients far past 1e-5.
    with torch.no_grad():
        fast.decoders["m1"].blocks[4].conv_0.weight.mul_(1.01)
    _, grads_fast = _loss_and_grads(fast, batch, seed=4)
    _, grads_plain = _loss_and_grads(plain, batch, seed=4)
    errors = [((grads_fast[n] - g).abs().max() / g.abs().max()).item()
              for n, g in grads_plain.items()]
    assert max(errors) > 1e-3, max(errors)


def test_bf16_autocast_loss_stays_near_float32():
    """bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 0.2%) in the conv/linear outputs; every density
    is computed in float32 from them, and the per-pixel rounding errors of the ~400-term sums largely cancel.
    Tolerance 1e-3 relative on the loss and each reconstruction term (measured: 4e-5 and 2e-4)."""
    torch.manual_seed(5)
    model = build_model(reference_net(width=4))
    g = torch.Generator().manual_seed(6)
    batch = {n: torch.rand(B, 3, 12, 12, generator=g) for n in model.modalities}
    torch.manual_seed(7)
    fp32 = model(batch)
    torch.manual_seed(7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model(batch)
    assert all(v.dtype == torch.float32 for v in bf16.values())  # densities and terms stay float32
    bf16["loss"].backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in model.parameters())
    for key in ("loss", "rec/m0", "rec/m1", "rec/m2"):
        rel = ((bf16[key] - fp32[key]).abs() / fp32[key].abs()).item()
        assert rel < 1e-3, (key, rel)
    torch.testing.assert_close(bf16["kl_z"], fp32["kl_z"], rtol=0, atol=1e-2)  # measured 2e-4; values ~0.05


def test_bench_counts_the_steps_flops_and_sees_the_sub_pixel_saving():
    """`mmebm bench train`'s FLOP count of a step: a linear layer's forward and backward is 3 x 2 N i o, and
    the sub-pixel form of the reference network saves exactly 5/9 of the two upsampled blocks' first convs
    and 3/4 of block 1's 1x1 shortcut (run before the upsampling), forward and backward, in every decoded
    row."""
    from mmebm_dist.bench.train_step import _FlopCount, step_flops
    from mmebm_dist.config import Config, DataConfig

    x = torch.randn(5, 7, requires_grad=True)
    layer = torch.nn.Linear(7, 11)
    with _FlopCount() as counter:
        layer(x).sum().backward()
    assert counter.total == 3 * 2 * 5 * 7 * 11

    def flops(subpixel: bool, batch: int) -> float:
        model = reference_net(width=4, levers=False)
        model.subpixel_upsample = subpixel
        return step_flops(Config(data=DataConfig(batch_size=batch), model=model))

    # Per row; the sub-pixel kernels' einsum costs per decoder call, so compare the saving at two batch sizes.
    nf, m, side = 4, 3, 12  # decoder maps 3x3 -> 6x6 -> 12x12; block 1 conv_0: 2nf -> nf, block 2: nf -> nf
    conv_0 = 2 * 9 * ((side // 2) ** 2 * 2 * nf * nf + side**2 * nf * nf)  # forward FLOPs per decoded row
    shortcut = 2 * (side // 2) ** 2 * 2 * nf * nf
    saving = {b: flops(False, b) - flops(True, b) for b in (B, 2 * B)}
    assert saving[B] > 0
    per_row = 3 * (conv_0 * 5 / 9 + shortcut * 3 / 4)  # forward, input gradient, weight gradient
    assert saving[2 * B] - saving[B] == (m * m * B) * per_row  # M x M decoded rows per sample
