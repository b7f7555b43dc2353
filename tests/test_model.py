"""DSANet model: vectorised pieces vs per-sample loops, DESIGN §11 invariants, parameter counts,
training/inference behaviour and ablation switches."""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dsanet import layers, text  # noqa: E402
from dsanet import text_encoders as encoders  # noqa: E402
from dsanet.config import LossConfig, ModelConfig, TextConfig  # noqa: E402
from dsanet.losses import total_loss  # noqa: E402
from dsanet.model import DSANet, belief_modulation, parameter_groups  # noqa: E402

PROMPTS = (("normal",), ("fighting",), ("shooting",), ("car accident", "a car crash"))
C = len(PROMPTS)
# Structural tests run at D = 64 with a stub text encoder; the real (512-wide) text tower is
# used only where the text side itself is under test.
SMALL = ModelConfig(
    visual_length=32, visual_width=64, attn_window=8, num_prototypes=4, decoder_depth=2
)
TINY = dataclasses.replace(SMALL, visual_width=512, mlp_ratio=1)


class StubText(torch.nn.Module):
    """Trainable unit class embeddings (C, 64), standing in for the CLIP text encoder."""

    num_classes = C
    out_dim = 64

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(C, 64))

    def forward(self) -> torch.Tensor:
        return F.normalize(self.table, dim=-1)


def _small(cfg: ModelConfig = SMALL, loss: LossConfig | None = None) -> DSANet:
    torch.manual_seed(1)
    return DSANet(cfg, loss or LossConfig(), C, StubText())


@pytest.fixture(scope="module")
def tower():
    import open_clip

    torch.manual_seed(0)
    base = open_clip.get_model_config("ViT-B-16-quickgelu")
    model = open_clip.create_model(
        "ViT-B-16-quickgelu",
        pretrained=None,
        text_cfg={**base["text_cfg"], "layers": 1},
        vision_cfg={"image_size": 16, "layers": 1, "width": 64, "patch_size": 16},
    )
    tokenizer = open_clip.get_tokenizer("ViT-B-16-quickgelu")
    return encoders.FrozenTextTower.from_open_clip(model), tokenizer


def _model(tower, cfg: ModelConfig = TINY, loss: LossConfig | None = None, **text_kw) -> DSANet:
    tower_module, tokenizer = tower
    text_cfg = TextConfig(layers=1, **text_kw)
    encoder = encoders.text_encoder_from_tower(text_cfg, tower_module, tokenizer, PROMPTS)
    torch.manual_seed(1)
    return DSANet(cfg, loss or LossConfig(), C, encoder)


def _batch(B: int = 3, T: int = 32, seed: int = 0, D: int = 64):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(B, T, D, generator=g)
    lengths = torch.tensor([T, 5, T // 2 + 3][:B])
    features[torch.arange(T)[None, :] >= lengths[:, None]] = 0  # zero padding, as the loader
    labels = torch.zeros(B, C)
    labels[0, 0] = 1
    labels[1:, 1] = 1
    labels[-1, 3] = 1
    return features, lengths, labels


# ---------------------------------------------------------------------------- graphs, masks


def _loop_similarity(x, lengths, threshold=0.7):
    """The reference: per sample, threshold and softmax the top-left len x len block."""
    x2 = x @ x.mT
    norms = x.norm(dim=2, keepdim=True)
    x2 = x2 / (norms @ norms.mT + 1e-20)
    out = torch.zeros_like(x2)
    for b in range(x.shape[0]):
        n = int(lengths[b])
        out[b, :n, :n] = F.softmax(F.threshold(x2[b, :n, :n], threshold, 0), dim=1)
    return out


def test_similarity_adjacency_matches_loop():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 1, 24, generator=g)
    x = base + 0.6 * torch.randn(4, 40, 24, generator=g)  # many cosines above 0.7
    lengths = torch.tensor([40, 1, 17, 33])
    adj = layers.similarity_adjacency(x, lengths, 0.7)
    torch.testing.assert_close(adj, _loop_similarity(x, lengths), atol=1e-6, rtol=1e-6)


def test_similarity_adjacency_invariants():
    T = 16
    x = torch.eye(T, 32).expand(3, T, 32).clone()  # all off-diagonal cosines are 0 <= 0.7
    lengths = torch.tensor([16, 6, 0])
    adj = layers.similarity_adjacency(x, lengths, 0.7)
    assert torch.isfinite(adj).all()
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(adj[b, :n].sum(-1), torch.ones(n))
        assert (adj[b, n:] == 0).all() and (adj[b, :, n:] == 0).all()
        if n:
            e = math.e
            expected = torch.full((n, n), 1 / (e + n - 1)).fill_diagonal_(e / (e + n - 1))
            torch.testing.assert_close(adj[b, :n, :n], expected)


def test_distance_adjacency_invariants():
    A = layers.distance_adjacency(256, math.e)
    assert A[0, 1].item() == pytest.approx(math.exp(-1 / math.e), abs=1e-6)
    assert A[0, 1].item() == pytest.approx(0.69220, abs=1e-5)
    assert A[128].sum().item() == pytest.approx(5.4977, abs=1e-4)
    assert A[0].sum().item() == pytest.approx(3.25, abs=0.01)
    torch.testing.assert_close(A, A.T)
    valid = torch.arange(256)[None] < torch.tensor([[100]])
    masked = layers.DistanceAdjacency(256)(valid)
    assert (masked[0, 100:] == 0).all() and (masked[0, :, 100:] == 0).all()


@pytest.mark.parametrize("window", [8, 64])
def test_window_mask(window):
    mask = layers.window_mask(256, window)
    assert ((mask == 0).sum(1) == window).all()
    i = torch.arange(256)
    same = (i[:, None] // window) == (i[None, :] // window)
    assert (mask[same] == 0).all() and torch.isinf(mask[~same]).all()


def test_window_must_divide_length():
    with pytest.raises(ValueError, match="attn_window"):
        layers.window_mask(256, 48)
    with pytest.raises(ValueError, match="attn_window"):
        _small(dataclasses.replace(SMALL, attn_window=12))


def test_temporal_attention_stays_in_window():
    torch.manual_seed(0)
    encoder = layers.TemporalTransformer(16, 2, 1, 4)
    mask = layers.window_mask(32, 8)
    x = torch.randn(2, 32, 16)
    y = x.clone()
    y[:, 8:] = torch.randn(2, 24, 16)  # change everything outside the first window
    torch.testing.assert_close(encoder(x, mask)[:, :8], encoder(y, mask)[:, :8])


def test_padded_window_mask_hides_padding_without_nan():
    window = layers.window_mask(16, 4)
    valid = torch.arange(16)[None] < torch.tensor([[6]])  # windows 2 and 3 are all padding
    mask = layers.padded_window_mask(window, valid, heads=2)
    assert mask.shape == (2, 16, 16)
    assert torch.isinf(mask[0, :6, 6:]).all()  # valid queries never see padding
    assert (torch.isfinite(mask[0]).sum(1) >= 1).all()  # every row keeps a key
    scores = torch.softmax(mask[0], dim=-1)
    assert torch.isfinite(scores).all()


# ---------------------------------------------------------------------------- pooling


def _loop_dcsa(V, logits_det, t, scale=10.0, temp=0.07):
    events, backgrounds = [], []
    tn = t / t.norm(dim=-1, keepdim=True)
    for b in range(V.shape[0]):
        p = torch.sigmoid(logits_det[b])  # (T, 1)
        w_e = torch.exp(scale * p) - 1
        w_n = torch.exp(scale * (1 - p)) - 1
        f_e = (w_e / w_e.sum() * V[b]).sum(0)
        f_n = (w_n / w_n.sum() * V[b]).sum(0)
        events.append(f_e / f_e.norm() @ tn.T / temp)
        backgrounds.append(f_n / f_n.norm() @ tn.T / temp)
    return torch.stack(events)[:, None], torch.stack(backgrounds)[:, None]


def test_dcsa_pooling_matches_loop():
    model = _small()
    g = torch.Generator().manual_seed(2)
    V = torch.randn(3, 32, 64, generator=g)
    logits = torch.randn(3, 32, 1, generator=g) * 2
    t = torch.randn(C, 64, generator=g)
    event, background = model.pool_event_background(V, logits, t, None)
    ref_event, ref_background = _loop_dcsa(V, logits, t)
    torch.testing.assert_close(event, ref_event, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(background, ref_background, atol=1e-5, rtol=1e-5)
    # With padding masked, a sample pools exactly like its unpadded prefix.
    valid = torch.arange(32)[None] < torch.tensor([[32], [7], [20]])
    event, background = model.pool_event_background(V, logits, t, valid)
    for b, n in enumerate([32, 7, 20]):
        ref_event, ref_background = _loop_dcsa(V[b : b + 1, :n], logits[b : b + 1, :n], t)
        torch.testing.assert_close(event[b : b + 1], ref_event, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(background[b : b + 1], ref_background, atol=1e-5, rtol=1e-5)


def test_alignment_matches_loop():
    model = _small()
    g = torch.Generator().manual_seed(3)
    V = torch.randn(2, 32, 64, generator=g)
    logits = torch.randn(2, 32, 1, generator=g)
    t = F.normalize(torch.randn(C, 64, generator=g), dim=-1)
    got = model.align(V, logits, t, None)
    for b in range(2):
        prompt = (logits[b] * V[b]).sum(0)
        classes = t + prompt / prompt.norm()
        classes = classes + model.mlp1(classes)
        expected = F.cosine_similarity(V[b][:, None], classes[None], dim=-1) / 0.07
        torch.testing.assert_close(got[b], expected, atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------------------- belief modulation


def test_belief_modulation_rows_and_auc():
    from sklearn.metrics import roc_auc_score

    g = torch.Generator().manual_seed(4)
    det = torch.randn(500, 1, generator=g, dtype=torch.float64) * 3
    align = torch.randn(500, 7, generator=g, dtype=torch.float64) * 3
    labels = (torch.rand(500, generator=g) < 0.3).numpy()
    for beta in (1.0, 5.0):
        probs = belief_modulation(det, align, beta)
        torch.testing.assert_close(probs.sum(-1), torch.ones(500, dtype=torch.float64))
        abnormal = torch.sigmoid(det / beta)
        torch.testing.assert_close(probs[:, 1:], abnormal * torch.softmax(align[:, 1:] / beta, -1))
        auc_raw = roc_auc_score(labels, torch.sigmoid(det).squeeze(1).numpy())
        auc_beta = roc_auc_score(labels, (1 - probs[:, 0]).numpy())
        assert auc_beta == pytest.approx(auc_raw, abs=1e-12)


# ---------------------------------------------------------------------------- parameter counts


@pytest.fixture(scope="module")
def full_tower():
    """A 12-layer random text tower: parameter counting only, no forward pass."""
    return text.load_text_tower(TextConfig(layers=12), None), None


@pytest.mark.parametrize(
    ("visual_layers", "adapt_layers", "window", "with_sgnm", "without_sgnm"),
    [(1, 1, 64, 40_454_210, 9_974_786), (2, 3, 8, 44_130_882, 13_651_458)],
    ids=["xd", "ucf"],
)
def test_parameter_counts(full_tower, visual_layers, adapt_layers, window, with_sgnm, without_sgnm):
    import open_clip

    tokenizer = open_clip.get_tokenizer("ViT-B-16-quickgelu")
    prompts = tuple((f"class {i}",) for i in range(7))
    encoder = encoders.text_encoder_from_tower(
        TextConfig(adapt_layers=adapt_layers), full_tower[0], tokenizer, prompts
    )
    assert len(encoder.tower.blocks) == 12
    for use_sgnm, expected in ((True, with_sgnm), (False, without_sgnm)):
        cfg = ModelConfig(visual_layers=visual_layers, attn_window=window, use_sgnm=use_sgnm)
        with torch.device("meta"):  # the count needs shapes only, not the (slow) init
            model = DSANet(cfg, LossConfig(), 7, encoder)
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
        main, sgnm = parameter_groups(model)
        assert sum(p.numel() for p in main) == without_sgnm
        assert sum(p.numel() for p in sgnm) == expected - without_sgnm


# ---------------------------------------------------------------------------- behaviour


def test_forward_backward_reaches_adapters(tower):
    model = _model(tower).train()
    features, lengths, labels = _batch(D=512)
    out = model(features, lengths)
    assert out.logits_det.shape == (3, 32, 1)
    assert out.logits_align.shape == (3, 32, C)
    assert out.logits_event.shape == out.logits_bkg.shape == (3, 1, C)
    assert out.text_features.shape == (C, 512)
    assert out.sgnm.reconstructed.shape == (3, 32, 512)
    loss, terms = total_loss(out, labels, lengths, LossConfig())
    assert math.isfinite(loss.item()) and set(terms) >= {"cons", "gather", "event", "bkg"}
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)
    for name in (
        "text_encoder.adapters.0.weight",
        "text_encoder.projection.weight",
        "sgnm.prototypes",
        "sgnm.decoder.1.attn.learn_scale",
        "gc1.residual.weight",
        "temporal.resblocks.0.attn.in_proj_weight",
        "frame_position_embeddings.weight",
    ):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    assert grads["distance_adj.sigma"] is None  # unused, kept for the count (Q-A2)


def test_sgnm_runs_only_in_training():
    model = _small()
    features, lengths, _ = _batch()
    calls = []
    model.sgnm.register_forward_hook(lambda *args: calls.append(1))
    assert model.train()(features, lengths).sgnm is not None
    with torch.no_grad():
        assert model.eval()(features, lengths).sgnm is None
        model.train().infer(features[:2], torch.tensor([32, 10]))
    assert len(calls) == 1


def test_text_encoded_once_per_forward():
    model = _small().train()
    features, lengths, _ = _batch()
    calls = []
    model.text_encoder.register_forward_hook(lambda *args: calls.append(1))
    model(features, lengths)
    assert len(calls) == 1
    with torch.no_grad():
        t = model.encode_classes()
        model.eval()(features, lengths, text_features=t)
    assert len(calls) == 2


def test_infer_flattens_and_cuts():
    model = _small().eval()
    features, _, _ = _batch(B=2)
    chunk_lengths = torch.tensor([32, 9])
    text_features = model.encode_classes().detach()
    det, align = model.infer(features, chunk_lengths, text_features=text_features)
    assert det.shape == (41, 1) and align.shape == (41, C)
    with torch.no_grad():
        out = model(features, chunk_lengths, text_features=text_features)
    torch.testing.assert_close(det, out.logits_det.reshape(-1, 1)[:41])
    torch.testing.assert_close(align, out.logits_align.reshape(-1, C)[:41])
    det, _ = model.infer(features, torch.tensor([32, 9]), num_snippets=40)
    assert det.shape == (40, 1)


def test_sgnm_selection():
    features, lengths, _ = _batch()
    logits = torch.randn(3, 32, 1)
    for select, expected_mask in (("padded", None), ("valid", [25, 4, 15])):
        model = _small(dataclasses.replace(SMALL, sgnm_select=select))
        normal, mask = model.sgnm.select_normal(features, logits, lengths)
        assert normal.shape == (3, int(32 * 0.8), 64) and not normal.requires_grad
        if expected_mask is None:
            assert mask is None
        else:
            assert mask.sum(1).tolist() == expected_mask
            # every kept slot is a valid one: padded rows are all zero
            kept = normal[mask]
            assert (kept.abs().sum(-1) > 0).all()


@pytest.mark.parametrize(
    "change",
    [
        {"use_sgnm": False},
        {"sgnm_select": "valid"},
        {"decoder_residual": "all_but_first"},
        {"mask_padding": True},
        {"extractor_depth": 2, "visual_layers": 2, "visual_heads": 2},
    ],
    ids=lambda c: ",".join(c),
)
def test_model_switches_run(change):
    model = _small(dataclasses.replace(SMALL, **change)).train()
    features, lengths, labels = _batch()
    out = model(features, lengths)
    assert (out.sgnm is None) == (change.get("use_sgnm") is False)
    loss, _ = total_loss(out, labels, lengths, LossConfig())
    loss.backward()
    assert math.isfinite(loss.item())


def test_dcsa_off():
    loss_cfg = LossConfig(use_dcsa=False)
    model = _small(loss=loss_cfg).train()
    features, lengths, labels = _batch()
    out = model(features, lengths)
    assert out.logits_event is None and out.logits_bkg is None
    _, terms = total_loss(out, labels, lengths, loss_cfg)
    assert "event" not in terms and "bkg" not in terms


@pytest.mark.parametrize("mode", ["coop", "frozen", "manual"])
def test_text_modes_run(tower, mode):
    model = _model(
        tower, dataclasses.replace(TINY, use_sgnm=False), mode=mode, normalize=mode != "coop"
    ).train()
    features, lengths, labels = _batch(D=512)
    loss, _ = total_loss(model(features, lengths), labels, lengths, LossConfig())
    loss.backward()
    assert math.isfinite(loss.item())
    if mode == "coop":
        assert model.text_encoder.context.grad.abs().sum() > 0


def test_trainable_state_dict_round_trip(tower):
    model = _model(tower)
    state = model.trainable_state_dict()
    assert not any(k.startswith("text_encoder.tower.") for k in state)
    assert "sgnm.prototypes" in state and "distance_adj.sigma" in state
    assert "text_encoder.adapters.0.weight" in state
    assert sum(v.numel() for v in state.values()) == sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )
    other = _model(tower)
    with torch.no_grad():
        other.sgnm.prototypes.zero_()
    other.load_trainable_state_dict(state)
    features, lengths, _ = _batch(D=512)
    model.eval()
    other.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            other(features, lengths).logits_align, model(features, lengths).logits_align
        )
    del state["classifier.weight"]
    with pytest.raises(KeyError, match="classifier.weight"):
        other.load_trainable_state_dict(state)


def test_checkpoint_of_another_shape_is_a_clear_error():
    state = _small(dataclasses.replace(SMALL, num_prototypes=8)).trainable_state_dict()
    with pytest.raises(ValueError, match=r"checkpoint shapes do not match .*sgnm\.prototypes "):
        _small().load_trainable_state_dict(state)


def test_text_encoder_must_fit(tower):
    with pytest.raises(ValueError, match="num_classes"):
        tower_module, tokenizer = tower
        encoder = encoders.text_encoder_from_tower(
            TextConfig(layers=1), tower_module, tokenizer, PROMPTS
        )
        DSANet(TINY, LossConfig(), C + 1, encoder)
