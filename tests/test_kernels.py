"""oneDNN packed linears (``modeling.kernels``): the same products as ``F.linear`` up to summation order,
swapped in by the loader on CPU, and the same greedy output through the engine either way."""

import pytest
import torch
from torch import nn

from pearl_ray import PearlEngine, SamplingParams
from pearl_ray.errors import InvalidParameterError
from pearl_ray.modeling.hf import load_model
from pearl_ray.modeling import kernels
from pearl_ray.modeling.kernels import PackedLinear, bf16_packing_supported, pack_linears, packing_available

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN packed linears")


BF16_PACKING = pytest.mark.skipif(not bf16_packing_supported(),
                                  reason="oneDNN packs bf16 only with AVX-512 or AVX-NE-CONVERT")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), pytest.param(torch.bfloat16, 5e-2, marks=BF16_PACKING)])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_matches_f_linear(dtype, tol, bias):
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(96, 200, bias=bias).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(200, 96, generator=g).to(dtype) / 10)
    packed = PackedLinear(lin)
    for shape in [(1, 96), (8, 96), (37, 96), (2, 5, 96)]:  # rows other than the packing hint, and 3-d
        x = torch.randn(*shape, generator=g).to(dtype)
        with torch.inference_mode():
            want = nn.functional.linear(x.float(), lin.weight.float(), None if lin.bias is None else lin.bias.float())
            got = packed(x)
        assert got.shape == want.shape and got.dtype == dtype
        scale = want.abs().max().item()
        assert (got.float() - want).abs().max().item() <= tol * max(1.0, scale)


def test_pack_linears_swaps_plain_cpu_linears_only():
    class Custom(nn.Linear):  # a subclass (e.g. a tensor-parallel layer) keeps its own forward
        pass

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 4)), Custom(4, 4),
                          nn.Linear(4, 4).to(torch.float16))
    assert pack_linears(model) == 2
    assert isinstance(model[0], PackedLinear) and isinstance(model[2][0], PackedLinear)
    assert type(model[3]) is Custom and type(model[4]) is nn.Linear


def test_bf16_linears_stay_eager_where_onednn_cannot_pack_them(monkeypatch):
    """On a CPU without AVX-512 or AVX-NE-CONVERT oneDNN refuses to pack bf16 weights (a RuntimeError at load
    time, first seen on an AVX2-only AMD EPYC): there the bf16 linears keep torch's kernels and fp32 ones are
    still packed."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8).to(torch.bfloat16))
    monkeypatch.setattr(kernels, "bf16_packing_supported", lambda: False)
    assert pack_linears(model) == 1
    assert isinstance(model[0], PackedLinear) and type(model[1]) is nn.Linear
    x = torch.randn(3, 8).to(torch.bfloat16)
    with torch.inference_mode():
        assert model[1](x).dtype == torch.bfloat16


def test_bf16_model_decodes_with_the_default_kernels(tiny_pair):
    """A bf16 pair loads and decodes with ``cpu_kernels`` left at its default on any CPU (packed where oneDNN
    can, torch's kernels where it cannot), and PEARL's greedy tokens are target-only's."""
    prompts = [[1, 5, 9, 13], [1] + list(range(20, 50))]
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    outs = {}
    for method in ("ar", "pearl"):
        with PearlEngine(draft=tiny_pair["draft"], target=tiny_pair["target"], method=method, gamma=3,
                         dtype="bfloat16") as engine:
            outs[method] = [o.token_ids for o in engine.generate(prompts, params)]
    assert all(len(ids) == 16 for ids in outs["ar"]) and outs["pearl"] == outs["ar"]


def test_loader_packs_and_logits_agree(tiny_pair):
    eager = load_model(tiny_pair["target"], cpu_kernels="eager").runner
    packed = load_model(tiny_pair["target"]).runner  # the default
    assert not any(isinstance(m, PackedLinear) for m in eager.model.modules())
    n = sum(isinstance(m, PackedLinear) for m in packed.model.modules())
    assert n == 2 * 7 + 1  # per layer q, k, v, o, gate, up, down; and the LM head
    ids = [1, 5, 9, 13, 40, 41]
    a, b = eager.forward(ids, len(ids)), packed.forward(ids, len(ids))
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_greedy_output_is_the_same_with_either_kernel(tiny_pair):
    prompts = [[1, 5, 9, 13], [1, 40], [1] + list(range(20, 50))]
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    outs = {}
    for kernels in ("eager", "onednn"):
        for method in ("ar", "pearl"):
            with PearlEngine(draft=tiny_pair["draft"], target=tiny_pair["target"], method=method, gamma=3,
                             cpu_kernels=kernels) as engine:
                outs[kernels, method] = [o.token_ids for o in engine.generate(prompts, params)]
    assert outs["onednn", "pearl"] == outs["onednn", "ar"]  # lossless within one kernel choice
    assert outs["onednn", "ar"] == outs["eager", "ar"]  # and no near-tie flipped on these prompts


def test_unknown_kernel_choice_is_refused(tiny_pair):
    with pytest.raises(InvalidParameterError, match="cpu_kernels"):
        PearlEngine(target=tiny_pair["target"], cpu_kernels="fast")
    with pytest.raises(InvalidParameterError, match="cpu_kernels"):
        load_model(tiny_pair["target"], cpu_kernels="fast")
