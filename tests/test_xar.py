"""xAR: flow pairs at the t edges, per-entity times and the masks, the sampler on known velocity fields,
cached vs uncached sampling, a short real fit, presets, and the text-to-image path from a checkpoint."""
from __future__ import annotations

import math

import pytest
import torch

from models.config import LMConfig
from models.objectives import XARFlowMatching, build, describe
from models.objectives.xar import entity_order, flow_pair, flow_sample
from models.transformer import Transformer


def _lm(dim=64, seed=0):
    torch.manual_seed(seed)
    lm = Transformer(LMConfig.from_preset("tiny", adaln=True, max_len=256))
    for blk in lm.blocks:  # adaLN starts at zero: give it weights so time conditioning matters in the tests
        torch.nn.init.normal_(blk.ada.weight, std=0.05)
    return lm


def _obj(**kw):
    kw = {"dim": 64, "latent_channels": 4, "grid": 4, "entity": "cell", "entity_size": 2, "steps": 3, **kw}
    obj = XARFlowMatching(**kw)
    if obj.config.predictor == "mlp":  # zero-initialised output layers: perturb them
        for p in obj.head.parameters():
            torch.nn.init.normal_(p, std=0.05)
    return obj


def _batch(b=3, p=6, padded=True):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 60, (b, p), generator=g)
    valid = torch.ones(b, p, dtype=torch.bool)
    if padded:
        valid[0, :2] = False
    return {"ids": ids, "valid": valid, "latents": torch.randn(b, 4, 4, 4, generator=g)}


def test_flow_pair_edges():
    x, eps = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    xt0, v0 = flow_pair(x, eps, torch.zeros(2, 5))
    xt1, v1 = flow_pair(x, eps, torch.ones(2, 5))
    assert torch.equal(xt0, x) and torch.equal(xt1, eps)
    assert torch.equal(v0, eps - x) and torch.equal(v1, eps - x)
    xth, _ = flow_pair(x, eps, torch.full((2, 5), 0.5))
    assert torch.allclose(xth, (x + eps) / 2)


@pytest.mark.parametrize("t_value", [0.0, 1.0])
def test_loss_at_the_t_edges_sees_clean_or_pure_noise(monkeypatch, t_value):
    lm, obj, batch = _lm(), _obj(), _batch()
    seen = {}
    monkeypatch.setattr(obj, "sample_t", lambda shape, device, generator=None: torch.full(shape, t_value))
    real_velocity = obj.velocity

    def spy(h, x_t, t):
        seen["x_t"], seen["t"] = x_t, t
        return real_velocity(h, x_t, t)

    monkeypatch.setattr(obj, "velocity", spy)
    torch.manual_seed(0)
    out = obj.loss(lm, batch)
    torch.manual_seed(0)
    eps = torch.randn(3, 16, 4)
    x = obj.tokens(batch["latents"])
    assert torch.allclose(seen["x_t"], x if t_value == 0 else eps)
    assert torch.isfinite(out["loss"]) and out["nll"] == out["loss"].detach()


def test_entity_orders():
    order, k = entity_order("cell", 4, 2)
    assert k == 4 and order[:4].tolist() == [0, 1, 4, 5] and order[4:8].tolist() == [2, 3, 6, 7]
    order, k = entity_order("subsample", 4, 2)
    assert k == 4 and order[:4].tolist() == [0, 2, 8, 10]
    assert entity_order("token", 4, 1)[1] == 16 and entity_order("image", 4, 1)[1] == 1
    for kind in ("cell", "subsample", "token", "image"):
        assert sorted(entity_order(kind, 4, 2)[0].tolist()) == list(range(16))
    with pytest.raises(ValueError, match="divide"):
        entity_order("cell", 4, 3)


def test_each_entity_draws_its_own_time(monkeypatch):
    lm, obj = _lm(), _obj()
    seen = {}
    real = obj.velocity
    monkeypatch.setattr(obj, "velocity", lambda h, x_t, t: seen.setdefault("t", t) is None or real(h, x_t, t))
    obj.loss(lm, _batch())
    t = seen["t"].view(3, 4, 4)  # [B, entities, tokens per entity]
    assert torch.equal(t, t[..., :1].expand_as(t))  # one t per entity
    assert len(torch.unique(t[..., 0])) == 12  # independent across entities and images
    assert ((t > 0) & (t < 1)).all()


def test_noisy_context_is_block_causal_over_entities():
    lm, obj = _lm(), _obj()
    b = _batch(padded=False)
    x = obj.tokens(b["latents"])
    t = torch.rand(3, 4)  # one time per entity
    ent = torch.arange(4).repeat_interleave(4)
    h1 = obj._forward(lm, b["ids"], b["valid"], x, t, obj.order, ent)
    x2 = x.clone()
    x2[:, 8:] += 1.0  # change entities 2 and 3
    h2 = obj._forward(lm, b["ids"], b["valid"], x2, t, obj.order, ent)
    assert torch.allclose(h1[:, :8], h2[:, :8], atol=1e-6)  # earlier entities do not see later ones
    assert not torch.allclose(h1[:, 8:12], h2[:, 8:12])  # inside an entity attention is bidirectional
    x3 = x.clone()
    x3[:, 12:] += 1.0  # only the last entity changes: entity 2 is unaffected, entity 3 is
    h3 = obj._forward(lm, b["ids"], b["valid"], x3, t, obj.order, ent)
    assert torch.allclose(h1[:, :12], h3[:, :12], atol=1e-6)


def test_teacher_forcing_mask_and_equivalence():
    obj = _obj()
    m = obj.teacher_forcing_mask(2, "cpu")  # prompt 2, clean 16, noisy 16
    p, n = 2, 16
    noisy1 = p + n + 4  # first token of noisy entity 1
    assert m[noisy1, :p].all() and m[noisy1, p:p + 4].all() and not m[noisy1, p + 4:p + n].any()
    assert m[noisy1, p + n + 4:p + n + 8].all() and not m[noisy1, p + n:p + n + 4].any()
    assert not m[noisy1, p + n + 8:].any()
    assert not m[p:p + n, p + n:].any()  # clean tokens never see noisy ones
    # the noisy entity k's hidden state equals a plain forward of prompt, clean entities < k, noisy entity k
    lm, b = _lm(), _batch()
    x = obj.tokens(b["latents"])
    t_ent = torch.rand(3, 4)  # [B, entities]
    x_t, _ = flow_pair(x, torch.randn_like(x), t_ent.repeat_interleave(4, 1))
    ent = torch.arange(4).repeat_interleave(4)
    mask = obj.teacher_forcing_mask(6, "cpu").expand(3, -1, -1)
    tt = torch.cat([torch.zeros_like(t_ent), t_ent], 1)  # rows: clean entities (t = 0), then the noisy ones
    h_tf = obj._forward(lm, b["ids"], b["valid"], torch.cat([x, x_t], 1), tt, obj.order.repeat(2), ent.repeat(2),
                        attn_mask=mask, rows=torch.cat([ent, 4 + ent]))[:, 16:]
    for k in range(4):
        z = torch.cat([x[:, :4 * k], x_t[:, 4 * k:4 * k + 4]], 1)
        tt = torch.cat([torch.zeros(3, k), t_ent[:, k:k + 1]], 1)  # clean entities < k at t = 0, then entity k
        h = obj._forward(lm, b["ids"], b["valid"], z, tt, obj.order[:4 * k + 4], ent[:4 * k + 4])
        assert torch.allclose(h[:, -4:], h_tf[:, 4 * k:4 * k + 4], atol=1e-5)



def _per_token_forward(obj):
    """The objective's forward as it was before the adaLN went per entity: the time embedding and every block's
    adaLN linear applied at each position (prompt positions: a zero condition each)."""
    def forward(lm, ids, valid, z, t, slots, blocks, attn_mask=None, rows=None):
        rows = blocks if rows is None else rows
        b, p = ids.shape
        t_tok = t[:, rows]  # [B, L]: each position's entity time
        cond = torch.cat([torch.zeros(b, p, obj.config.dim), obj.time(t_tok)], 1)  # [B, T, D]
        real = lm.forward

        def per_position(*a, cond_index=None, **kw):  # the backbone without rows: one condition per position
            assert cond_index is not None
            return real(*a, **{**kw, "cond": cond})

        lm.forward = per_position
        try:
            return XARFlowMatching._forward(obj, lm, ids, valid, z, t, slots, blocks, attn_mask, rows)
        finally:
            del lm.forward
    return forward


@pytest.mark.parametrize("noisy_context,predictor", [(True, "backbone"), (False, "backbone"), (True, "mlp")])
def test_adaln_once_per_entity_equals_the_per_token_computation(monkeypatch, noisy_context, predictor):
    """Loss and gradients (every weight random) equal the per-token reference, and each block's adaLN linear
    sees 1 + K rows (the prompt's zero row and one per entity; 1 + 2K with teacher forcing), not T positions."""
    lm, obj = _lm(), _obj(noisy_context=noisy_context, predictor=predictor)
    torch.manual_seed(5)
    for q in [*lm.parameters(), *obj.parameters()]:
        torch.nn.init.normal_(q, std=0.05)
    batch = _batch()
    rows_seen = []
    hook = lm.blocks[0].ada.register_forward_hook(lambda m, i, o: rows_seen.append(i[0].shape[1]))

    def loss_and_grads():
        lm.zero_grad()
        obj.zero_grad()
        torch.manual_seed(0)
        loss = obj.loss(lm, batch)["loss"]
        loss.backward()
        return loss.detach(), [q.grad.clone() for q in [*lm.parameters(), *obj.parameters()] if q.grad is not None]

    new, g_new = loss_and_grads()
    hook.remove()
    assert rows_seen == [1 + (4 if noisy_context else 8)]
    monkeypatch.setattr(obj, "_forward", _per_token_forward(obj))
    ref, g_ref = loss_and_grads()
    torch.testing.assert_close(new, ref)
    assert len(g_new) == len(g_ref)
    for a, b in zip(g_new, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_cached_sampling_equals_the_per_token_reference(monkeypatch):
    """KV-cached sampling with per-entity adaLN equals uncached sampling through the per-token reference."""
    lm, obj = _lm(), _obj()
    torch.manual_seed(6)
    for q in [*lm.parameters(), *obj.parameters()]:
        torch.nn.init.normal_(q, std=0.05)
    b = _batch()
    ids, valid = torch.cat([b["ids"], b["ids"].flip(0)]), torch.cat([b["valid"], b["valid"].flip(0)])
    a = obj.generate(lm, ids, valid=valid, steps=2, cfg_scale=2.0, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(obj, "_forward", _per_token_forward(obj))
    c = obj.generate(lm, ids, valid=valid, steps=2, cfg_scale=2.0, generator=torch.Generator().manual_seed(1),
                     use_cache=False)
    assert torch.allclose(a, c, atol=1e-5), (a - c).abs().max()

@pytest.mark.parametrize("method", ["euler", "em"])
def test_sampler_lands_on_a_point_mass(method):
    x0 = torch.tensor([[1.5, -2.0, 0.25]])
    noise = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    out = flow_sample(lambda x, t: (x - x0) / t, noise, 10, method, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(out, x0.expand(4, -1), atol=1e-5)  # the exact velocity of a point mass


@pytest.mark.parametrize("method,steps", [("euler", 50), ("em", 100)])
def test_sampler_integrates_a_gaussian_velocity_field(method, steps):
    """Data N(mu, s^2): the exact velocity E[eps - x | x_t] is linear in x_t; samples must come out N(mu, s^2)."""
    mu, s = 2.0, 0.5

    def v(x, t):
        var = (1 - t) ** 2 * s * s + t * t
        e_x = mu + (1 - t) * s * s / var * (x - (1 - t) * mu)
        e_eps = t / var * (x - (1 - t) * mu)
        return e_eps - e_x

    g = torch.Generator().manual_seed(0)
    out = flow_sample(v, torch.randn(20000, 1, generator=g), steps, method, generator=g)
    assert abs(out.mean().item() - mu) < 0.02 and abs(out.std().item() - s) < 0.03


def test_sampler_constant_velocity_and_bad_method():
    out = flow_sample(lambda x, t: torch.full_like(x, 3.0), torch.zeros(2, 2), 7, "euler")
    assert torch.allclose(out, torch.full((2, 2), -3.0))
    with pytest.raises(ValueError, match="sampler"):
        flow_sample(lambda x, t: x, torch.zeros(1), 3, "heun")


@pytest.mark.parametrize("entity,predictor,guided", [("cell", "backbone", True), ("token", "mlp", False),
                                                      ("subsample", "backbone", False), ("image", "mlp", True)])
def test_cached_sampling_equals_uncached(entity, predictor, guided):
    lm, obj = _lm(), _obj(entity=entity, predictor=predictor, entity_size=2)
    b = _batch()
    ids, valid = b["ids"], b["valid"]
    kw = {}
    if guided:
        ids, valid, kw = torch.cat([ids, ids.flip(0)]), torch.cat([valid, valid.flip(0)]), {"cfg_scale": 2.5}
    for sampler in ("euler", "em"):
        a = obj.generate(lm, ids, valid=valid, steps=3, sampler=sampler, generator=torch.Generator().manual_seed(1), **kw)
        c = obj.generate(lm, ids, valid=valid, steps=3, sampler=sampler, generator=torch.Generator().manual_seed(1),
                         use_cache=False, **kw)
        assert a.shape == (3, 4, 4, 4) and torch.allclose(a, c, atol=1e-5)


@pytest.mark.parametrize("entity", ["token", "cell", "subsample", "image"])
@pytest.mark.parametrize("guided", [False, True])
def test_cached_sampling_equals_uncached_with_every_weight_nonzero(entity, guided):
    """Every parameter random, adaLN biases included: the cached prefill must give the prompt the same adaLN
    condition (cond = 0 -> the bias path) that training and the uncached forward give it."""
    lm, obj = _lm(), _obj(entity=entity, predictor="backbone", entity_size=2)
    torch.manual_seed(3)
    for p in [*lm.parameters(), *obj.parameters()]:
        torch.nn.init.normal_(p, std=0.05)
    b = _batch()
    ids, valid, kw = b["ids"], b["valid"], {}
    if guided:
        ids, valid, kw = torch.cat([ids, ids.flip(0)]), torch.cat([valid, valid.flip(0)]), {"cfg_scale": 2.5}
    a = obj.generate(lm, ids, valid=valid, steps=2, generator=torch.Generator().manual_seed(1), **kw)
    c = obj.generate(lm, ids, valid=valid, steps=2, generator=torch.Generator().manual_seed(1), use_cache=False, **kw)
    assert torch.allclose(a, c, atol=1e-5), (a - c).abs().max()


def test_guidance_ramps_linearly_across_entities(monkeypatch):
    import models.objectives.xar as xar

    assert [xar.cfg_ramp(4.0, k, 4) for k in range(4)] == pytest.approx([1.0, 2.0, 3.0, 4.0])
    assert xar.cfg_ramp(3.0, 0, 1) == 3.0
    lm, obj = _lm(), _obj()
    seen = []
    real = xar.cfg_ramp
    monkeypatch.setattr(xar, "cfg_ramp", lambda c, k, n, s: seen.append(real(c, k, n, s)) or seen[-1])
    b = _batch(padded=False)
    obj.generate(lm, torch.cat([b["ids"]] * 2), cfg_scale=4.0, steps=1)
    assert seen == pytest.approx([1.0, 2.0, 3.0, 4.0])
    seen.clear()
    obj.generate(lm, torch.cat([b["ids"]] * 2), cfg_scale=4.0, steps=1, cfg_schedule="constant")
    assert seen == [4.0] * 4


def test_config_round_trip_and_checks():
    obj = _obj(entity="subsample", noisy_context=False, predictor="mlp")
    again = build(describe(obj))
    assert type(again) is XARFlowMatching and again.config == obj.config
    with pytest.raises(ValueError, match="predictor"):
        _obj(predictor="transformer")
    with pytest.raises(ValueError, match="adaln"):
        _obj().loss(Transformer(LMConfig.from_preset("tiny")), _batch())
    with pytest.raises(ValueError, match="do not match"):
        _obj().loss(_lm(), {**_batch(), "latents": torch.randn(3, 4, 8, 8)})


@pytest.mark.parametrize("name,target", [("xar-b", 172e6), ("xar-l", 608e6), ("xar-h", 1.1e9)])
def test_presets_have_the_paper_sizes(name, target):
    cfg = LMConfig.from_preset(name)
    with torch.device("meta"):
        lm = Transformer(cfg)
        obj = XARFlowMatching(dim=cfg.dim, latent_channels=16, grid=16, entity_size=8)  # KL-16 on 256px
    n = lm.num_params() + sum(p.numel() for p in obj.parameters())
    assert abs(n / target - 1) < 0.02, n


def test_short_fit_lowers_the_loss():
    """Real data: 8x8 scikit-learn digits through a random KL tokenizer; 100 steps of the tiny backbone."""
    from train.sources import load_source
    from vision_tokenizers.kl import KLConfig, KLTokenizer

    torch.manual_seed(0)
    data = load_source("digits")
    kl = KLTokenizer(KLConfig(image_size=8, pad=0, channels=(8, 16), latent_channels=4)).eval()
    x = torch.stack([data.image(i, 1, 8) for i in range(256)])
    kl.config.scale_factor = kl.measure_scale(x)
    z = kl.encode(x)  # [256, 4, 4, 4]
    assert abs(z.std().item() - 1) < 1e-3  # the measured scale gives unit-variance latents
    labels = torch.as_tensor(data.labels[:256])
    ids = torch.stack([torch.tensor([1, 2, 10 + int(c)]) for c in labels])  # a class token as the prompt
    lm, obj = _lm(), _obj(entity="cell", entity_size=2)
    opt = torch.optim.AdamW([*lm.parameters(), *obj.parameters()], lr=2e-3)
    valid = torch.ones_like(ids, dtype=torch.bool)

    def eval_loss():
        with torch.random.fork_rng():
            torch.manual_seed(123)
            with torch.no_grad():
                return float(obj.loss(lm, {"ids": ids, "valid": valid, "latents": z})["loss"])

    before = eval_loss()
    for step in range(100):
        i = torch.randint(0, 256, (64,))
        loss = obj.loss(lm, {"ids": ids[i], "valid": valid[i], "latents": z[i]})["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < before - 0.3 and math.isfinite(after), (before, after)
