"""Text encoders: the adapter invariant of DESIGN §11, token truncation, modes, weight resolution,
and the kept tower a reused worker builds from."""

from __future__ import annotations

import logging
import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import open_clip  # noqa: E402

from dsanet import text  # noqa: E402
from dsanet import text_encoders as encoders  # noqa: E402
from dsanet.config import TextConfig  # noqa: E402

ARCH = "ViT-B-16-quickgelu"
LAYERS = 2  # a tiny random tower, applied identically to both sides of every comparison
PROMPTS = (("normal",), ("fighting", "two people fighting"), ("car accident",))


def _clip(layers: int = LAYERS) -> torch.nn.Module:
    torch.manual_seed(0)
    base = open_clip.get_model_config(ARCH)
    return open_clip.create_model(
        ARCH,
        pretrained=None,
        text_cfg={**base["text_cfg"], "layers": layers},
        vision_cfg={"image_size": 16, "layers": 1, "width": 64, "patch_size": 16},
    )


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer(ARCH)


@pytest.fixture(scope="module")
def tower():
    return encoders.FrozenTextTower.from_open_clip(_clip())


def _encoder(cfg: TextConfig, tower, tokenizer):
    return encoders.text_encoder_from_tower(cfg, tower, tokenizer, PROMPTS)


def test_adapter_with_zero_mix_equals_open_clip(tokenizer):
    """DESIGN §11: t_w = 0 and identity projection == encode_text with identity text_projection."""
    model = _clip()
    cfg = TextConfig(layers=LAYERS, adapt_layers=LAYERS, adapter_weight=0.0, normalize=False)
    encoder = _encoder(cfg, encoders.FrozenTextTower.from_open_clip(model), tokenizer)
    encoder.projection = torch.nn.Identity()
    with torch.no_grad():
        model.text_projection.copy_(torch.eye(model.text_projection.shape[0]))
        tokens, _ = encoders.tokenize_prompts(tokenizer, PROMPTS)
        expected = model.encode_text(tokens)  # full 77-token context, open_clip's own path
        got = encoder.encode()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_adapter_mixing_changes_output(tower, tokenizer):
    cfg = TextConfig(layers=LAYERS, adapt_layers=1, adapter_weight=0.6, normalize=False)
    mixed = _encoder(cfg, tower, tokenizer)
    plain = _encoder(
        TextConfig(layers=LAYERS, adapt_layers=1, adapter_weight=0.0), tower, tokenizer
    )
    plain.load_state_dict(mixed.state_dict())
    with torch.no_grad():
        assert not torch.allclose(mixed.encode(), plain.encode())


@pytest.mark.parametrize("mode", ["adapter", "coop", "frozen", "manual"])
def test_token_truncation_is_exact(mode, tower, tokenizer):
    cfg = TextConfig(mode=mode, layers=LAYERS)
    template = cfg.template if mode == "manual" else "{}"
    tokens, index = encoders.tokenize_prompts(tokenizer, PROMPTS, template)
    kinds = {
        "adapter": lambda cut: encoders.AdapterTextEncoder(
            tower, tokens, index, 1, 0.6, truncate=cut
        ),
        "coop": lambda cut: encoders.PromptTextEncoder(tower, tokens, index, 10, 10, truncate=cut),
        "frozen": lambda cut: encoders.FrozenTextEncoder(tower, tokens, index, truncate=cut),
        "manual": lambda cut: encoders.FrozenTextEncoder(tower, tokens, index, truncate=cut),
    }
    torch.manual_seed(1)
    short = kinds[mode](True)
    full = kinds[mode](False)
    full.load_state_dict(short.state_dict())
    assert short.eot.max() < 77
    with torch.no_grad():
        torch.testing.assert_close(short(), full(), atol=1e-5, rtol=1e-5)


def test_class_features_average_descriptions(tower, tokenizer):
    cfg = TextConfig(layers=LAYERS, normalize=False)
    encoder = _encoder(cfg, tower, tokenizer)
    with torch.no_grad():
        per_description = encoder.encode()  # (4, D)
        classes = encoder()
    assert classes.shape == (3, tower.width)
    torch.testing.assert_close(classes[1], per_description[1:3].mean(0))
    normalized = _encoder(TextConfig(layers=LAYERS), tower, tokenizer)
    normalized.load_state_dict(encoder.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(normalized().norm(dim=-1), torch.ones(3))


def test_modes_trainable_parameters(tower, tokenizer):
    def count(mode: str, **kw) -> int:
        encoder = _encoder(TextConfig(mode=mode, layers=LAYERS, **kw), tower, tokenizer)
        return sum(p.numel() for p in encoder.parameters() if p.requires_grad)

    assert count("adapter", adapt_layers=1) == 2 * 512 * 512
    assert count("adapter", adapt_layers=0) == 512 * 512  # final projection only
    assert count("coop") == 77 * 512
    assert count("frozen") == 0
    assert count("manual") == 0


def test_manual_mode_uses_template(tower, tokenizer):
    frozen = _encoder(TextConfig(mode="frozen", layers=LAYERS), tower, tokenizer)
    manual = _encoder(
        TextConfig(mode="manual", layers=LAYERS, template="a video of {}"), tower, tokenizer
    )
    assert manual.tokens.shape[1] == frozen.tokens.shape[1] + 3
    with torch.no_grad():
        assert not torch.allclose(frozen(), manual())


def test_coop_prompt_layout(tower, tokenizer):
    tokens, index = encoders.tokenize_prompts(tokenizer, (("normal",), ("car accident",)))
    encoder = encoders.PromptTextEncoder(tower, tokens, index, prefix=10, postfix=10)
    ids, words = encoder.prompt_ids, encoder.from_word
    # "car accident": SOT, 10 context rows, 2 words at 11-12, 10 context rows, EOT at 23.
    assert encoder.eot.tolist() == [10 + 2 + 10, 10 + 3 + 10]
    assert words[1].nonzero().flatten().tolist() == [0, 11, 12, 23]
    assert ids[1, [0, 11, 12, 23]].tolist() == tokens[1, :4].tolist()
    assert words[0].nonzero().flatten().tolist() == [0, 11, 22]
    with pytest.raises(ValueError, match="prompt_prefix"):
        encoders.PromptTextEncoder(tower, tokens, index, prefix=40, postfix=40)


def test_tower_is_frozen_and_stays_in_eval(tower, tokenizer):
    encoder = _encoder(TextConfig(layers=LAYERS), tower, tokenizer)
    encoder.train()
    assert encoder.training and not encoder.tower.training
    assert not any(m.training for m in encoder.tower.modules())
    assert not any(p.requires_grad for p in encoder.tower.parameters())
    assert all(p.requires_grad for p in encoder.adapters.parameters())


def test_adapter_gradients_cross_frozen_blocks(tower, tokenizer):
    encoder = _encoder(TextConfig(layers=LAYERS, adapt_layers=1), tower, tokenizer)
    encoder().sum().backward()
    assert encoder.adapters[0].weight.grad.abs().sum() > 0
    assert encoder.projection.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------- weights


def test_empty_weights_warn_loudly(caplog):
    with caplog.at_level(logging.WARNING, logger="dsanet.text"):
        assert text.resolve_text_weights(TextConfig(weights="")) is None
    assert "RANDOM weights" in caplog.text


def test_missing_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="text.weights"):
        text.resolve_text_weights(TextConfig(weights=str(tmp_path / "nope.pt")))


def test_openai_lookup(tmp_path, monkeypatch):
    monkeypatch.setenv(text.WEIGHTS_DIR_ENV, str(tmp_path / "weights"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="convert_openai_checkpoint"):
        text.resolve_text_weights(TextConfig(weights="openai"))
    (tmp_path / "weights").mkdir()
    archive = tmp_path / "weights" / "ViT-B-16.pt"
    archive.write_bytes(b"")
    assert text.resolve_text_weights(TextConfig(weights="openai")) == str(archive)
    converted = tmp_path / "weights" / "ViT-B-16-openai.pt"
    converted.write_bytes(b"")
    assert text.resolve_text_weights(TextConfig(weights="openai")) == str(converted)


def test_unknown_arch():
    with pytest.raises(ValueError, match="text.arch"):
        text.build_text_encoder(TextConfig(arch="ViT-B-61"), PROMPTS)


@pytest.mark.slow  # builds a full-size CLIP (3 s here); "unreadable file" below is the default's
def test_bad_weights_file(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"not_a_clip_key": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="text.weights"):
        text.build_text_encoder(TextConfig(weights=str(bad)), PROMPTS)


def _junk(path):
    path.write_bytes(b"\x00not a checkpoint" * 64)
    return str(path)


def _wrong_shape_clip(path):
    """A full-size CLIP state dict in a few kB (every tensor a broadcast zero), one shape off."""
    with torch.device("meta"):
        model = open_clip.CLIP(**open_clip.get_model_config(ARCH))
    state = {
        k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in model.state_dict().items()
    }
    state["token_embedding.weight"] = torch.zeros(()).expand(1000, 512)
    torch.save(state, path)
    return str(path)


BAD_WEIGHTS = {
    "unknown tag": (
        lambda path: "opneai",
        FileNotFoundError,
        r"text.weights='opneai': no such file.*'openai'",
    ),
    "unreadable file": (
        _junk,
        ValueError,
        r"is not a readable checkpoint \(truncated, or not written by torch.save",
    ),
    "wrong shapes": (
        _wrong_shape_clip,
        ValueError,
        r"could not be loaded into text.arch='ViT-B-16-quickgelu': .*size mismatch for "
        r"token_embedding.weight.*; give a full CLIP checkpoint",
    ),
}


@pytest.mark.parametrize(
    "case",
    [  # each builds a full-size CLIP before it fails (3 s here): one in the default suite
        pytest.param(case, marks=[pytest.mark.slow] if case == "wrong shapes" else [])
        for case in BAD_WEIGHTS
    ],
)
def test_bad_text_weights_fail_clearly(tmp_path, case):
    weights, error, message = BAD_WEIGHTS[case]
    with pytest.raises(error, match=message) as info:
        cfg = TextConfig(arch=ARCH, weights=weights(tmp_path / "weights.pt"), layers=1)
        text.build_text_encoder(cfg, PROMPTS)
    assert "\n" not in str(info.value)


def test_convert_openai_checkpoint(tmp_path):
    src = tmp_path / "scripted.pt"
    module = torch.nn.Linear(3, 2).half()
    with warnings.catch_warnings():  # TorchScript is deprecated; OpenAI's archive still is one
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(module), str(src))
    dst = text.convert_openai_checkpoint(src, tmp_path / "plain.pt")
    state = torch.load(dst, weights_only=True)
    assert set(state) == {"weight", "bias"} and state["weight"].dtype == torch.float32
    torch.testing.assert_close(state["weight"], module.weight.float())
    with pytest.raises(ValueError, match="not a TorchScript archive"):
        text.convert_openai_checkpoint(dst, tmp_path / "again.pt")


def test_build_text_encoder_random_tower():
    encoder = text.build_text_encoder(TextConfig(layers=1, adapt_layers=1), PROMPTS)
    assert len(encoder.tower.blocks) == 1
    assert encoder.num_classes == 3 and encoder.out_dim == 512
    assert encoder().shape == (3, 512)


def test_kept_text_tower_gives_what_a_fresh_build_gives():
    # The start-up optimisation B4 measured (dsanet.text keeps its last tower): with the same
    # RNG state a reused build must equal a fresh one, weights and the RNG state after included.
    from dsanet.datasets import load_spec

    cfg, prompts = TextConfig(layers=1, adapt_layers=1, weights=""), load_spec("xd").prompts
    built = []
    for fresh in (True, False, True):
        if fresh:
            text._last_tower.clear()
        torch.manual_seed(0)
        encoder = text.build_text_encoder(cfg, prompts)
        built.append((encoder, torch.rand(3)))
    (reference, after), *others = built
    for encoder, rng in others:
        assert encoder.tower is not reference.tower  # each model owns its tower
        assert encoder.state_dict().keys() == reference.state_dict().keys()
        for key, value in reference.state_dict().items():
            assert torch.equal(encoder.state_dict()[key], value), key
        assert torch.equal(rng, after)
