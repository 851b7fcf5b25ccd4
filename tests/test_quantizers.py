import pytest
import torch
import torch.nn.functional as F

from vision_tokenizers.quantizers import IndexPropagationQuantizer, QuantizerOutput, VectorQuantizer, build_quantizer

K, C = 16, 8


def make(kind, **kw):
    torch.manual_seed(0)
    q = VectorQuantizer(K, C, **kw) if kind == "vq" else IndexPropagationQuantizer(K, C, **kw)
    with torch.no_grad():  # distinct unit-norm codes: argmax(e_i . e_j) == i, so IBQ lookups are exact too
        q.embedding.weight.copy_(F.normalize(torch.randn(K, C), dim=-1))
    return q


@pytest.mark.parametrize("kind", ["vq", "ibq"])
@pytest.mark.parametrize("shape", [(2, C, 3, 5), (2, 7, C)])
def test_shapes(kind, shape):
    q = make(kind)
    z = torch.randn(*shape)
    out = q(z)
    assert isinstance(out, QuantizerOutput)
    assert out.z_q.shape == z.shape
    grid = (2, 3, 5) if len(shape) == 4 else (2, 7)
    assert out.codes.shape == grid and out.codes.dtype == torch.long
    assert out.codes.min() >= 0 and out.codes.max() < K
    assert out.loss.dim() == 0 and out.perplexity.dim() == 0 and out.usage.dim() == 0
    assert torch.equal(q.encode(z), out.codes)
    assert q.embed(out.codes).shape == z.shape
    # the forward value is exactly the looked-up code
    torch.testing.assert_close(out.z_q, q.embed(out.codes))


@pytest.mark.parametrize("kind", ["vq", "ibq"])
def test_gradients_reach_encoder_side(kind):
    q = make(kind)
    z = torch.randn(4, C, 3, 3, requires_grad=True)
    out = q(z)
    (out.z_q.pow(2).sum() + out.loss).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_vq_straight_through_gradient_is_identity():
    q = make("vq")
    z = torch.randn(3, 5, C, requires_grad=True)
    w = torch.randn(3, 5, C)
    (q(z).z_q * w).sum().backward()
    torch.testing.assert_close(z.grad, w)


def test_ibq_gradient_reaches_every_code():
    q = make("ibq")
    z = torch.randn(4, C, 3, 3, requires_grad=True)
    out = q(z)
    (out.z_q * torch.randn_like(out.z_q)).sum().backward()
    g = q.embedding.weight.grad
    assert g is not None
    assert (g.abs().sum(dim=1) > 0).all(), "every codebook row must receive gradient"
    # plain VQ, by contrast, only updates the rows it picked
    v = make("vq")
    out = v(z.detach())
    ((out.z_q * torch.randn_like(out.z_q)).sum() + out.loss).backward()
    used = torch.zeros(K, dtype=torch.bool)
    used[out.codes.unique()] = True
    assert (v.embedding.weight.grad[~used] == 0).all()


@pytest.mark.parametrize("kind", ["vq", "ibq"])
@pytest.mark.parametrize("l2_norm", [False, True])
def test_codebook_vectors_round_trip_exactly(kind, l2_norm):
    q = make(kind, l2_norm=l2_norm).eval()
    codes = torch.arange(K).reshape(1, 4, 4)
    vecs = q.embed(codes)  # [1, C, 4, 4]
    assert vecs.shape == (1, C, 4, 4)
    assert torch.equal(q.encode(vecs), codes)
    assert torch.equal(q.decode(q.encode(vecs)), vecs)
    seq = torch.arange(K).flip(0)[None]  # [1, K] token layout
    assert q.embed(seq).shape == (1, K, C)
    assert torch.equal(q.decode(q.encode(q.embed(seq))), q.embed(seq))


@pytest.mark.parametrize("kind", ["vq", "ibq"])
def test_usage_and_perplexity(kind):
    q = make(kind).eval()
    every = q(q.embed(torch.arange(K)[None]))  # each code exactly once
    assert every.usage.item() == pytest.approx(1.0)
    assert every.perplexity.item() == pytest.approx(K, rel=1e-4)
    one = q(q.embed(torch.full((1, 10), 3)))  # a single code
    assert one.usage.item() == pytest.approx(1.0 / K)
    assert one.perplexity.item() == pytest.approx(1.0, rel=1e-4)
    assert one.loss.item() == pytest.approx(0.0, abs=1e-10)


def test_vq_loss_value():
    q = make("vq", beta=0.5)
    z = torch.randn(2, 6, C)
    out = q(z)
    mse = F.mse_loss(q.embed(out.codes), z)
    assert out.loss.item() == pytest.approx(1.5 * mse.item(), rel=1e-5)


def test_vq_nearest_neighbour_matches_cdist():
    q = make("vq")
    z = torch.randn(50, C)
    ref = torch.cdist(z, q.embedding.weight).argmin(1)
    assert torch.equal(q.encode(z[None])[0], ref)


def test_dead_code_restart_replaces_unused_codes():
    torch.manual_seed(0)
    q = VectorQuantizer(K, C, restart_dead_codes=True, dead_code_patience=3).train()
    with torch.no_grad():
        q.embedding.weight.copy_(torch.randn(K, C))
        q.embedding.weight[0] = 100.0  # far from every input: never picked
    before = q.embedding.weight.detach().clone()
    z = torch.randn(2, 10, C)  # 20 vectors for 16 codes: some codes necessarily unused
    used = torch.zeros(K, dtype=torch.bool)
    for _ in range(2):
        used[q(z).codes.unique()] = True
    assert torch.equal(q.embedding.weight, before), "nothing is reset before the patience runs out"
    q(z)
    after = q.embedding.weight.detach()
    dead = ~used
    assert dead[0] and dead.sum() >= 4
    changed = (after != before).any(dim=1)
    assert torch.equal(changed, dead), "exactly the unused codes are reset"
    # reset rows are copies of this batch's encoder outputs
    flat = z.reshape(-1, C)
    for k in dead.nonzero().flatten():
        assert (flat == after[k]).all(dim=1).any()
    assert (q.steps_unused[dead] == 0).all()
    # eval mode never touches the codebook
    q.eval()
    snap = q.embedding.weight.detach().clone()
    for _ in range(5):
        q(z)
    assert torch.equal(q.embedding.weight, snap)


def test_restart_off_by_default():
    q = make("vq").train()
    before = q.embedding.weight.detach().clone()
    z = torch.randn(1, 3, C)
    for _ in range(40):
        q(z)
    assert torch.equal(q.embedding.weight, before)


def test_ibq_entropy_penalty():
    torch.manual_seed(0)
    q = make("ibq", entropy_weight=0.1)
    base = make("ibq")
    z = torch.randn(2, 9, C, requires_grad=True)
    out, ref = q(z), base(z)
    pen = q._entropy_penalty(z.reshape(-1, C) @ q.codebook().t())
    assert out.loss.item() == pytest.approx(ref.loss.item() + 0.1 * pen.item(), rel=1e-5)
    # one-hot confident and perfectly spread predictions -> penalty is -log(K)
    logits = torch.eye(K) * 100.0
    assert q._entropy_penalty(logits).item() == pytest.approx(-torch.log(torch.tensor(float(K))).item(), rel=1e-4)
    out.loss.backward()
    assert z.grad is not None


def test_build_quantizer():
    assert isinstance(build_quantizer("vq", K, C), VectorQuantizer)
    assert isinstance(build_quantizer("ibq", K, C), IndexPropagationQuantizer)
    with pytest.raises(ValueError):
        build_quantizer("fsq", K, C)
    with pytest.raises(ValueError):
        VectorQuantizer(K, C)(torch.randn(C))
