"""Benchmark workloads: real text that ships offline, the same prompts on every machine.

Every prompt is built from ``benchmarks/data/texts.json``, a small (<200 KB) snapshot of
real, PSF-licensed text taken from CPython 3.11's standard library:

* source code of a few pure-Python stdlib functions (``ast`` over the stdlib files), and
* pages of the Python reference documentation as shipped in ``pydoc_data.topics``.

The snapshot is shipped (rather than read from the running interpreter) so that a CPU run
on Python 3.11 and a GPU run on Python 3.13 benchmark exactly the same prompts.
``python -m benchmarks.workloads --rebuild`` regenerates it from the running interpreter's
stdlib (do that only on purpose: it changes every prompt, so old results stop being
comparable; :func:`fingerprint` tells prompt sets apart).

Workloads (``WORKLOADS``):

``code``       HumanEval-style completion: a real stdlib function cut after its signature and
               docstring (module imports above it), the model writes the body. Raw text by
               default; ``chat=True`` wraps it as "Complete this Python function:".
``chat``       one long shared system prompt (assistant policy + reference pages, ~1.7k
               tokens) and varied real user questions about Python: the prefix cache's home.
``summarize``  one reference page of 1-3k tokens + "Summarize the text above, quoting its
               key sentences.": the output quotes the input, prompt lookup's home ground.
``long``       8k-16k token prompts (reference pages concatenated, each prompt starting
               at a different page, so they share no prefix) + a question at the end.
``prose``      openings of ordinary explanatory prose (bread, tides, railway time, ...), written
               for this benchmark; the model continues the text. Raw text by default.
``general``    everyday chat requests (a packing list, a translation, a story, arithmetic, an
               email, a recipe, ...), written for this benchmark, chat-formatted: where a
               draft must generalize beyond code and reference text.

``prose`` and ``general`` are kept out of every distillation corpus (``specdec.distill.data``
trains on stdlib / site-packages code and reference pages, never on this module's text), so
they measure how a distilled draft does on text it never saw.

Lengths are tuned for the SmolLM2 tokenizer (the default model); other tokenizers give
similar lengths within ~20%.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

DATA_FILE = Path(__file__).resolve().parent / "data" / "texts.json"

WORKLOADS = ("code", "chat", "summarize", "long", "prose", "general")


@dataclass(frozen=True)
class Prompt:
    """One prompt. Exactly one of ``messages`` (chat-formatted) and ``text`` (raw) is set."""

    name: str  # stable id, e.g. "code/textwrap.dedent"
    messages: list[dict] | None  # chat messages (role/content) when the workload is chat-formatted
    text: str | None  # raw text prompt otherwise
    shared_prefix_chars: int = 0  # chars of a prefix shared with the workload's other prompts

    def __hash__(self):  # messages is a list: hash by identity of content instead
        return hash((self.name, self.text, json.dumps(self.messages, sort_keys=True)))


@dataclass(frozen=True)
class Workload:
    name: str  # one of WORKLOADS
    description: str  # one line, including where the text comes from
    prompts: list[Prompt] = field(hash=False)
    max_new_tokens: int  # a sensible default for the workload
    suits_prompt_lookup: bool  # the output tends to quote the input (summarize, code)

    @property
    def fingerprint(self) -> str:
        """Short hash of the prompts: equal fingerprints mean the same prompts were run."""
        return fingerprint(self.prompts)


# --------------------------------------------------------------------------------------
# What the snapshot holds (used by --rebuild; the loaders read the JSON only)

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

# pydoc topics for `summarize` (each 1-3k tokens)
SUMMARIZE_TOPICS = ("execmodel", "import", "try", "calls", "strings", "function", "comparisons", "naming")

# pydoc topics concatenated into `long` prompts (rotated: prompt i starts at page i)
LONG_TOPICS = ("formatstrings", "string-methods", "debugger", "execmodel", "import", "try",
               "calls", "strings", "typesmapping", "comparisons", "naming")

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

# prose: openings of ordinary explanatory prose (written for this benchmark), continued by the model
PROSE_TEXTS = (
    ("bread", "Why bread rises",
     "Bread rises because of a small, busy organism. Baker's yeast is a single-celled fungus that feeds on the "
     "sugars released when flour meets water. As it eats, it gives off carbon dioxide and a little alcohol. The "
     "gas would simply escape if it were not for gluten, a stretchy network of proteins that forms when the dough "
     "is kneaded. Each bubble of carbon dioxide is caught in that network like air in a balloon, and the dough "
     "swells. In the oven, three things happen at once."),
    ("tides", "The tides",
     "Twice a day, on most coasts, the sea creeps up the beach and then slips back again. The cause lies a quarter "
     "of a million miles away. The Moon's gravity pulls on the whole Earth, but it pulls hardest on the side that "
     "faces it and weakest on the far side. The oceans respond to that difference: water heaps up in a bulge under "
     "the Moon and in a second bulge on the opposite side of the planet. As the Earth turns beneath these two "
     "bulges, a given harbour passes through both of them every day, which is why"),
    ("trains", "A history of railway time",
     "Before the railways, every town in Britain kept its own time. Noon was when the sun stood highest over the "
     "market square, so Bristol ran about ten minutes behind London, and nobody minded, because nobody could travel "
     "between them fast enough to notice. The trains changed that. A passenger who left Paddington at nine and "
     "arrived in Bristol needed to know whose nine o'clock the timetable meant. In the 1840s the Great Western "
     "Railway began to run all its clocks to London time, and other companies soon followed."),
    ("garden", "Starting a vegetable garden",
     "The first vegetable garden most people plant is too big. It looks modest on a bright afternoon in April, when "
     "the soil is dark and the seed packets promise so much, but by July the weeds grow faster than anyone can pull "
     "them and the beans need picking every second day. A better start is a single bed, about the size of a door, "
     "in the sunniest corner you have. Fill it with a few crops that are easy and that you actually like to eat. "
     "Lettuce, radishes and bush beans are good choices, because"),
    ("sleep", "What sleep is for",
     "We spend about a third of our lives asleep, and for most of history nobody could say why. It seemed an odd "
     "bargain for an animal to make: hours each night of lying still, blind and deaf to danger. Research over the "
     "last century has given some answers. During deep sleep the brain replays the events of the day and moves "
     "some of them into long-term memory. Sleep also seems to give the brain a chance to clear away waste products "
     "that build up while we are awake. People who are kept awake for long stretches"),
    ("letters", "The decline of the handwritten letter",
     "My grandmother wrote a letter every Sunday evening. She sat at the kitchen table with a pad of blue paper and "
     "a fountain pen, and she wrote to her sister in Canada, to an old school friend in Leeds, and, once a month, to "
     "me. Her letters were not remarkable. They reported the weather, the health of the neighbours and the price of "
     "things at the market. But they arrived, week after week, for thirty years, and when she died I found that I "
     "had kept every one of them. Reading them again, I understood"),
)

# general: everyday chat requests (written for this benchmark), unlike code or reference text
GENERAL_REQUESTS = (
    ("packing-list", "I'm going camping for a weekend in the mountains in early autumn. Can you give me a packing "
                     "list, grouped into clothing, cooking and safety?"),
    ("translate", "Please translate these sentences into Spanish and French: \"Where is the train station?\", "
                  "\"I would like a table for two, please.\" and \"How much does this cost?\""),
    ("explain-rainbow", "My eight-year-old asked me why rainbows are curved and I didn't know what to say. How would "
                        "you explain it to a child?"),
    ("story", "Write a short bedtime story about a lighthouse keeper who finds a lost penguin on the rocks one "
              "stormy night."),
    ("arithmetic", "I bought 3 notebooks at 4.50 each, 2 pens at 1.25 each and a backpack for 32. I paid with a "
                   "50 note. How much change should I get? Show the steps."),
    ("email", "Write a short, polite email to my landlord saying that the kitchen tap has been dripping for a week "
              "and asking when someone could come and fix it."),
    ("recipe", "I have eggs, spinach, an onion, some cheddar and half a loaf of bread. What can I cook for dinner "
               "for two people? Give me a simple recipe with steps."),
    ("advice", "I have a job interview for a library assistant position on Friday. What questions might they ask, "
               "and how should I prepare?"),
    ("compare", "What are the main differences between a cold and the flu, and when should someone see a doctor?"),
    ("plan", "Make me a simple weekly plan for learning to run 5 kilometres, for someone who has not exercised in "
             "years."),
)

CODE_CHAT_INSTRUCTION = "Complete this Python function:"
PROSE_CHAT_INSTRUCTION = "Continue this text:"
SUMMARIZE_INSTRUCTION = "Summarize the text above, quoting its key sentences."

# questions asked after a `long` prompt, keyed by the page the prompt starts with (the
# answer sits at the far end of the context from the question)
LONG_QUESTIONS = {
    "formatstrings": "According to the documentation above, what does the \"=\" alignment option do in a format specification?",
    "string-methods": "According to the documentation above, how does str.split() behave when sep is not given?",
    "debugger": "According to the documentation above, how do you set a conditional breakpoint in pdb?",
    "execmodel": "According to the documentation above, what is a code block, and which constructs create one?",
    "import": "According to the documentation above, what two steps does the basic import statement perform?",
    "try": "According to the documentation above, when is the finally clause of a try statement executed?",
    "calls": "According to the documentation above, what happens when a call has more positional arguments than formal parameter slots?",
    "strings": "According to the documentation above, what is the difference between bytes literals and string literals?",
    "typesmapping": "According to the documentation above, in what order does a dictionary iterate over its keys?",
    "comparisons": "According to the documentation above, how are chained comparisons like a < b < c evaluated?",
    "naming": "According to the documentation above, what does it mean for a name to be bound, and where are names resolved?",
}

LONG_TOKENS_RANGE = (8_500, 15_500)  # long prompts span this range (SmolLM2 tokens)
LONG_CHARS_PER_TOKEN = 4.0  # measured on the pool with the SmolLM2 tokenizer

_DEFAULT_N = {"code": 8, "chat": 8, "summarize": 4, "long": 4, "prose": 6, "general": 10}
_MAX_NEW = {"code": 128, "chat": 128, "summarize": 128, "long": 64, "prose": 128, "general": 128}
_DEFAULT_CHAT = {"code": False, "chat": True, "summarize": True, "long": True, "prose": False, "general": True}


# --------------------------------------------------------------------------------------
# Loading


@lru_cache(maxsize=1)
def _data() -> dict:
    with open(DATA_FILE, encoding="utf-8") as f:
        return json.load(f)


def _source_note() -> str:
    return f"CPython {_data()['python']}"


def chat_system_prompt() -> str:
    """The long system prompt shared by every `chat` prompt and chat session."""
    d = _data()
    pages = [d["topics"][t].strip() for t in CHAT_REFERENCE_TOPICS]
    return CHAT_SYSTEM_INTRO + "\n\n".join(pages)


def _check_n(name: str, n: int | None, available: int | None) -> int:
    n = _DEFAULT_N[name] if n is None else n
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n_prompts must be a positive int, got {n!r}")
    if available is not None and n > available:
        raise ValueError(f"workload {name!r} has {available} prompts, {n} asked for")
    return n


def _code(n: int | None, chat: bool) -> Workload:
    d = _data()
    names = [q for q in CODE_FUNCTIONS if q in d["code"]]
    n = _check_n("code", n, len(names))
    prompts = []
    for q in names[:n]:
        code = d["code"][q]
        if chat:
            msg = f"{CODE_CHAT_INSTRUCTION}\n\n```python\n{code}\n```"
            prompts.append(Prompt(f"code/{q}", [{"role": "user", "content": msg}], None))
        else:
            prompts.append(Prompt(f"code/{q}", None, code))
    return Workload("code", f"HumanEval-style stubs: real stdlib functions ({_source_note()}) cut after "
                    "signature + docstring; the model writes the body", prompts, _MAX_NEW["code"], True)


def _chat(n: int | None, chat: bool) -> Workload:
    n = _check_n("chat", n, len(CHAT_QA))
    system = chat_system_prompt()
    prompts = []
    for question, topic, _ in CHAT_QA[:n]:
        name = f"chat/{topic}"
        if chat:
            msgs = [{"role": "system", "content": system}, {"role": "user", "content": question}]
            prompts.append(Prompt(name, msgs, None, shared_prefix_chars=len(system)))
        else:
            text = _plain([{"role": "system", "content": system}, {"role": "user", "content": question}])
            prompts.append(Prompt(name, None, text, shared_prefix_chars=len(_plain_head(system))))
    return Workload("chat", f"shared system prompt (assistant policy + Python reference pages from pydoc_data, "
                    f"{_source_note()}) + real Python questions", prompts, _MAX_NEW["chat"], False)


def _summarize(n: int | None, chat: bool) -> Workload:
    n = _check_n("summarize", n, len(SUMMARIZE_TOPICS))
    d = _data()
    prompts = []
    for topic in SUMMARIZE_TOPICS[:n]:
        doc = d["topics"][topic].strip()
        content = f"{doc}\n\n{SUMMARIZE_INSTRUCTION}"
        if chat:
            prompts.append(Prompt(f"summarize/{topic}", [{"role": "user", "content": content}], None))
        else:
            prompts.append(Prompt(f"summarize/{topic}", None, content + "\n\nSummary:\n"))
    return Workload("summarize", f"Python reference pages (pydoc_data.topics, {_source_note()}) + "
                    f'"{SUMMARIZE_INSTRUCTION}"', prompts, _MAX_NEW["summarize"], True)


def _long_bundle(start: int, budget_chars: int) -> str:
    """Reference pages from the `start`-th on (wrapping), cut at a paragraph to the budget."""
    d = _data()
    parts, size = [], 0
    for i in range(len(LONG_TOPICS) * 2):
        page = d["topics"][LONG_TOPICS[(start + i) % len(LONG_TOPICS)]].strip()
        room = budget_chars - size
        if len(page) + 2 <= room:
            parts.append(page)
            size += len(page) + 2
            continue
        cut = page.rfind("\n\n", 0, room)
        if cut > 0:
            parts.append(page[:cut])
        break
    return "\n\n".join(parts)


def _long(n: int | None, chat: bool) -> Workload:
    n = _check_n("long", n, len(LONG_TOPICS))
    lo, hi = LONG_TOKENS_RANGE
    prompts = []
    for i in range(n):
        target = lo if n == 1 else lo + (hi - lo) * i // (n - 1)
        start = LONG_TOPICS[i]
        bundle = _long_bundle(i, int(target * LONG_CHARS_PER_TOKEN))
        content = ("Read the following documentation (from the Python Language Reference and Library "
                   f"Reference).\n\n{bundle}\n\nQuestion: {LONG_QUESTIONS[start]}")
        name = f"long/{target // 1000}k-{start}"
        if chat:
            prompts.append(Prompt(name, [{"role": "user", "content": content}], None))
        else:
            prompts.append(Prompt(name, None, content + "\nAnswer:"))
    return Workload("long", f"8k-16k token prompts: Python reference pages (pydoc_data.topics, {_source_note()}) "
                    "concatenated + a question at the end", prompts, _MAX_NEW["long"], False)


def _prose(n: int | None, chat: bool) -> Workload:
    n = _check_n("prose", n, len(PROSE_TEXTS))
    prompts = []
    for key, title, text in PROSE_TEXTS[:n]:
        body = f"{title}\n\n{text}"
        if chat:
            prompts.append(Prompt(f"prose/{key}", [{"role": "user", "content": f"{PROSE_CHAT_INSTRUCTION}\n\n{body}"}],
                                  None))
        else:
            prompts.append(Prompt(f"prose/{key}", None, body))
    return Workload("prose", "openings of explanatory prose on everyday topics (written for this benchmark); "
                    "the model continues the text", prompts, _MAX_NEW["prose"], False)


def _general(n: int | None, chat: bool) -> Workload:
    n = _check_n("general", n, len(GENERAL_REQUESTS))
    prompts = []
    for key, request in GENERAL_REQUESTS[:n]:
        messages = [{"role": "user", "content": request}]
        prompts.append(Prompt(f"general/{key}", messages, None) if chat else
                       Prompt(f"general/{key}", None, _plain(messages)))
    return Workload("general", "everyday chat requests (lists, translation, explanations, a story, arithmetic, "
                    "an email, a recipe; written for this benchmark)", prompts, _MAX_NEW["general"], False)


_BUILDERS = {"code": _code, "chat": _chat, "summarize": _summarize, "long": _long, "prose": _prose,
             "general": _general}


def get_workload(name: str, n_prompts: int | None = None, *, chat: bool | None = None) -> Workload:
    """The named workload with its first ``n_prompts`` prompts (default: ``_DEFAULT_N``).

    ``chat`` overrides whether prompts are chat messages (default: code raw text, the others
    chat-formatted). Raises ``KeyError`` for an unknown name, ``ValueError`` for a bad count.
    """
    if name not in _BUILDERS:
        raise KeyError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    return _BUILDERS[name](n_prompts, _DEFAULT_CHAT[name] if chat is None else bool(chat))


# --------------------------------------------------------------------------------------
# Multi-turn chat sessions (prefix-cache benchmarks)


def chat_sessions(n_turns: int = 5, n_sessions: int = 2) -> list[list[dict]]:
    """Multi-turn conversations sharing one long system prompt.

    Each conversation is a message list ``[system, user_1, assistant_1, ..., assistant_{n-1},
    user_n]`` (it ends on a user turn). Its k-th prompt (1-based) is ``conversation[:2 * k]``:
    the system prompt + turns 1..k; :func:`session_prompts` cuts them. User turns are real
    Python questions (session s starts at question ``s * n_turns``, wrapping); assistant turns
    are short fixed sentences of the Python reference that answer them. Every session shares
    the same system prompt, so prefixes are shared within and across sessions.
    """
    if n_turns < 1 or n_sessions < 1:
        raise ValueError("n_turns and n_sessions must be >= 1")
    d = _data()
    system = chat_system_prompt()
    sessions = []
    for s in range(n_sessions):
        conv = [{"role": "system", "content": system}]
        for t in range(n_turns):
            question, topic, _ = CHAT_QA[(s * n_turns + t) % len(CHAT_QA)]
            conv.append({"role": "user", "content": question})
            if t < n_turns - 1:
                conv.append({"role": "assistant", "content": d["answers"][topic]})
        sessions.append(conv)
    return sessions


def session_prompts(conversation: list[dict], session: int | str = 0) -> list[Prompt]:
    """The prompts of one conversation from :func:`chat_sessions`: k-th = system + turns 1..k."""
    n_users = sum(m["role"] == "user" for m in conversation)
    system_len = len(conversation[0]["content"]) if conversation and conversation[0]["role"] == "system" else 0
    return [Prompt(f"session/{session}/turn{k}", [dict(m) for m in conversation[:2 * k]], None,
                   shared_prefix_chars=system_len) for k in range(1, n_users + 1)]


# --------------------------------------------------------------------------------------
# Encoding


def _plain_head(system: str) -> str:
    return f"System: {system}\n\n"


def _plain(messages: list[dict]) -> str:
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
        text = _plain(messages)
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


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def shared_prefix_tokens(prompts: list[Prompt], tokenizer) -> int:
    """Tokens every prompt starts with (e.g. the chat template + system prompt)."""
    encoded = [encode(p, tokenizer) for p in prompts]
    if not encoded:
        return 0
    return min((common_prefix_len(encoded[0], e) for e in encoded[1:]), default=len(encoded[0]))


def fingerprint(prompts: list[Prompt]) -> str:
    """12 hex digits of a hash over the prompts' names and contents (order matters)."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(json.dumps([p.name, p.messages, p.text], sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()[:12]


# --------------------------------------------------------------------------------------
# Rebuilding the snapshot from the running interpreter's stdlib


def _function_stub(qualname: str) -> str:
    """Module imports + the function's decorators, signature and docstring (no body)."""
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


def _paragraph(page: str, starts: str) -> str:
    i = page.index(starts)
    j = page.find("\n\n", i)
    para = " ".join(page[i:j if j > 0 else None].split())
    return para[:para.rfind(".") + 1] or para  # whole sentences only


def rebuild_data(path: Path = DATA_FILE) -> dict:
    import platform

    from pydoc_data.topics import topics

    wanted = sorted(set(CHAT_REFERENCE_TOPICS) | set(SUMMARIZE_TOPICS) | set(LONG_TOPICS))
    data = {
        "python": platform.python_version(),
        "license": "PSF License Agreement (CPython source and documentation)",
        "code": {q: _function_stub(q) for q in CODE_FUNCTIONS},
        "topics": {t: topics[t] for t in wanted},
        "answers": {topic: _paragraph(topics[topic], starts) for _, topic, starts in CHAT_QA},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, sort_keys=True, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    _data.cache_clear()
    return data


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rebuild", action="store_true", help="regenerate data/texts.json from this stdlib")
    args = ap.parse_args()
    if args.rebuild:
        rebuild_data()
        print(f"wrote {DATA_FILE} ({DATA_FILE.stat().st_size} bytes)")
    for w in WORKLOADS:
        wl = get_workload(w)
        print(f"{w:10s} {len(wl.prompts)} prompts  fingerprint {wl.fingerprint}  {wl.description}")
