"""Benchmark workloads: real text that ships offline, the same prompts on every machine.

Every prompt is built from a small (<200 KB) snapshot of real, PSF-licensed text taken
from CPython 3.11's standard library:

* source code of a few pure-Python stdlib functions (``ast`` over the stdlib files), and
* pages of the Python reference documentation as shipped in ``pydoc_data.topics``.

The ``code`` and ``chat`` prompts are the ones a distilled draft is held out on: they are
defined, with their text (``specdec/distill/held_out.json``), in
:mod:`specdec.distill.prompts`, and this module builds those two workloads from there (so
distillation does not depend on the benchmarks). The other workloads' text is
``benchmarks/data/texts.json``.

The snapshots are shipped (rather than read from the running interpreter) so that a CPU run
on Python 3.11 and a GPU run on Python 3.13 benchmark exactly the same prompts.
``python -m benchmarks.workloads --rebuild`` regenerates both from the running interpreter's
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

from specdec.distill.prompts import (CHAT_QA, CHAT_REFERENCE_TOPICS, CHAT_SYSTEM_INTRO,  # noqa: F401 - re-exported
                                     CODE_CHAT_INSTRUCTION, CODE_FUNCTIONS, SUMMARIZE_INSTRUCTION, Prompt,
                                     chat_prompts, chat_system_prompt, code_functions, code_prompts, encode,
                                     plain_text)
from specdec.distill.prompts import DATA_FILE as HELD_OUT_FILE
from specdec.distill.prompts import rebuild as rebuild_held_out

DATA_FILE = Path(__file__).resolve().parent / "data" / "texts.json"

WORKLOADS = ("code", "chat", "summarize", "long", "prose", "general")


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

# pydoc topics for `summarize` (each 1-3k tokens)
SUMMARIZE_TOPICS = ("execmodel", "import", "try", "calls", "strings", "function", "comparisons", "naming")

# pydoc topics concatenated into `long` prompts (rotated: prompt i starts at page i)
LONG_TOPICS = ("formatstrings", "string-methods", "debugger", "execmodel", "import", "try",
               "calls", "strings", "typesmapping", "comparisons", "naming")

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

PROSE_CHAT_INSTRUCTION = "Continue this text:"

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


def _check_n(name: str, n: int | None, available: int | None) -> int:
    n = _DEFAULT_N[name] if n is None else n
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n_prompts must be a positive int, got {n!r}")
    if available is not None and n > available:
        raise ValueError(f"workload {name!r} has {available} prompts, {n} asked for")
    return n


def _code(n: int | None, chat: bool) -> Workload:
    n = _check_n("code", n, len(code_functions()))
    return Workload("code", f"HumanEval-style stubs: real stdlib functions ({_source_note()}) cut after "
                    "signature + docstring; the model writes the body", code_prompts(n, chat),
                    _MAX_NEW["code"], True)


def _chat(n: int | None, chat: bool) -> Workload:
    n = _check_n("chat", n, len(CHAT_QA))
    return Workload("chat", f"shared system prompt (assistant policy + Python reference pages from pydoc_data, "
                    f"{_source_note()}) + real Python questions", chat_prompts(n, chat),
                    _MAX_NEW["chat"], False)


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
                       Prompt(f"general/{key}", None, plain_text(messages)))
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


def _paragraph(page: str, starts: str) -> str:
    i = page.index(starts)
    j = page.find("\n\n", i)
    para = " ".join(page[i:j if j > 0 else None].split())
    return para[:para.rfind(".") + 1] or para  # whole sentences only


def rebuild_data(path: Path = DATA_FILE, held_out_path: Path = HELD_OUT_FILE) -> dict:
    """Regenerate both snapshots from the running interpreter: the held-out `code` and `chat`
    text (``held_out_path``) and this module's (``path``)."""
    import platform

    from pydoc_data.topics import topics

    rebuild_held_out(held_out_path)
    data = {
        "python": platform.python_version(),
        "license": "PSF License Agreement (CPython source and documentation)",
        "topics": {t: topics[t] for t in sorted(set(SUMMARIZE_TOPICS) | set(LONG_TOPICS))},
        "answers": {topic: _paragraph(topics[topic], starts) for _, topic, starts in CHAT_QA},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, sort_keys=True, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    _data.cache_clear()
    return data


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rebuild", action="store_true", help="regenerate both snapshots from this stdlib")
    args = ap.parse_args()
    if args.rebuild:
        rebuild_data()
        print(f"wrote {DATA_FILE} ({DATA_FILE.stat().st_size} bytes)")
    for w in WORKLOADS:
        wl = get_workload(w)
        print(f"{w:10s} {len(wl.prompts)} prompts  fingerprint {wl.fingerprint}  {wl.description}")
