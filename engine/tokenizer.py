"""Tokenizer and chat template, built with the `tokenizers` library and jinja2.

From a GGUF the vocabulary, merges, special tokens and pre-tokenizer (named by
`tokenizer.ggml.pre`, as llama.cpp maps it) are assembled into a `tokenizers.Tokenizer`; from
an HF checkpoint its tokenizer.json is loaded as is. The chat template is the model's own,
rendered in a sandboxed jinja2 environment the way transformers renders it.
"""
from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any, Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors

# llama.cpp's pre-tokenizer names → pre-tokenizers. The regexes are llama.cpp's / the models' own.
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level(use_regex: bool) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=use_regex)


def _gguf_pre_tokenizer(name: str) -> pre_tokenizers.PreTokenizer:
    if name in ("default", "gpt2", "gpt-2"):
        return _byte_level(True)
    if name in ("smollm", "starcoder", "refact", "codeshell", "command-r"):
        # Every digit on its own, then GPT-2's split (SmolLM2's tokenizer.json does the same).
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _byte_level(True)])
    if name in ("llama-bpe", "llama3", "smaug-bpe"):
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(_LLAMA3_PATTERN), behavior="isolated"), _byte_level(False)]
        )
    if name == "qwen2":
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(_QWEN2_PATTERN), behavior="isolated"), _byte_level(False)]
        )
    raise ValueError(
        f"GGUF pre-tokenizer {name!r} is not supported; supported: default, gpt2, smollm, starcoder, llama-bpe, qwen2 "
        "(or point --model at an HF checkpoint with tokenizer.json)"
    )


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class Tokenizer:
    def __init__(
        self,
        tokenizer: HFTokenizer,
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        chat_template: str | None,
        extra_eos_token_ids: Sequence[int] = (),
    ) -> None:
        self.hf = tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.extra_eos_token_ids = frozenset(t for t in extra_eos_token_ids if t != eos_token_id)
        self.bos_token = tokenizer.id_to_token(bos_token_id) if bos_token_id is not None else None
        self.eos_token = tokenizer.id_to_token(eos_token_id) if eos_token_id is not None else None
        self.chat_template = chat_template
        self._template = _compile_template(chat_template) if chat_template else None
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_gguf_fields(cls, fields: dict[str, Any]) -> "Tokenizer":
        model = fields.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(
                f"GGUF tokenizer model {model!r} is not supported (only byte-level BPE, 'gpt2'); "
                "point --model at an HF checkpoint instead"
            )
        tokens: list[str] = fields["tokenizer.ggml.tokens"]
        types: list[int] = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
        vocab = {tok: i for i, tok in enumerate(tokens)}
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        tok.pre_tokenizer = _gguf_pre_tokenizer(fields.get("tokenizer.ggml.pre", "default"))
        tok.decoder = decoders.ByteLevel()
        # GGUF token types: 3 = control (special), 4 = user defined.
        added = [AddedToken(tokens[i], special=(t == 3), normalized=False) for i, t in enumerate(types) if t in (3, 4)]
        tok.add_tokens(added)
        bos = fields.get("tokenizer.ggml.bos_token_id")
        if fields.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
            bos_tok = tokens[bos]
            tok.post_processor = processors.TemplateProcessing(
                single=f"{bos_tok} $A", pair=f"{bos_tok} $A {bos_tok} $B", special_tokens=[(bos_tok, bos)]
            )
        return cls(
            tok,
            bos_token_id=bos,
            eos_token_id=fields.get("tokenizer.ggml.eos_token_id"),
            chat_template=fields.get("tokenizer.chat_template"),
            extra_eos_token_ids=[t for t in [fields.get("tokenizer.ggml.eot_token_id")] if t is not None],
        )

    @classmethod
    def from_hf_dir(cls, path: str) -> "Tokenizer":
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.exists(tok_file):
            raise FileNotFoundError(f"{path}: no tokenizer.json (only fast tokenizers are supported)")
        tok = HFTokenizer.from_file(tok_file)
        cfg: dict[str, Any] = {}
        if os.path.exists(os.path.join(path, "tokenizer_config.json")):
            with open(os.path.join(path, "tokenizer_config.json")) as f:
                cfg = json.load(f)
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        jinja_file = os.path.join(path, "chat_template.jinja")
        if template is None and os.path.exists(jinja_file):
            with open(jinja_file) as f:
                template = f.read()

        def token_id(value: Any) -> int | None:
            if isinstance(value, dict):
                value = value.get("content")
            return tok.token_to_id(value) if isinstance(value, str) else None

        model_cfg: dict[str, Any] = {}
        for name in ("generation_config.json", "config.json"):
            p = os.path.join(path, name)
            if os.path.exists(p):
                with open(p) as f:
                    for k, v in json.load(f).items():
                        model_cfg.setdefault(k, v)
        eos_ids = model_cfg.get("eos_token_id")
        eos_list = eos_ids if isinstance(eos_ids, list) else ([eos_ids] if eos_ids is not None else [])
        eos = token_id(cfg.get("eos_token"))
        if eos is None and eos_list:
            eos = eos_list[0]
        bos = token_id(cfg.get("bos_token"))
        if bos is None:
            bos = model_cfg.get("bos_token_id")
        return cls(tok, bos_token_id=bos, eos_token_id=eos, chat_template=template, extra_eos_token_ids=eos_list)

    # ---- use -------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_offsets(self, text: str, add_special_tokens: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
        """`encode`'s ids and each token's (start, end) characters in `text` (added special tokens: (0, 0))."""
        enc = self.hf.encode(text, add_special_tokens=add_special_tokens)
        return enc.ids, enc.offsets

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def id_to_piece(self, token_id: int) -> str:
        """The text of one token on its own (for logprobs); partial UTF-8 shows as U+FFFD."""
        return self.hf.decode([token_id], skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        if self._template is None:
            raise ValueError("this model has no chat template; use completions instead of chat")
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **kwargs,
        )

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
        # The rendered template carries its own special tokens (a BOS included, where the model wants one).
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs), add_special_tokens=False)
