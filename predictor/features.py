"""Prompt features for length prediction: what the request asks for, read from its text alone.

Only the prompt text is known when a request arrives, so every feature here comes from it
(never from dataset labels). Chat markup is stripped first so that a chat-rendered prompt and
the raw instruction give the same features.
"""
from __future__ import annotations

import math
import re

import numpy as np

# Chat templates: ChatML (SmolLM2, Qwen), Llama 3 headers, Mistral [INST]; any `<|...|>` token.
_CHATML_USER = re.compile(r"<\|im_start\|>user\s*\n(.*?)(?:<\|im_end\|>|$)", re.S)
_LLAMA3_USER = re.compile(r"<\|start_header_id\|>user<\|end_header_id\|>\s*(.*?)(?:<\|eot_id\|>|$)", re.S)
_INST_USER = re.compile(r"\[INST\](.*?)(?:\[/INST\]|$)", re.S)
_SPECIAL = re.compile(r"<\|[^|<>\s]{1,40}\|>|</?s>")


def prompt_body(text: str) -> str:
    """The user's request inside a chat-rendered prompt (the last user turn), else the text itself."""
    for pattern in (_CHATML_USER, _LLAMA3_USER, _INST_USER):
        turns = pattern.findall(text)
        if turns:
            return _SPECIAL.sub("", turns[-1]).strip()
    return _SPECIAL.sub("", text).strip()


_WORD = re.compile(r"[A-Za-z]+")
_TOKEN = re.compile(r"[a-z0-9]+")
_NUMBER_WORDS = {
    "a": 1, "an": 1, "one": 1, "single": 1, "two": 2, "couple": 2, "three": 3, "few": 3, "four": 4,
    "several": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10, "twelve": 12,
    "fifteen": 15, "twenty": 20, "fifty": 50, "hundred": 100,
}
# A requested size: a number, at most two words, then a unit ("in 3 sentences", "a 500-word essay",
# "list five ideas"). The feature is log(1 + the largest number asked for), per unit.
_REQUEST_UNITS: dict[str, frozenset[str]] = {
    "words": frozenset({"word", "words"}),
    "sentences": frozenset({"sentence", "sentences"}),
    "paragraphs": frozenset({"paragraph", "paragraphs"}),
    "lines": frozenset({"line", "lines", "verse", "verses", "stanza", "stanzas"}),
    "items": frozenset(
        "point points bullet bullets item items idea ideas example examples tip tips way ways reason reasons "
        "step steps thing things name names question questions option options suggestion suggestions fact "
        "facts benefit benefits type types kind kinds place places book books movie movies song songs "
        "country countries city cities animal animals food foods activity activities".split()
    ),
}

# Instruction cues: phrases (lower-case words) looked up in the prompt's words; a phrase starting
# with "^" must open the prompt. The feature is whether any phrase of the cue occurs.
_CUES: dict[str, tuple[str, ...]] = {
    "list": ("list", "enumerate", "bullet", "name some", "name all", "name a few", "me a list", "give me some"),
    "explain": ("explain", "describe", "elaborate", "discuss", "tell me about", "walk me through", "what are the benefits",
                "what are the advantages"),
    "why": ("^why", "why is", "why are", "why do", "why does", "why did", "why should"),
    "how_to": ("how to", "how do i", "how can i", "how should i", "how do you", "how can you", "how can we",
               "step by step", "guide", "tutorial"),
    "essay": ("essay", "story", "article", "blog", "poem", "letter", "email", "e mail", "speech", "report",
              "cover letter", "song", "lyrics", "novel", "chapter"),
    "write": ("^write", "^compose", "^draft", "^create", "^generate", "^design", "^develop", "^produce"),
    "summarize": ("summarize", "summarise", "summary", "tl dr", "in short", "key points", "main points"),
    "classify": ("classify", "categorize", "categorise", "which of these", "which of the following", "which one",
                 "identify which", "label", "is this a", "is it a"),
    "extract": ("extract", "from the passage", "from the text", "from the paragraph", "from the article",
                "from the reference", "based on the passage", "based on the text", "based on this text",
                "based on the reference", "based on this paragraph", "given this paragraph", "given the text"),
    "short": ("one word", "single word", "one sentence", "a sentence", "briefly", "brief", "short", "concise",
              "few words", "one line", "just the", "only the", "succinct"),
    "yes_no": ("yes or no", "true or false", "yes no", "true false"),
    "choice": ("multiple choice", "choose the", "choose one", "choose from", "select the", "select one", "options",
               "answer choices"),
    "detail": ("detailed", "in detail", "comprehensive", "thorough", "in depth", "extensive", "long"),
    "code": ("code", "function", "program", "script", "python", "java", "javascript", "sql", "implement",
             "algorithm", "class", "method", "regex", "api"),
    "fix": ("fix", "debug", "error", "bug", "exception", "traceback", "doesn t work", "does not work", "not working",
            "wrong"),
    "translate": ("translate", "translation", "in french", "in spanish", "in german", "in chinese", "in japanese",
                  "in italian", "into english"),
    "rewrite": ("rewrite", "rephrase", "paraphrase", "edit", "correct the", "proofread", "improve this", "improve the"),
    "compare": ("compare", "comparison", "difference between", "differences between", "versus", "vs",
                "pros and cons", "advantages and disadvantages"),
    "opinion": ("what do you think", "your opinion", "do you think", "do you believe", "do you like", "would you",
                "should i"),
    "math": ("calculate", "compute", "solve", "how many", "how much", "sum of", "equation", "probability", "formula"),
    "factoid": ("^who is", "^who was", "^when did", "^when was", "^when is", "^where is", "^where was", "^which is",
                "^what is", "^what was", "^what are", "^who are", "^who were"),
    "define": ("define", "definition of", "meaning of"),
    "example": ("for example", "e g", "example", "examples", "such as", "sample input", "sample output"),
    "plan": ("plan", "itinerary", "schedule", "outline", "strategy", "roadmap", "curriculum", "recipe"),
    "brainstorm": ("ideas", "brainstorm", "suggest", "suggestions", "recommend", "recommendations"),
    "roleplay": ("act as", "pretend", "you are a", "you are an", "i want you to", "imagine you"),
    "test_cases": ("assert", "should pass these tests", "test case", "test cases"),
    "self_contained": ("self contained code", "starting with"),
    "io_spec": ("input format", "output format", "constraints", "sample input", "input output"),
    "problem_header": ("^problem", "^question"),
    "only_code": ("only the code", "only code", "just the code", "just code", "no explanation", "without explanation",
                  "only output", "only return", "return only", "output only"),
    "json_format": ("json", "csv", "table", "markdown", "yaml", "xml", "format"),
}
_CUE_PHRASES = {name: tuple((p.startswith("^"), tuple(p.lstrip("^").split())) for p in phrases)
                for name, phrases in _CUES.items()}
_CONTEXT_FIELD = re.compile(r"\n\s*(?:context|input|reference|passage|text):", re.I)

_QUESTION_START = re.compile(r"^\s*(what|who|whom|whose|when|where|which|why|how)\b", re.I)
_YES_NO_START = re.compile(
    r"^\s*(is|are|was|were|do|does|did|can|could|should|would|will|has|have|had|may|might|must|shall)\b", re.I
)
_CODE_LINE = re.compile(
    r"^(?:\s{2,}|\t)\S|^\s*(?:def |class |import |from \w+ import|return\b|for .* in |if .*:|#include|public |"
    r"print\(|assert |[\w\.\[\]]+\s*=\s*\S|[{}]\s*$|>>>)"
)
_FENCE = re.compile(r"```")
_LATEX = re.compile(r"\$[^$\n]{1,80}\$")

FEATURE_NAMES: tuple[str, ...] = (
    "log_chars", "log_words", "log_lines", "log_first_line_chars", "log_instruction_chars", "context_share",
    "frac_alpha", "frac_digit", "frac_symbol", "frac_upper", "frac_code_lines", "log_code_lines",
    "num_fences", "num_latex", "num_question_marks", "ends_with_question", "question_start", "yes_no_start",
    "num_asserts", "num_bullets", "num_sentences_log",
    *(f"requested_{u}_log" for u in _REQUEST_UNITS),
    *(f"cue_{c}" for c in _CUES),
    "cue_context_field", "cue_io_header",
)


def _requested(words: list[str]) -> list[float]:
    best = dict.fromkeys(_REQUEST_UNITS, 0.0)
    for i, w in enumerate(words):
        value = float(w) if w.isdigit() and len(w) <= 4 else _NUMBER_WORDS.get(w)
        if not value:
            continue
        for nxt in words[i + 1 : i + 4]:
            for unit, names in _REQUEST_UNITS.items():
                if nxt in names:
                    best[unit] = max(best[unit], value)
    return [math.log1p(v) for v in best.values()]


def _cues(words: list[str]) -> list[float]:
    positions: dict[str, list[int]] = {}
    for i, w in enumerate(words):
        positions.setdefault(w, []).append(i)
    out = []
    for phrases in _CUE_PHRASES.values():
        hit = False
        for at_start, phrase in phrases:
            for i in positions.get(phrase[0], ()):
                if (not at_start or i == 0) and tuple(words[i : i + len(phrase)]) == phrase:
                    hit = True
                    break
                if at_start:
                    break
            if hit:
                break
        out.append(float(hit))
    return out


def _split_instruction(body: str) -> tuple[str, str]:
    """The instruction and the material it refers to (a context field, a code block, an example)."""
    m = re.search(r"\n\s*(?:context|input|reference|passage|text):|```|\n\n", body, re.I)
    if m is None or m.start() == 0:
        return body, ""
    return body[: m.start()], body[m.start():]


# Byte classes for the character-mix features: 1 letter, 2 digit, 3 whitespace, 4 upper-case letter.
_BYTE_CLASS = np.zeros(256, dtype=np.int64)
_BYTE_CLASS[[ord(c) for c in "abcdefghijklmnopqrstuvwxyz"]] = 1
_BYTE_CLASS[[ord(c) for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"]] = 4
_BYTE_CLASS[128:] = 1  # UTF-8 bytes of non-ASCII text: counted as letters
_BYTE_CLASS[[ord(c) for c in "0123456789"]] = 2
_BYTE_CLASS[[ord(c) for c in " \t\n\r\f\v"]] = 3
# Cues are looked for in the head and tail of long prompts: instructions sit there, and long pasted
# material (code, documents) in between would only cost time.
_CUE_HEAD_CHARS = 1200
_CUE_TAIL_CHARS = 600


def _cue_text(body: str) -> str:
    if len(body) <= _CUE_HEAD_CHARS + _CUE_TAIL_CHARS:
        return body
    return body[:_CUE_HEAD_CHARS] + "\n" + body[-_CUE_TAIL_CHARS:]


def prompt_features(text: str) -> list[float]:
    """The dense feature vector of one prompt, in FEATURE_NAMES order."""
    body = prompt_body(text)
    cue_text = _cue_text(body)
    lower = cue_text.lower()
    num_chars = len(body)
    lines = body.splitlines() or [""]
    nonempty = [ln for ln in lines if ln.strip()]
    num_words = len(_WORD.findall(body))
    instruction, material = _split_instruction(body)
    raw = np.frombuffer(body.encode("utf-8", "replace"), dtype=np.uint8)
    counts = np.bincount(_BYTE_CLASS[raw], minlength=5)
    denom = max(len(raw), 1)
    num_upper = int(counts[4])
    num_alpha, num_digit, num_space = int(counts[1]) + num_upper, int(counts[2]), int(counts[3])
    code_lines = sum(1 for ln in nonempty if _CODE_LINE.search(ln))
    stripped = body.rstrip()
    feats = [
        math.log1p(num_chars),
        math.log1p(num_words),
        math.log1p(len(nonempty)),
        math.log1p(len(nonempty[0]) if nonempty else 0),
        math.log1p(len(instruction)),
        len(material) / denom,
        num_alpha / denom,
        num_digit / denom,
        (denom - num_alpha - num_digit - num_space) / denom,
        num_upper / max(num_alpha, 1),
        code_lines / max(len(nonempty), 1),
        math.log1p(code_lines),
        float(len(_FENCE.findall(body))),
        float(len(_LATEX.findall(body))),
        float(body.count("?")),
        float(stripped.endswith("?")),
        float(bool(_QUESTION_START.search(body))),
        float(bool(_YES_NO_START.search(body))),
        float(body.count("assert ")),
        float(sum(1 for ln in nonempty if re.match(r"\s*(?:[-*•]|\d+[.)])\s", ln))),
        math.log1p(len(re.findall(r"[.!?](?:\s|$)", body))),
    ]
    words = _TOKEN.findall(lower)
    feats.extend(_requested(words))
    feats.extend(_cues(words))
    feats.append(float(bool(_CONTEXT_FIELD.search(cue_text))))
    feats.append(float("-----input-----" in lower or "-----output-----" in lower))
    return feats


def feature_matrix(texts: list[str]) -> np.ndarray:
    """Dense features of many prompts: float32 [num_prompts, len(FEATURE_NAMES)]."""
    return np.asarray([prompt_features(t) for t in texts], dtype=np.float32).reshape(len(texts), len(FEATURE_NAMES))
