"""Training text for a distilled draft: real offline prompts, continued by the target itself.

Everything is real text that ships with Python (no network):

- prompts: stubs (imports, signature, docstring) of documented functions of the running
  interpreter's stdlib and of its installed third-party packages (site-packages: torch,
  transformers, ...), raw or wrapped as "Complete this Python function:", and questions about
  those functions, the builtins and the sections of the Python reference
  (``pydoc_data.topics``), asked with the ``chat`` benchmark's system prompt or none; the
  target writes the continuations (:func:`continue_prompts`), so the draft learns what the
  target says;
- plain text: stdlib source and reference pages, plus any files the user names.

Held out: every ``code`` and ``chat`` prompt of :mod:`specdec.distill.prompts`
(:func:`held_out_prompts`; the benchmarks' ``code`` and ``chat`` workloads are the same
prompts). Training never uses their stdlib modules nor their questions' reference pages, so
acceptance measured on them is acceptance on unseen prompts.
"""

from __future__ import annotations

import ast
import io
import itertools
import logging
import lzma
import os
import random
import re
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from specdec.distill.prompts import (CHAT_QA, CODE_CHAT_INSTRUCTION, CODE_FUNCTIONS, SUMMARIZE_INSTRUCTION, Prompt,
                                     chat_prompts, chat_system_prompt, code_prompts, encode)
from specdec.distill.evaluate import left_pad

log = logging.getLogger("specdec.distill")
_OWN_PACKAGES = {"specdec", "benchmarks", "integrations", "prefix_cache", "quant", "tests", "conftest"}
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip",
              "tkinter", "__pycache__", "config-3", "venv", "pydoc_data"}
_TEMPLATES = ("Explain {t} in Python, with a short example.",
              "What should I know about {t} in Python?",
              "How does {t} work in Python? Answer briefly.",
              "Give me a Python code example that shows {t}.",
              "What does {t} do in Python?",
              "When should I use {t} in Python, and when not?",
              "What goes wrong if I misuse {t} in Python?",
              "How is {t} different from similar features in Python?")
_METHOD = re.compile(r"^ {3}([a-z]+\.[a-z_]+)\(", re.MULTILINE)  # "   str.split(sep=None)" in the pages
_DEF = re.compile(r"^(?:async )?def (\w+)\(", re.MULTILINE)  # a stub's function name
# prompt kinds, cycled in this order (so any prefix of the list keeps these proportions)
_MIX = ("code", "chat-system", "code", "chat", "code", "chat-system", "code-chat", "summarize", "chat-system", "code")


@dataclass
class Sequence:
    """One training text: token ids, and where the target's own tokens start."""

    ids: list[int]
    prompt_len: int  # tokens before the target's continuation (len(ids) for plain text)
    source: str      # "code", "chat", ..., "text"


# --------------------------------------------------------------------------------------
# Held-out prompts (also the benchmarks' code and chat workloads)


def held_out_prompts() -> dict:
    """The held-out ``code`` and ``chat`` prompts (:mod:`specdec.distill.prompts`), all of them:
    the benchmarks' ``code`` (raw text) and ``chat`` (chat messages) workloads."""
    return {"code": code_prompts(chat=False), "chat": chat_prompts(chat=True)}


def held_out_modules() -> set[str]:
    """Stdlib modules the held-out code prompts come from (e.g. ``textwrap``, ``urllib.parse``)."""
    return {q.rsplit(".", 1)[0] for q in CODE_FUNCTIONS}


def held_out_topics() -> set[str]:
    """Reference pages (pydoc topics) that answer the held-out chat questions."""
    return {topic for _, topic, _ in CHAT_QA}


def encode_prompts(prompts, tokenizer, max_tokens: int | None = None) -> list[list[int]]:
    """Token ids of :class:`specdec.distill.prompts.Prompt` objects (chat template applied where set)."""
    return [encode(p, tokenizer, max_tokens) for p in prompts]


# --------------------------------------------------------------------------------------
# Training prompts


def stdlib_files(exclude_modules: set[str] | None = None) -> list[Path]:
    """The running interpreter's pure-Python stdlib files (no tests, no site-packages), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    exclude = exclude_modules if exclude_modules is not None else held_out_modules()
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.startswith(("config-", "test"))]
        for name in files:
            if not name.endswith(".py"):
                continue
            path = Path(folder) / name
            module = _module_name(path)
            if module not in exclude and not module.startswith("test"):
                out.append(path)
    return sorted(out)


def site_package_files(exclude_packages: set[str] = _OWN_PACKAGES) -> list[Path]:
    """Pure-Python files of the installed third-party packages (site-packages), sorted: real
    code beyond the stdlib (torch, transformers, numpy, ...) for more, fresher prompts.
    This project's own packages are left out."""
    out = []
    for root in _site_roots():
        for folder, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.startswith(("test", "_vendor"))
                       and not d.endswith((".dist-info", ".egg-info"))]
            top = Path(folder).relative_to(root).parts[:1]
            if top and top[0] in exclude_packages:
                dirs[:] = []
                continue
            out += [Path(folder) / n for n in files
                    if n.endswith(".py") and not n.startswith("test") and (top or n[:-3] not in exclude_packages)]
    return sorted(set(out))


def _site_roots() -> list[Path]:
    """The interpreter's site-packages folders that exist (a venv's, or the system's dist-packages)."""
    import site

    paths = sysconfig.get_paths()
    roots = {Path(paths["purelib"]), Path(paths["platlib"])} | {Path(p) for p in site.getsitepackages()}
    return sorted(r for r in roots if r.is_dir())


def code_files(rng: random.Random) -> list[Path]:
    """Stdlib (less the held-out modules) and site-packages files, each list shuffled, taken in
    turn (stdlib, package, stdlib, ...) so the stdlib keeps half of the first files however many
    packages are installed."""
    stdlib, packages = stdlib_files(), site_package_files()
    rng.shuffle(stdlib)
    rng.shuffle(packages)
    mixed = [f for pair in zip(stdlib, packages) for f in pair]
    n = min(len(stdlib), len(packages))
    return mixed + stdlib[n:] + packages[n:]


def builtin_subjects() -> list[str]:
    """The documented public builtins, as question subjects: "`len()`", "`zip`", "`ValueError`"."""
    import builtins

    names = [n for n in dir(builtins) if not n.startswith("_") and getattr(builtins, n).__doc__]
    return [f"`{n}`" if isinstance(getattr(builtins, n), type) else f"`{n}()`" for n in names]


def function_stubs(source: str, max_chars: int = 1500) -> list[str]:
    """Module imports + each documented function's decorators, signature and docstring: the
    top-level functions', then the top-level classes' methods' (under their class's header line)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines()
    imports = [ast.get_source_segment(source, n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    head = "\n".join(s for s in imports[:8] if s and "\n" not in s)
    head = head + "\n\n\n" if head else ""
    stubs = [head + _stub(lines, node) for node in _documented(tree.body)]
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        header = "\n".join(lines[_first_line(cls) - 1:cls.body[0].lineno - 1]) + "\n"
        stubs += [head + header + _stub(lines, node) for node in _documented(cls.body)]
    return [s for s in stubs if len(s) <= max_chars]


def _documented(body: list) -> list:
    return [n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and ast.get_docstring(n)]


def _first_line(node) -> int:
    return min([node.lineno] + [d.lineno for d in node.decorator_list])


def _stub(lines: list[str], node) -> str:
    """Decorators, signature and docstring of a function node (up to its docstring's last line)."""
    return "\n".join(lines[_first_line(node) - 1:node.body[0].end_lineno]) + "\n"


def section_titles(page: str) -> list[str]:
    """Headings of a reference page: lines underlined with ``*``, ``=`` or ``-``."""
    lines = page.splitlines()
    return [a.strip() for a, b in zip(lines, lines[1:])
            if a.strip() and len(b.strip()) == len(a.strip()) and set(b.strip()) <= set("*=-") and b.strip()]


def reference_pages(exclude_topics: set[str] | None = None) -> dict[str, str]:
    """``pydoc_data.topics`` pages, less those answering held-out questions."""
    from pydoc_data.topics import topics

    exclude = exclude_topics if exclude_topics is not None else held_out_topics()
    return {k: topics[k] for k in sorted(topics) if k not in exclude}


def training_prompts(n: int, seed: int = 0) -> list:
    """``n`` prompts (:class:`specdec.distill.prompts.Prompt`), disjoint from :func:`held_out_prompts`.

    Kinds are interleaved in fixed proportions (4 code : 3 chat with the benchmark's system
    prompt : 1 chat without : 1 chat-wrapped code : 1 summarize) so that any prefix of the
    list, e.g. what a time budget lets the target continue, keeps the mix.
    """
    rng = random.Random(seed)
    files = code_files(rng)
    stubs, functions = [], []
    for path in files:  # parse only as many files as the code prompts need (half of them are code)
        if len(stubs) > n // 2 + 8:
            break
        found = function_stubs(path.read_text(encoding="utf-8", errors="replace"))
        module = _module_name(path)
        functions += [f"{module}.{m.group(1)}()" for m in map(_DEF.search, found) if m]
        stubs += found
    pages = reference_pages()
    subjects = [_lower_first(t) for page in pages.values() for t in section_titles(page)]
    subjects += [f"`{m}`" for page in pages.values() for m in _METHOD.findall(page)]
    subjects += [f"`{name}`" for name in functions] + builtin_subjects()
    questions = [template.format(t=t) for t in subjects for template in _TEMPLATES]
    excerpts = [_excerpt(page, rng) for page in pages.values()]
    for pool in (stubs, questions, excerpts):
        rng.shuffle(pool)
    half = len(questions) // 2
    pools = {"code": iter(stubs), "code-chat": iter(stubs[::-1]), "chat-system": iter(questions[:half]),
             "chat": iter(questions[half:]), "summarize": iter(excerpts * (1 + n // max(len(excerpts), 1)))}
    system = chat_system_prompt()
    out = []
    for i in range(n * 2):
        kind = _MIX[i % len(_MIX)]
        item = next(pools[kind], None)
        if item is not None:
            out.append(_prompt(kind, item, i, system))
        if len(out) == n:
            break
    return out


def _prompt(kind: str, item: str, i: int, system: str) -> Prompt:
    if kind == "code":
        return Prompt(f"train/code/{i}", None, item)
    if kind == "code-chat":
        msg = f"{CODE_CHAT_INSTRUCTION}\n\n```python\n{item}\n```"
        return Prompt(f"train/code-chat/{i}", [{"role": "user", "content": msg}], None)
    if kind == "summarize":
        msg = f"{item}\n\n{SUMMARIZE_INSTRUCTION}"
        return Prompt(f"train/summarize/{i}", [{"role": "user", "content": msg}], None)
    messages = [{"role": "user", "content": item}]
    if kind == "chat-system":
        messages.insert(0, {"role": "system", "content": system})
    return Prompt(f"train/{kind}/{i}", messages, None)


def _module_name(path: Path) -> str:
    """Dotted module name of a stdlib or site-packages file."""
    for root in _site_roots() + [Path(sysconfig.get_paths()["stdlib"])]:  # site-packages may lie inside the stdlib
        if path.is_relative_to(root):
            return ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
    return path.stem


def _lower_first(title: str) -> str:
    return title[0].lower() + title[1:] if len(title) > 1 and title[1].islower() else title


def _excerpt(page: str, rng: random.Random, chars: int = 3000) -> str:
    if len(page) <= chars:
        return page.strip()
    start = page.rfind("\n\n", 0, rng.randrange(len(page) - chars)) + 2
    return page[start:start + chars].rsplit("\n\n", 1)[0].strip()


# --------------------------------------------------------------------------------------
# Plain text


def plain_texts(max_chars: int, files: list[str | Path] = (), seed: int = 0, piece_chars: int = 8000) -> list[str]:
    """Pieces of real text: user ``files`` first (whole), then reference pages, then stdlib and
    site-packages source (:func:`code_files`, shuffled by ``seed``: other seeds, other files)
    until ``max_chars``. Pieces are cut at line ends near ``piece_chars``."""
    docs = [Path(f).read_text(encoding="utf-8", errors="replace") for f in files]
    sources = (p.read_text(encoding="utf-8", errors="replace") for p in code_files(random.Random(seed)))
    budget = max_chars
    for text in itertools.chain(reference_pages().values(), sources):
        if budget <= 0:
            break
        docs.append(text[:budget])
        budget -= len(docs[-1])
    return [piece for doc in docs for piece in _pieces(doc, piece_chars) if piece.strip()]


def _pieces(text: str, size: int) -> list[str]:
    out, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        out.append(text[start:end])
        start = end
    return out


def tokenize_texts(texts: list[str], tokenizer) -> list[Sequence]:
    """Plain-text :class:`Sequence` s (no special tokens added)."""
    out = []
    for start in range(0, len(texts), 256):
        for ids in tokenizer(texts[start:start + 256], add_special_tokens=False)["input_ids"]:
            if len(ids) >= 2:
                out.append(Sequence(list(ids), len(ids), "text"))
    return out


# --------------------------------------------------------------------------------------
# The target's continuations


def continue_prompts(target, prompts: list[list[int]], *, max_new_tokens: int = 160, temperature: float = 0.8,
                     top_p: float = 0.95, batch_size: int = 16, time_budget_s: float | None = None,
                     seed: int = 0, sources: list[str] | None = None, progress: bool = True,
                     compile: bool = False, explore_tokens: int = 0,
                     batch_tokens: int | None = None) -> list[Sequence]:
    """Sample the target's continuations of ``prompts`` (token ids), batched; ``temperature=0``:
    greedy ones (what greedy decoding, and so the acceptance replay, sees). ``compile``: decode
    with ``specdec.generate(compile=True)`` (static cache + CUDA graphs; same tokens; the
    target's static runners are released once they hold 40% of the GPU's memory, and at the end).

    ``explore_tokens`` (greedy only): the first few new tokens are sampled (temperature 1,
    ``top_p``), the rest greedy from there: greedy text that the prompts alone would not give
    (a second run with another ``seed`` writes new text from the same prompts). The sampled
    tokens count as prompt; a row that ends while sampling is dropped.

    Batches are formed in prompt order (rows sorted by length within groups of four
    batches, to limit padding); with ``batch_tokens``, a batch of long prompts holds fewer
    rows: at most ``batch_tokens`` // its longest prompt rounded up to 256 tokens (a prefill's
    memory grows with rows x length, and its attention with length squared; the rounding lets
    batches share shapes, so ``compile`` captures fewer graphs). With ``time_budget_s``, no new
    batch starts once it is spent: the prompts' order decides which are continued.
    """
    from tqdm.auto import tqdm

    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if explore_tokens and (temperature > 0 or not 0 < explore_tokens < max_new_tokens):
        raise ValueError(f"explore_tokens={explore_tokens} needs greedy text (temperature 0) and fewer than "
                         f"max_new_tokens={max_new_tokens}")
    if batch_tokens is not None and batch_tokens < 1:
        raise ValueError(f"batch_tokens must be >= 1 (prompt tokens per generation batch) or None, got {batch_tokens}")
    sources = sources or ["prompt"] * len(prompts)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
    order = _length_grouped(prompts, batch_size, batch_tokens)
    out, start = [], time.perf_counter()
    bar = tqdm(total=len(prompts), desc="target writes training text", unit="seq", disable=not progress)
    for b, rows in enumerate(order):
        if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
            break
        generator = torch.Generator().manual_seed(seed * 100_003 + b)
        starts = [list(prompts[r]) for r in rows]
        if explore_tokens:
            explored = _write(target, starts, dict(do_sample=True, temperature=1.0, top_p=top_p), explore_tokens,
                              generator, compile)
            kept = [i for i, e in enumerate(explored) if len(e) == explore_tokens]
            rows, starts = [rows[i] for i in kept], [starts[i] + explored[i] for i in kept]
        new = _write(target, starts, sampling, max_new_tokens - explore_tokens, generator, compile) if rows else []
        out += [Sequence(s + n, len(s), sources[r]) for r, s, n in zip(rows, starts, new)]
        bar.update(len(order[b]))
        bar.set_postfix(tokens=sum(len(s.ids) - s.prompt_len for s in out))
        if not progress:
            log.info("target continued %d/%d prompts (%d new tokens, %.0f s)", len(out), len(prompts),
                     sum(len(s.ids) - s.prompt_len for s in out), time.perf_counter() - start)
    bar.close()
    if compile:
        _release_static(target)
    return out


def _release_static(target, when_over: float = 0.0) -> None:
    """Drop the target's ``compile=True`` runners (a static KV cache and CUDA graphs per batch shape)
    once they hold more than ``when_over`` of the GPU's memory (0: always): batches of other sizes
    and lengths each keep one, and training after generation needs the memory back."""
    from specdec import static

    device = target.get_input_embeddings().weight.device
    if device.type == "cuda":
        if torch.cuda.memory_allocated(device) <= when_over * torch.cuda.get_device_properties(device).total_memory:
            return
        static.release(target)
        torch.cuda.empty_cache()
    else:
        static.release(target)


def _write(target, rows: list[list[int]], sampling: dict, max_new_tokens: int, generator,
           compile: bool) -> list[list[int]]:
    """Each row's new tokens (up to its EOS) from one batched ``specdec.generate`` call."""
    import specdec

    if compile:  # runners of earlier batch shapes stay (no recapture when a shape comes back) up to 40%
        _release_static(target, when_over=0.4)
    ids, mask = left_pad(rows, 0, target.get_input_embeddings().weight.device)
    seqs, stats = specdec.generate(target, ids, mask, **sampling, max_new_tokens=max_new_tokens,
                                   generator=generator, return_stats=True, compile=compile)
    return [row[:n] for row, n in zip(seqs[:, ids.shape[1]:].tolist(), stats.new_tokens)]


def save_generated(seqs: list[Sequence], path: str | Path, target, info: dict | None = None) -> Path:
    """Write the target's continuations to ``path`` (one flat uint16 tensor, int32 for vocabularies
    over 65,536 ids, + lengths), with the target's fingerprint, so a later run (``specdec distill
    --generated``) trains on them without generating again. A path ending in ``.xz`` is written
    lzma-compressed (repeated prompt text, e.g. one long system prompt, packs well: small enough
    to come back from a remote GPU job)."""
    from specdec.distill.shipped import target_fingerprint

    if not seqs:
        raise ValueError("no continuations to save: the target wrote nothing (give it prompts and --gen-time > 0)")
    lengths = torch.tensor([len(s.ids) for s in seqs], dtype=torch.long)
    flat = torch.tensor([t for s in seqs for t in s.ids], dtype=torch.int32)
    if int(flat.max()) < 2**16:  # half the bytes: a GPU run's millions of tokens come back from the device
        flat = flat.to(torch.uint16)
    record = dict(format="specdec-generated-v1", fingerprint=target_fingerprint(target), info=info or {},
                  ids=flat, lengths=lengths, prompt_lens=torch.tensor([s.prompt_len for s in seqs], dtype=torch.long),
                  sources=[s.source for s in seqs])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".xz":
        buffer = io.BytesIO()
        torch.save(record, buffer)
        path.write_bytes(lzma.compress(buffer.getvalue(), preset=1))  # fast; repeated prompts compress anyway
    else:
        torch.save(record, path)
    return path


def load_generated(path: str | Path, target) -> tuple[list[Sequence], dict]:
    """(continuations, info) as :func:`save_generated` wrote them, checked against ``target``.

    Raises:
        ValueError: the file is not such a file, or another model wrote it.
    """
    from specdec.distill.shipped import matches_fingerprint

    source = io.BytesIO(lzma.decompress(Path(path).read_bytes())) if Path(path).suffix == ".xz" else path
    record = torch.load(source, weights_only=True)
    if not isinstance(record, dict) or record.get("format") != "specdec-generated-v1":
        raise ValueError(f"{path} is not a file of the target's text (write one with `specdec distill "
                         "--save-generated FILE`)")
    if not matches_fingerprint(record["fingerprint"], target):
        raise ValueError(f"{path} was written by another model ({record['fingerprint']}): its text would teach "
                         "the draft that model's outputs; generate this target's with --save-generated")
    rows = record["ids"].long().split(record["lengths"].tolist())
    seqs = [Sequence(r.tolist(), int(p), src) for r, p, src in zip(rows, record["prompt_lens"], record["sources"])]
    return seqs, record["info"]


def _length_grouped(prompts: list[list[int]], batch_size: int, batch_tokens: int | None = None,
                    group: int = 4, length_step: int = 256) -> list[list[int]]:
    """Batches of row indices: up to ``batch_size`` rows, and rows x longest prompt <= ``batch_tokens``.

    The longest prompt is rounded up to a multiple of ``length_step`` first, so that batches of
    similar lengths get the same row count: ``compile=True`` captures CUDA graphs once per batch
    shape, and a new shape costs a capture (on an H100, 0.5-0.7 s more than a repeated shape)."""
    batches = []
    for g in range(0, len(prompts), batch_size * group):
        batch = []
        for r in sorted(range(g, min(g + batch_size * group, len(prompts))), key=lambda r: len(prompts[r])):
            if batch and len(batch) >= _rows_cap(len(prompts[r]), batch_size, batch_tokens, length_step):
                batches.append(batch)
                batch = []
            batch.append(r)
        batches += [batch] if batch else []
    return batches


def _rows_cap(longest: int, batch_size: int, batch_tokens: int | None, length_step: int) -> int:
    """Rows a batch whose longest prompt has ``longest`` tokens may hold (at least 1)."""
    if not batch_tokens:
        return batch_size
    return max(1, min(batch_size, batch_tokens // (-(-longest // length_step) * length_step)))


# --------------------------------------------------------------------------------------
# Batches


class WindowSampler:
    """Random training batches of ``seq_len``-token windows (and longer rows up to ``max_len``).

    A row comes from the target's continuations with probability ``generated_fraction``
    (its last ``max_len`` tokens, keeping the first ``head`` tokens of the prompt: a short
    stand-in for a long prompt's start), else from plain text (a random ``seq_len`` window,
    texts weighted by length). Short rows are padded on the right (mask 0).

    ``max_len`` > ``seq_len`` (long prompts, e.g. a chat system prompt with reference pages
    the target quotes from far back): continuations up to ``max_len`` tokens are kept whole.
    Rows are grouped by length into buckets of ``seq_len``, 2 ``seq_len``, ..., ``max_len``
    tokens; a batch holds rows of one bucket, ``batch_size * seq_len // bucket`` of them, so
    every batch has the same number of slots (a step of long rows costs what a step of short
    ones does, and holds fewer rows). Buckets are drawn in proportion to rows x length, so
    every row is as likely to be drawn as any other, whatever its length.

    :meth:`sample_weighted` also gives per-slot loss weights: ``prompt_weight`` on the prompt
    tokens of the target's continuations (the decode loop never drafts a prompt, and the
    prompts are templated and repeated, so they are easy to fit and would dominate the loss),
    1 on the target's own tokens and on plain text, 0 on padding.
    """

    def __init__(self, generated: list[Sequence], texts: list[Sequence], seq_len: int,
                 generated_fraction: float = 0.6, head: int = 8, pad_id: int = 0, seed: int = 0,
                 prompt_weight: float = 0.1, max_len: int | None = None):
        if not generated and not texts:
            raise ValueError("no training text: give prompts to continue or text files (--text)")
        if not 0.0 <= prompt_weight <= 1.0:
            raise ValueError(f"prompt_weight must be in [0, 1] (the loss weight of prompt slots), got {prompt_weight!r}")
        max_len = seq_len if max_len is None else max_len
        if max_len < seq_len:
            raise ValueError(f"max_len ({max_len}) must be at least seq_len ({seq_len}): the longest rows kept whole")
        self.generated, self.texts, self.seq_len, self.head, self.pad_id = generated, texts, seq_len, head, pad_id
        self.max_len, self.prompt_weight = max_len, prompt_weight
        self.fraction = generated_fraction if generated and texts else float(bool(generated))
        self.rng = random.Random(seed)
        self._text_weights = [len(s.ids) for s in texts]
        self.buckets = bucket_lengths(seq_len, max_len)
        self._by_bucket = [[] for _ in self.buckets]
        for s in generated:
            self._by_bucket[_bucket_of(len(s.ids), self.buckets)].append(s)
        self._bucket_weights = self._weigh_buckets()

    def sample(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask), both (rows, length) int64: ``batch_size`` rows of ``seq_len`` slots, or
        fewer, longer rows (see the class)."""
        ids, mask, _ = self.sample_weighted(batch_size)
        return ids, mask

    def sample_weighted(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, mask, weight): ids and mask as :meth:`sample` (the same rows for the same seed),
        weight (rows, length) float32, the loss weight of each slot (see the class)."""
        b = 0 if len(self.buckets) == 1 else self.rng.choices(range(len(self.buckets)), self._bucket_weights)[0]
        length = self.buckets[b]
        rows = [self._row(b) for _ in range(max(1, batch_size * self.seq_len // length))]
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        weight = torch.zeros(len(rows), length)
        for i, (r, w) in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
            weight[i, :len(r)] = torch.tensor(w)
        return ids, mask, weight

    def _weigh_buckets(self) -> list[float]:
        """Each bucket's share of rows (plain text windows all in the first) times its length."""
        n = max(1, len(self.generated))
        rows = [self.fraction * len(g) / n for g in self._by_bucket]
        rows[0] += 1.0 - self.fraction
        return [r * length for r, length in zip(rows, self.buckets)]

    def _row(self, bucket: int = 0) -> tuple[list[int], list[float]]:
        pool = self._by_bucket[bucket]
        if bucket == 0:  # the first bucket also holds the plain-text windows
            generated = self.fraction * len(pool) / max(1, len(self.generated))
            use_generated = self.rng.random() * (generated + 1.0 - self.fraction) < generated
        else:
            use_generated = True
        if use_generated:
            seq = self.rng.choice(pool)
            weight = [self.prompt_weight] * seq.prompt_len + [1.0] * (len(seq.ids) - seq.prompt_len)
            return self._cut(seq.ids), self._cut(weight)
        T = self.seq_len
        ids = self.rng.choices(self.texts, weights=self._text_weights)[0].ids
        start = self.rng.randrange(max(len(ids) - T, 0) + 1)
        window = ids[start:start + T]
        return window, [1.0] * len(window)

    def _cut(self, items: list) -> list:
        """The first ``head`` and the last ``max_len - head`` items of a longer row."""
        T = self.max_len
        return items if len(items) <= T else items[:self.head] + items[len(items) - (T - self.head):]


def bucket_lengths(seq_len: int, max_len: int) -> list[int]:
    """Row lengths of the batches: ``seq_len``, doubled while below ``max_len``, then ``max_len``."""
    if seq_len < 1 or max_len < seq_len:
        raise ValueError(f"need 1 <= seq_len <= max_len, got seq_len={seq_len}, max_len={max_len}")
    out = [seq_len]
    while out[-1] < max_len:
        out.append(min(2 * out[-1], max_len))
    return out


def _bucket_of(length: int, buckets: list[int]) -> int:
    """The first bucket a row of ``length`` tokens fits (the last one for longer rows: they are cut)."""
    return next((i for i, b in enumerate(buckets) if length <= b), len(buckets) - 1)
