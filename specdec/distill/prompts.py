"""The prompts a distilled draft is measured on, and the prompt type distillation uses.

A draft is scored on prompts it never trained on: the ``code`` and ``chat`` prompts defined
here (real stdlib function stubs; real Python questions under one long system prompt of
reference pages). Their text ships in ``held_out.json``, a snapshot taken from CPython's
standard library (PSF License Agreement), so every machine holds out the same prompts.
``benchmarks.workloads`` builds its ``code`` and ``chat`` workloads from this module, so
the benchmarks measure the same held-out prompts; its other workloads live there.
``python -m benchmarks.workloads --rebuild`` regenerates this snapshot with its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

DATA_FILE = Path(__file__).resolve().parent / "held_out.json"


@dataclass(frozen=True)
class Prompt:
    """One prompt. Exactly one of ``messages`` (chat-formatted) and ``text`` (raw) is set."""

    name: str  # stable id, e.g. "code/textwrap.dedent"
    messages: list[dict] | None  # chat messages (role/content) when the workload is chat-formatted
    text: str | None  # raw text prompt otherwise
    shared_prefix_chars: int = 0  # chars of a prefix shared with the workload's other prompts

    def __hash__(self):  # messages is a list: hash by identity of content instead
        return hash((self.name, self.text, json.dumps(self.messages, sort_keys=True)))


# stdlib functions for `code`: module file, function (or Class.method) name
CODE_FUNCTIONS = (
    "textwrap.dedent",
    "heapq.merge",
    "statistics.quantiles",
    "statistics.correlation",
    "difflib.get_close_matches",
    "functools.lru_cache",
    "urllib.parse.urlsplit",
    "ipaddress.collapse_addresses",
    "statistics.harmonic_mean",
    "shutil.which",
)

# pydoc topics for the `chat` system prompt's reference material
CHAT_REFERENCE_TOPICS = ("with", "exceptions", "for")

# (question, pydoc topic, first words of the paragraph that answers it). The answer (a real
# sentence of the documentation) is the assistant turn in multi-turn chat sessions.
CHAT_QA = (
    ("What does the `with` statement do?", "with", 'The "with" statement is used to wrap'),
    ("How does a `for` loop decide when to stop?", "for", "When the iterator is exhausted"),
    ("What does `return` do, and what happens if it has no expression?", "return", '"return" leaves the current'),
    ("Which objects count as false in an `if` test?", "truth", "By default, an object is considered true"),
    ("How does `lambda` differ from a function defined with `def`?", "lambda", "Lambda expressions (sometimes"),
    ("What does `del x` do to the name `x`?", "del", "Deletion of a name removes"),
    ("What does the `global` statement do inside a function?", "global", 'The "global" statement is a declaration'),
    ("What does `break` do inside nested loops?", "break", 'It terminates the nearest enclosing loop'),
    ("What does `yield` turn a function into?", "yield", "Yield expressions and statements are only used"),
    ("When should I use `nonlocal`?", "nonlocal", 'The "nonlocal" statement causes'),
    ("What does `pass` do?", "pass", '"pass" is a null operation'),
    ("How does Python handle an exception that no `except` clause catches?", "exceptions",
     "When an exception is not handled at all"),
)

CHAT_SYSTEM_INTRO = (
    "You are PyRef, an assistant that answers questions about the Python programming language. "
    "Answer in plain English, in a few sentences, and quote the reference material below when it "
    "answers the question. If the reference material does not cover the question, say so and answer "
    "from general knowledge of Python 3. Show short code examples in fenced code blocks. Do not invent "
    "functions, modules or options that Python does not have.\n\n"
    "Reference material (from the Python Language Reference):\n\n"
)

CODE_CHAT_INSTRUCTION = "Complete this Python function:"
SUMMARIZE_INSTRUCTION = "Summarize the text above, quoting its key sentences."


# --------------------------------------------------------------------------------------
# The held-out prompts


@lru_cache(maxsize=1)
def texts() -> dict:
    """The snapshot: ``code`` (function stubs by name), ``topics`` (reference pages), ``python``."""
    with open(DATA_FILE, encoding="utf-8") as f:
        return json.load(f)


def chat_system_prompt() -> str:
    """The long system prompt shared by every `chat` prompt and chat session."""
    pages = [texts()["topics"][t].strip() for t in CHAT_REFERENCE_TOPICS]
    return CHAT_SYSTEM_INTRO + "\n\n".join(pages)


def code_functions() -> list[str]:
    """The names of :data:`CODE_FUNCTIONS` that the snapshot holds, in order."""
    return [q for q in CODE_FUNCTIONS if q in texts()["code"]]


def code_prompts(n: int | None = None, chat: bool = False) -> list[Prompt]:
    """The first ``n`` (default all) `code` prompts: a stub as raw text, or with ``chat`` as a
    user message asking to complete it."""
    out = []
    for q in code_functions()[:n]:
        code = texts()["code"][q]
        if chat:
            msg = f"{CODE_CHAT_INSTRUCTION}\n\n```python\n{code}\n```"
            out.append(Prompt(f"code/{q}", [{"role": "user", "content": msg}], None))
        else:
            out.append(Prompt(f"code/{q}", None, code))
    return out


def chat_prompts(n: int | None = None, chat: bool = True) -> list[Prompt]:
    """The first ``n`` (default all) `chat` prompts: system prompt + one question, as chat
    messages or (``chat=False``) as plain "Role: content" text."""
    system = chat_system_prompt()
    out = []
    for question, topic, _ in CHAT_QA[:n]:
        name = f"chat/{topic}"
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        if chat:
            out.append(Prompt(name, messages, None, shared_prefix_chars=len(system)))
        else:
            out.append(Prompt(name, None, plain_text(messages), shared_prefix_chars=len(plain_head(system))))
    return out


def rebuild(path: Path = DATA_FILE) -> dict:
    """Regenerate the snapshot from the running interpreter's stdlib (changes the held-out prompts)."""
    import platform

    from pydoc_data.topics import topics

    data = {
        "python": platform.python_version(),
        "license": "PSF License Agreement (CPython source and documentation)",
        "code": {q: function_stub(q) for q in CODE_FUNCTIONS},
        "topics": {t: topics[t] for t in sorted(CHAT_REFERENCE_TOPICS)},
    }
    path.write_text(json.dumps(data, sort_keys=True, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    texts.cache_clear()
    return data


def function_stub(qualname: str) -> str:
    """Module imports + a stdlib function's decorators, signature and docstring (no body)."""
    import ast
    import sysconfig

    parts = qualname.split(".")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for i in range(len(parts) - 1, 0, -1):
        mod = stdlib.joinpath(*parts[:i])
        path = mod.with_suffix(".py") if mod.with_suffix(".py").is_file() else mod / "__init__.py"
        if path.is_file():
            names = parts[i:]
            break
    else:
        raise FileNotFoundError(qualname)
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source)
    lines = source.splitlines()
    node, body = None, tree.body
    for name in names:
        node = next(n for n in body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name)
        body = node.body
    if not (isinstance(node, ast.FunctionDef) and ast.get_docstring(node)):
        raise ValueError(f"{qualname} is not a function with a docstring")
    start = min([node.lineno] + [d.lineno for d in node.decorator_list])
    stub = "\n".join(lines[start - 1:node.body[0].end_lineno])
    imports = [ast.get_source_segment(source, n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    imports = [s for s in imports if s and "\n" not in s][:12]
    head = "\n".join(imports)
    return (head + "\n\n\n" if head else "") + stub + "\n"


# --------------------------------------------------------------------------------------
# Encoding


def plain_head(system: str) -> str:
    """How a system prompt starts the plain text of :func:`plain_text`."""
    return f"System: {system}\n\n"


def plain_text(messages: list[dict]) -> str:
    """Messages as plain text, for tokenizers with no chat template; ends on 'Assistant:'."""
    out = []
    for m in messages:
        role = str(m.get("role", "user"))
        out.append(f"{role.capitalize()}: {m.get('content', '')}\n\n")
    return "".join(out) + "Assistant:"


def _has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _encode_once(messages: list[dict] | None, text: str | None, tokenizer) -> list[int]:
    if messages is not None and _has_template(tokenizer):
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # the template writes its own special tokens (BOS, role markers): add none
        return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    if messages is not None:
        text = plain_text(messages)
    return list(tokenizer(text)["input_ids"])


def _cut_middle(s: str, n: int) -> str:
    """``s`` less ``n`` characters taken from its middle (head and tail survive)."""
    if n <= 0:
        return s
    if n >= len(s) - 8:
        return s[-8:] if len(s) > 8 else s
    keep = len(s) - n
    head = keep // 3
    return s[:head] + "\n...\n" + s[len(s) - (keep - head):]


def encode(prompt: Prompt, tokenizer, max_tokens: int | None = None) -> list[int]:
    """Token ids of ``prompt``.

    Chat prompts go through ``tokenizer.apply_chat_template(add_generation_prompt=True)``
    (or, without a template, plain "Role: content" text ending in "Assistant:"); raw text
    through ``tokenizer(text)``. With ``max_tokens``, a longer prompt loses text from the
    middle of its longest part (the instructions at its head and the question at its tail
    survive, and so does the chat template); the result is at most ``max_tokens`` long.
    """
    messages = [dict(m) for m in prompt.messages] if prompt.messages is not None else None
    text = prompt.text
    ids = _encode_once(messages, text, tokenizer)
    if max_tokens is None or len(ids) <= max_tokens:
        return ids
    if max_tokens < 1:
        raise ValueError("max_tokens must be >= 1")
    for _ in range(8):
        excess = len(ids) - max_tokens
        if excess <= 0:
            return ids
        if messages is not None:
            i = max(range(len(messages)), key=lambda j: len(messages[j].get("content", "")))
            content = messages[i].get("content", "")
            ratio = len(content) / max(1, len(ids))
            messages[i]["content"] = _cut_middle(content, int(excess * max(ratio, 1.0)) + 16)
        else:
            ratio = len(text) / max(1, len(ids))
            text = _cut_middle(text, int(excess * max(ratio, 1.0)) + 16)
        ids = _encode_once(messages, text, tokenizer)
    return ids[-max_tokens:]  # still too long (tiny max_tokens): keep the tail
