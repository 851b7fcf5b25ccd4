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


@pytest.mark.parametrize("beta_on", ["commitment", "codebook"])
def test_vq_loss_order_by_its_gradients(beta_on):
    """Codes e0 = (0, 0), e1 = (1, 1); z = [(0.2, -0.1), (0.9, 1.3)] picks [0, 1]; n = 4 elements, z - q =
    [(0.2, -0.1), (-0.1, 0.3)]. A term weighted w gives grad_z = w * 2 (z - q) / n and grad_e = w * 2 (q - z) / n:
    beta_on "commitment" (VQ-VAE, LlamaGen): z 0.25, codebook 1; "codebook" (SEED's official legacy=True): z 1,
    codebook 0.25. The loss value is the same: 1.25 * MSE = 1.25 * 0.15 / 4."""
    q = VectorQuantizer(2, 2, beta=0.25, beta_on=beta_on)
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    z = torch.tensor([[[0.2, -0.1], [0.9, 1.3]]], requires_grad=True)  # [B=1, N=2, C=2]
    out = q(z)
    assert out.codes.tolist() == [[0, 1]]
    assert out.loss.item() == pytest.approx(0.046875)
    out.loss.backward()
    full_z = [[0.1, -0.05], [-0.05, 0.15]]  # 2 (z - q) / 4
    full_e = [[-0.1, 0.05], [0.05, -0.15]]  # 2 (q - z) / 4
    w_z, w_e = (0.25, 1.0) if beta_on == "commitment" else (1.0, 0.25)
    torch.testing.assert_close(z.grad[0], w_z * torch.tensor(full_z))
    torch.testing.assert_close(q.embedding.weight.grad, w_e * torch.tensor(full_e))


def test_vq_loss_order_is_checked_and_defaults_to_llamagen_s():
    assert VectorQuantizer(4, 2).beta_on == "commitment"
    assert build_quantizer("vq", 4, 2).beta_on == "commitment"  # the VQ tokenizers: unchanged
    with pytest.raises(ValueError, match="beta_on"):
        VectorQuantizer(4, 2, beta_on="encoder")


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


def test_ibq_loss_hand_computed():
    """K = 2 codes e0 = (1, 0), e1 = (0, 1); z1 = (2, 1) -> logits (2, 1) -> code 0; z2 = (1, 3) -> logits (1, 3)
    -> code 1. Errors: z1 - e0 = (1, 1), z2 - e1 = (1, 2): MSE = (1 + 1 + 1 + 4) / 4 = 1.75, so the
    codebook + beta * commitment loss is (1 + 0.25) * 1.75 = 2.1875. Entropy penalty at temperature 1:
    p1 = softmax(2, 1), p2 = softmax(1, 3); mean(H(p1), H(p2)) - H((p1 + p2) / 2)."""
    import math

    q = IndexPropagationQuantizer(2, 2, beta=0.25, entropy_weight=0.5, entropy_temperature=1.0)
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    out = q(torch.tensor([[[2.0, 1.0], [1.0, 3.0]]]))  # [B=1, N=2, C=2]
    assert out.codes.tolist() == [[0, 1]]

    def softmax(a, b):
        return [math.exp(a) / (math.exp(a) + math.exp(b)), math.exp(b) / (math.exp(a) + math.exp(b))]

    def entropy(p):
        return -sum(x * math.log(x) for x in p)

    p1, p2 = softmax(2, 1), softmax(1, 3)
    penalty = (entropy(p1) + entropy(p2)) / 2 - entropy([(a + b) / 2 for a, b in zip(p1, p2)])
    # by hand: H(p1) = 0.58220, H(p2) = 0.36533, mean 0.47377; H((0.42513, 0.57487)) = 0.68189
    assert penalty == pytest.approx(0.47377 - 0.68189, abs=2e-5)
    assert out.loss.item() == pytest.approx(1.25 * 1.75 + 0.5 * penalty, rel=1e-6)


def test_codebook_initialised_from_data_uses_most_codes():
    torch.manual_seed(0)
    z = torch.randn(4, 128, C) * 3 + 5  # 512 encoder outputs far from the origin, where +-1/K codes sit
    plain = VectorQuantizer(64, C).train()
    out = plain(z)  # uniform +-1/K init: the code with the largest projection on the data's mean wins nearly all
    assert out.usage.item() <= 0.2 and out.perplexity.item() < 2
    q = VectorQuantizer(64, C, data_init=True).train()
    assert not q.initialized
    q.eval()(z)
    assert not q.initialized, "eval never initialises"
    out = q.train()(z)  # the first training batch runs k-means on itself, then looks up
    assert q.initialized and out.usage.item() >= 0.9
    init = q.embedding.weight.detach().clone()
    q(torch.randn(4, 128, C))
    assert torch.equal(q.embedding.weight, init), "initialised once"
    assert "initialized" in q.state_dict()  # saved, so a loaded tokenizer is not re-initialised
    few = VectorQuantizer(64, C, data_init=True).train()  # fewer inputs (20) than codes (64)
    few(z[:1, :20])
    w = few.embedding.weight.detach()
    assert len(torch.unique(w, dim=0)) == 64  # distinct codes
    assert all((z[0, :20] == row).all(1).any() for row in w[:20])  # every input is a code


def test_dead_code_restart_draws_distinct_vectors():
    torch.manual_seed(0)
    q = VectorQuantizer(K, C, restart_dead_codes=True, dead_code_patience=1).train()
    with torch.no_grad():
        q.embedding.weight.copy_(torch.randn(K, C))
        q.embedding.weight[:12] = 100.0 + torch.arange(12.0)[:, None]  # far from the inputs: 12 dead codes
    z = torch.randn(1, 12, C)  # 12 inputs for 12 dead codes: every input used exactly once
    q(z)
    rows = q.pop_restarted()
    assert rows.tolist() == list(range(12))
    new = q.embedding.weight.detach()[rows]
    assert len(torch.unique(new, dim=0)) == 12  # drawn without replacement
    assert torch.equal(torch.sort(new, dim=0).values, torch.sort(z[0], dim=0).values)  # a permutation of the batch
    assert len(q.pop_restarted()) == 0  # popping clears the record
    # more dead codes than inputs: only as many as there are inputs restart now, the rest on later steps
    with torch.no_grad():
        q.embedding.weight[:12] = 100.0
    q.steps_unused.zero_()
    q(z[:, :5])
    rows = q.pop_restarted()
    assert len(rows) == 5 and len(torch.unique(q.embedding.weight.detach()[rows], dim=0)) == 5


def _adam_with_state(q, z, steps=3):
    """Adam over q's codebook after a few steps whose loss touches every row (so every row has state)."""
    opt = torch.optim.Adam(q.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        (q(z).loss + 1e-3 * q.embedding.weight.pow(2).sum()).backward()
        opt.step()
    return opt


def test_restarted_rows_get_fresh_optimizer_state():
    from train.tokenizer_module import reset_restarted_codes

    torch.manual_seed(0)
    q = VectorQuantizer(K, C, restart_dead_codes=True, dead_code_patience=1000).train()
    z = torch.randn(2, 10, C)
    opt = _adam_with_state(q, z)
    assert len(q.pop_restarted()) == 0
    state = opt.state[q.embedding.weight]
    assert (state["exp_avg"].abs().sum(1) > 0).all() and (state["exp_avg_sq"].abs().sum(1) > 0).all()
    q.dead_code_patience = 1
    with torch.no_grad():
        q.embedding.weight[:3] = 100.0  # three codes no input picks
    opt.zero_grad()
    q(z).loss.backward()  # the forward restarts the unused codes
    restarted = q.restarted.clone()  # the record reset_restarted_codes consumes
    assert restarted[:3].all() and not restarted.all()
    assert reset_restarted_codes(q, opt) == int(restarted.sum())
    assert (state["exp_avg"][restarted] == 0).all() and (state["exp_avg_sq"][restarted] == 0).all()
    assert (state["exp_avg_sq"][~restarted].abs().sum(1) > 0).all()  # the other rows keep their state
    assert reset_restarted_codes(q, opt) == 0  # consumed
    opt.step()
    assert torch.isfinite(q.embedding.weight).all()


def test_lightning_module_resets_optimizer_state_of_restarted_codes(tmp_path):
    """The base tokenizer module zeroes those rows between backward and the optimiser step."""
    import lightning as L

    from train.tokenizer_module import TokenizerTrainingModule

    seen = []

    class Tiny(TokenizerTrainingModule):
        def __init__(self):
            super().__init__(lr=1e-2, weight_decay=0.0, warmup_steps=1, export_path=None)
            self.tokenizer = VectorQuantizer(K, C, restart_dead_codes=True, dead_code_patience=2)

        def training_step(self, batch, batch_idx):
            return self.tokenizer(batch).loss + 1e-3 * self.tokenizer.embedding.weight.pow(2).sum()

        def on_before_optimizer_step(self, optimizer):
            rows = self.tokenizer.restarted.nonzero().flatten()
            super().on_before_optimizer_step(optimizer)
            state = optimizer.state.get(self.tokenizer.embedding.weight, {})
            if len(rows) and state:
                seen.append(float(state["exp_avg"][rows].abs().sum() + state["exp_avg_sq"][rows].abs().sum()))

        def train_dataloader(self):
            torch.manual_seed(0)
            return torch.utils.data.DataLoader(torch.randn(8, 3, C), batch_size=2)  # 6 inputs for 16 codes

    L.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=tmp_path).fit(Tiny())
    assert seen and all(v == 0 for v in seen)
