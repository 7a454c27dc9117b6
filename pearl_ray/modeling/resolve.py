"""Model resolution, shared by every backend: a name (preset, local dir or hub id) becomes a path; a pair
is checked (same tokenizer) and described (eos ids, vocabulary, context) before any weights load.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelNotFoundError, TokenizerMismatchError
from .families import attention_layout

VOCAB_MAP_FILE = "pearl_vocab.json"
"""Beside a reduced-vocabulary draft's weights: which target id each of its outputs stands for."""


def resolve_path(name: str) -> str:
    """A preset name (``default-draft`` / ``default-target``), a local model dir or a hub id -> a path or
    hub id that transformers can load. Raises ``ModelNotFoundError`` with the reason."""
    from .default_pair import resolve_preset

    if not isinstance(name, str) or not name.strip():
        raise ModelNotFoundError(f"model name must be a non-empty string, got {name!r}")
    preset = resolve_preset(name)
    if preset is not None:
        return preset
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"model path {str(path)!r} has no config.json (not a transformers model dir)")
        return str(path)
    # "models/nope" reads like a hub id "org/name", but a folder "models" here says it is a path
    looks_local = (name.startswith((".", "/", "~")) or name.count("/") > 1
                   or Path(name.split("/", 1)[0]).expanduser().is_dir())
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not looks_local:
        from .presets import locate_model

        # a hub id "org/name": its local copy ($PEARL_RAY_MODEL_DIR, the HF cache) if there is one, else the id
        # itself (transformers then downloads it where the hub is reachable)
        found = locate_model(name)
        if found:
            return found
        if offline:
            from .presets import _where_looked

            raise ModelNotFoundError(f"model {name!r}: no folder {str(path.resolve())!r}, and no local copy of the "
                                     f"hub id (looked in {_where_looked(name)}); HF_HUB_OFFLINE=1 forbids a download")
        return name
    raise ModelNotFoundError(f"model path {str(path.resolve())!r} does not exist (no such folder)")


def load_tokenizer(path: str, name: str | None = None):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"could not load the tokenizer of {name or path!r}: {exc}") from exc


def eos_token_ids(path: str, tokenizer) -> tuple[int, ...]:
    """The model's EOS ids: its generation config's, else the tokenizer's."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:
        eos = None
    if eos is None:
        eos = tokenizer.eos_token_id
    return tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())


def vocab_map(path: str) -> dict | None:
    """A reduced-vocabulary draft's map (``draft_to_target``, ``target_vocab_size``), or None."""
    file = Path(path) / VOCAB_MAP_FILE
    return json.loads(file.read_text()) if file.exists() else None


def check_same_tokenizer(draft_tok, target_tok, draft_name: str = "draft", target_name: str = "target") -> None:
    """Refuse a pair whose tokenizers map text to different ids."""
    dv, tv = draft_tok.get_vocab(), target_tok.get_vocab()
    if dv != tv:
        only_d = len(set(dv.items()) - set(tv.items()))
        raise TokenizerMismatchError(
            f"draft {draft_name!r} and target {target_name!r} use different tokenizers "
            f"({len(dv)} vs {len(tv)} entries, {only_d} draft entries differ): draft token ids would mean "
            f"other tokens to the target. Use a draft trained with the target's tokenizer.")


@dataclass(frozen=True)
class PairInfo:
    """What the engine needs to know of a pair before the weights load (they may load in other processes)."""

    target_path: str
    draft_path: str | None
    tokenizer: object
    eos_token_ids: tuple[int, ...]
    vocab_size: int
    max_context: int


def inspect_pair(target: str, draft: str | None) -> PairInfo:
    """Resolve both names, check the tokenizers match and that a reduced-vocabulary draft fits this target."""
    from transformers import AutoConfig

    tpath = resolve_path(target)
    tok = load_tokenizer(tpath, target)
    try:
        tcfg = AutoConfig.from_pretrained(tpath)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"could not read the config of {target!r}: {exc}") from exc
    attention_layout(tcfg)  # a family the engine cannot run is refused before any weights load
    vocab = max(len(tok), int(tcfg.vocab_size))
    dpath = None
    if draft is not None:
        dpath = resolve_path(draft)
        try:
            dcfg = AutoConfig.from_pretrained(dpath)
        except (OSError, ValueError) as exc:
            raise ModelNotFoundError(f"could not read the config of {draft!r}: {exc}") from exc
        attention_layout(dcfg)
        check_same_tokenizer(load_tokenizer(dpath, draft), tok, draft, target)
        vmap = vocab_map(dpath)
        if vmap is not None and (vmap["target_vocab_size"] != vocab or max(vmap["draft_to_target"]) >= vocab):
            raise TokenizerMismatchError(
                f"draft {draft!r} has a reduced vocabulary made for a target with {vmap['target_vocab_size']} "
                f"tokens; target {target!r} has {vocab}")
    max_context = int(getattr(tcfg, "max_position_embeddings", 0) or 2048)
    return PairInfo(tpath, dpath, tok, eos_token_ids(tpath, tok), vocab, max_context)
