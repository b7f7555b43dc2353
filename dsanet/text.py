"""CLIP text side of DSANet: finds and loads the frozen text tower and builds the class encoder.

`resolve_text_weights` is the one place text weights are found and `build_text_encoder` the one
place they are loaded; the encoders themselves live in `dsanet.text_encoders`.
"""

from __future__ import annotations

import copy
import difflib
import functools
import hashlib
import logging
import os
import pickle
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dsanet.config import TextConfig
from dsanet.text_encoders import ClassTextEncoder, FrozenTextTower, text_encoder_from_tower

log = logging.getLogger(__name__)

# Where text.weights="openai" looks (default ~/.cache/dsanet).
WEIGHTS_DIR_ENV = "DSANET_WEIGHTS_DIR"
# Stands in for the visual tower when it is random anyway (it is discarded, DESIGN §2.4).
_TINY_VISION = {"image_size": 16, "layers": 1, "width": 64, "patch_size": 16, "head_width": 64}


def weights_dir() -> Path:
    return Path(os.environ.get(WEIGHTS_DIR_ENV, "~/.cache/dsanet")).expanduser()


def openai_weight_files(arch: str) -> list[Path]:
    """Where text.weights="openai" looks, in order: converted files first, then OpenAI's archive."""
    base = arch.removesuffix("-quickgelu")  # OpenAI names its file ViT-B-16.pt
    folder = weights_dir()
    return [
        folder / f"{base}-openai.safetensors",
        folder / f"{base}-openai.pt",
        folder / f"{base}.pt",
        Path("~/.cache/clip").expanduser() / f"{base}.pt",  # where OpenAI's `clip` package saves it
    ]


def resolve_text_weights(cfg: TextConfig) -> str | None:
    """text.weights -> a local file path, or None for random weights (logged loudly).

    "openai" is looked up in `openai_weight_files(text.arch)`; nothing is downloaded.
    """
    if not cfg.weights:
        log.warning(
            "text.weights is empty: the CLIP text tower (%s) gets RANDOM weights. Fine for tests "
            "and CPU demos; for real runs set text.weights=openai or a checkpoint path.",
            cfg.arch,
        )
        return None
    if cfg.weights == "openai":
        candidates = openai_weight_files(cfg.arch)
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise FileNotFoundError(_missing_openai_message(cfg.arch, candidates))
        return str(found)
    path = Path(cfg.weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"text.weights={cfg.weights!r}: no such file. Give the path of a CLIP checkpoint of "
            f"text.arch={cfg.arch!r}, 'openai' (looked up under ${WEIGHTS_DIR_ENV}), or '' for "
            f"random weights."
        )
    return str(path)


def _missing_openai_message(arch: str, candidates: list[Path]) -> str:
    import open_clip

    source = open_clip.get_pretrained_cfg(arch, "openai") or {}
    base = arch.removesuffix("-quickgelu")
    return (
        f"text.weights='openai': none of {[str(p) for p in candidates]} exists, and nothing is "
        f"downloaded at run time. On a machine with internet access fetch OpenAI's {base}.pt "
        f"({source.get('url', 'see open_clip pretrained list')}), then convert it once to a "
        f"plain state dict (it is a TorchScript archive, which torch>=2.6 will not read with "
        f'weights_only=True):\n  python -c "from dsanet.text import convert_openai_checkpoint; '
        f"convert_openai_checkpoint('{base}.pt', '{candidates[0]}')\"\n"
        f"or point text.weights at any local copy of that file."
    )


def _is_torchscript(path: str | Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def convert_openai_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Convert OpenAI's TorchScript CLIP archive (e.g. ViT-B-16.pt) to a plain fp32 state dict.

    `dst` ending in .safetensors is written with safetensors, anything else with torch.save.
    """
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if not _is_torchscript(src):
        raise ValueError(
            f"{src} is not a TorchScript archive; it can be used as text.weights as is"
        )
    with warnings.catch_warnings():  # TorchScript is deprecated in torch, but OpenAI ships it
        warnings.simplefilter("ignore", FutureWarning)
        state = torch.jit.load(str(src), map_location="cpu").state_dict()
    state = {
        k: v.float().contiguous()
        for k, v in state.items()
        if k not in ("input_resolution", "context_length", "vocab_size")
    }
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(dst))
    else:
        torch.save(state, dst)
    log.info("converted %s -> %s (%d tensors)", src, dst, len(state))
    return dst


def _model_config(arch: str) -> dict[str, Any]:
    import open_clip

    names = open_clip.list_models()
    if arch not in names:
        close = difflib.get_close_matches(arch, names, n=5)
        raise ValueError(
            f"text.arch={arch!r} is not an open_clip architecture; DSANet uses "
            f"'ViT-B-16-quickgelu'. Close names: {close or names[:10]}"
        )
    return open_clip.get_model_config(arch)


_WEIGHTS_FIX = (
    "give a full CLIP checkpoint of that architecture (OpenAI's archive, or one converted with "
    "dsanet.text.convert_openai_checkpoint)"
)


def load_text_tower(cfg: TextConfig, weights: str | None) -> FrozenTextTower:
    """Build text.arch with open_clip (fp32), load `weights`, keep only the first text.layers."""
    import open_clip

    model_cfg = _model_config(cfg.arch)
    if cfg.weights == "openai" and not model_cfg.get("quick_gelu", False):
        log.warning(
            "text.arch=%s uses GELU but OpenAI weights were trained with QuickGELU: outputs "
            "will differ; use text.arch=%s-quickgelu",
            cfg.arch,
            cfg.arch,
        )
    if weights is None:
        kwargs: dict[str, Any] = {"text_cfg": {**model_cfg["text_cfg"], "layers": cfg.layers}}
        if "timm_model_name" not in model_cfg["vision_cfg"]:
            kwargs["vision_cfg"] = _TINY_VISION
        model = open_clip.create_model(cfg.arch, pretrained=None, precision="fp32", **kwargs)
    else:
        script = _is_torchscript(weights)
        if script:
            log.info(
                "%s is TorchScript; reading it with torch.jit (convert it once to skip this)",
                weights,
            )
        try:
            model = open_clip.create_model(
                cfg.arch, pretrained=weights, precision="fp32", weights_only=not script
            )
        except pickle.UnpicklingError as exc:  # torch's text suggests weights_only=False: no
            raise ValueError(
                f"text.weights={weights!r} is not a readable checkpoint (truncated, or not "
                f"written by torch.save or safetensors); {_WEIGHTS_FIX}"
            ) from exc
        except (RuntimeError, ValueError, KeyError, OSError) as exc:
            reason = " ".join(str(exc).split())[:400].rstrip(".")  # one line, bounded
            raise ValueError(
                f"text.weights={weights!r} could not be loaded into text.arch={cfg.arch!r}: "
                f"{reason}; {_WEIGHTS_FIX}"
            ) from exc
    return FrozenTextTower.from_open_clip(model, layers=cfg.layers)


def build_text_encoder(cfg: TextConfig, class_prompts: Sequence[Sequence[str]]) -> ClassTextEncoder:
    """Resolve text.weights, load the frozen tower and wrap it in the text.mode encoder.

    The result is injected into `DSANet`; prompts are tokenised once here.
    """
    tower = _reusable_tower(cfg, resolve_text_weights(cfg))
    return text_encoder_from_tower(cfg, tower, _tokenizer(cfg.arch), class_prompts)


# The last tower this process built, by what decides its weights: (arch, layers, weights file and
# its size and time, torch RNG state before the build) -> (tower, RNG state after). A search
# worker's next trial with the same seed gets a copy instead of a rebuild (bench/RESULTS.md, B4):
# the random init draws from torch's RNG, so a hit also restores the state a build would leave.
_last_tower: dict[tuple, tuple[FrozenTextTower, torch.Tensor]] = {}


def _reusable_tower(cfg: TextConfig, weights: str | None) -> FrozenTextTower:
    stamp = None
    if weights is not None:
        stat = os.stat(weights)
        stamp = (weights, stat.st_size, stat.st_mtime_ns)
    state = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()
    key = (cfg.arch, cfg.layers, cfg.weights, stamp, state)
    if key in _last_tower:
        tower, after = _last_tower[key]
        torch.set_rng_state(after)
        return copy.deepcopy(tower)  # each model owns its tower (devices, hooks)
    tower = load_text_tower(cfg, weights)
    _last_tower.clear()
    _last_tower[key] = (copy.deepcopy(tower), torch.get_rng_state())
    return tower


@functools.lru_cache(maxsize=4)
def _tokenizer(arch: str) -> Any:
    """open_clip's tokenizer, built once per process (it parses the BPE vocabulary)."""
    import open_clip

    return open_clip.get_tokenizer(arch)
