"""Shared pieces of the perf harness: the models, the three engines behind one interface, machine figures.

Each engine is wrapped in a runner with the same two calls:

* ``run(ids, n)``: one greedy request of exactly ``n`` new tokens, timed the way its users would
  time it (no per-step instrumentation); gives TTFT, prefill time and decode tok/s;
* ``run_instrumented(ids, n)``: the same request with every step timed; gives per-token latencies
  and, where the runner can see inside its step, the time spent outside ``session.run``.

All three decode exactly ``n`` tokens: EOS does not stop them (the engine's EOS set is emptied,
the plain loop runs with ``stop_at_eos=False``, onnxruntime-genai gets ``min_length =
max_length``), so every engine does the same amount of work.
"""

from __future__ import annotations

import itertools
import json
import os
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.config import ModelSpec
from engine.providers import physical_cores

REPO = Path(__file__).resolve().parents[1]
PERF_DIR = REPO / "perf"
MODELS_DIR = PERF_DIR / "models"  # gitignored cache of synthetic models
RESULTS_DIR = PERF_DIR / "results"  # gitignored
SHARED_MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"
STORIES = SHARED_MODELS / "stories260k"

# Default vocabulary of the synthetic Phi-4-mini-shaped model. Phi-4-mini's own 200,064 makes the
# embedding table 2.4 GB of fp32 (build and load alone take minutes here); 32,064 (the Phi-3
# vocabulary) keeps the first build to ~10 s and the lm_head a realistic share of a step.
DEFAULT_VOCAB = 32064
DEFAULT_CONTEXT = 4096
# Models with fewer bytes of weights are "tiny": a step costs microseconds and overhead dominates.
TINY_BYTES = 16 * 1024 * 1024


# ------------------------------------------------------------------------------------------------
# models


@dataclass
class ModelChoice:
    """One model folder the harness runs, with the name the tables use."""

    name: str
    path: Path
    note: str = ""


def phi4_model(layers: int, vocab: int, context_length: int = DEFAULT_CONTEXT, dtype: str = "float32") -> ModelChoice:
    """The synthetic Phi-4-mini-shaped INT4 model, built once into perf/models/ (``dtype``: its
    activations, KV and logits; the name is the same for both, the provider column tells them apart)."""
    from engine.testing.synthetic import cached_model, phi4_mini_spec

    spec = phi4_mini_spec(layers=layers, vocab=vocab, context_length=context_length, quant="int4", dtype=dtype)
    path = cached_model(spec, MODELS_DIR)
    return ModelChoice(f"phi4mini-int4-L{layers}-V{vocab}", path, f"synthetic, random weights, {dtype}")


def tiny_model(dtype: str = "float32") -> ModelChoice:
    """stories260k from ../shared when present (float32 only), else a small synthetic GQA model."""
    if dtype == "float32" and (STORIES / "genai_config.json").is_file():
        return ModelChoice("stories260k", STORIES, "real 260K-param Llama, GQA fp32")
    from engine.testing.synthetic import SyntheticSpec, cached_model

    spec = SyntheticSpec(
        layout="gqa", quant="fp32", dtype=dtype, layers=5, hidden=64, heads=4, kv_heads=2, head_size=16,
        intermediate=192, vocab=512, context_length=512,
    )  # fmt: skip
    return ModelChoice("tiny-gqa", cached_model(spec, MODELS_DIR), f"synthetic, {dtype}")


def cuda_twin(model: ModelChoice, args) -> ModelChoice | None:
    """The model the CUDA sweep runs in place of ``model``: the float16 twin of a built-in synthetic
    model (same shapes and seed; ORT's CUDA GroupQueryAttention takes float16, and the engine
    refuses float32 GQA on CUDA), ``model`` itself for a ``--model`` folder, None for stories260k
    (a real float32 model with no float16 twin)."""
    if model.name.startswith("phi4mini-"):
        return phi4_model(args.layers, args.vocab, args.context, dtype="float16")
    if model.name == "tiny-gqa":
        return tiny_model("float16")
    if model.name == "stories260k":
        return None
    return model


# ------------------------------------------------------------------------------------------------
# machine figures


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (getrusage ru_maxrss, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_bandwidth(size_bytes: int = 1 << 30, reps: int = 5, threads: int | None = None) -> dict[str, float]:
    """Measured main-memory bandwidth in GB/s (1e9 bytes/s), medians of ``reps``.

    ``read_1t``: one thread summing a ``size_bytes`` float64 array; ``read_nt``: the array split
    over ``threads`` threads (numpy releases the GIL inside the sum); ``copy_1t``: ``np.copyto``
    of the array into a second one, counted as read + write (2 x size).
    """
    threads = threads or physical_cores()
    a = np.ones(size_bytes // 8, dtype=np.float64)  # pages touched here, not in the timing
    b = np.empty_like(a)
    parts = np.array_split(a, threads)

    def timed(fn) -> float:
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    a.sum()  # warm-up
    read_1t = a.nbytes / timed(a.sum) / 1e9
    with ThreadPoolExecutor(threads) as pool:
        read_nt = a.nbytes / timed(lambda: list(pool.map(np.sum, parts))) / 1e9
    copy_1t = 2 * a.nbytes / timed(lambda: np.copyto(b, a)) / 1e9
    return {
        "read_1t": read_1t,
        "read_nt": read_nt,
        "copy_1t": copy_1t,
        "threads": threads,
        "bytes": size_bytes,
    }


# ------------------------------------------------------------------------------------------------
# one request, as each runner reports it


@dataclass
class Sample:
    """Timings of one request of ``new_tokens`` tokens after ``prompt_tokens``."""

    prompt_tokens: int
    new_tokens: int
    ttft_s: float  # call -> first token available
    prefill_s: float  # the prompt's forward pass
    decode_tokens_per_s: float  # (new_tokens - 1) / time from first to last token
    tokens: list[int] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)  # per decode step wall time (instrumented runs)
    in_run_s: list[float] = field(default_factory=list)  # per decode step time inside session.run*
    extra: dict[str, float] = field(default_factory=dict)


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 90, 99)) -> list[float]:
    """Percentiles of ``values`` (NaN when empty)."""
    if not values:
        return [float("nan")] * len(qs)
    return [float(v) for v in np.percentile(np.asarray(values), qs)]


class _Stamper:
    """Wraps a bound session method; records perf_counter before and after each call."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.starts: list[float] = []
        self.ends: list[float] = []

    def __call__(self, *args, **kwargs):
        t = time.perf_counter()
        out = self.fn(*args, **kwargs)
        self.ends.append(time.perf_counter())
        self.starts.append(t)
        return out

    def steps(self) -> tuple[list[float], list[float]]:
        """(wall, inside) per decode step: call i's end minus call i-1's end, and call i's duration.
        Call 0 is the prefill."""
        wall = [b - a for a, b in itertools.pairwise(self.ends)]
        inside = [e - s for s, e in zip(self.starts[1:], self.ends[1:], strict=True)]
        return wall, inside


class Runner:
    """Common interface of the three engines."""

    name = "?"
    threads = 1

    def run(self, ids: np.ndarray, n: int) -> Sample:  # pragma: no cover - interface
        raise NotImplementedError

    def run_instrumented(self, ids: np.ndarray, n: int) -> Sample:  # pragma: no cover - interface
        raise NotImplementedError

    def kv_bytes(self, spec: ModelSpec, prompt: int, n: int) -> int:
        """KV-cache bytes this runner holds for the request."""
        return spec.kv_bytes_per_token * (prompt + n)

    def close(self) -> None:
        """Release sessions and temp files."""


class EngineRunner(Runner):
    """This project's Engine through its public ``generate()``; stats from ``GenerationResult.stats``."""

    name = "engine"

    def __init__(self, model_dir: Path, provider: str, max_length: int, threads: int | None = None, **kw) -> None:
        from engine import Engine

        self.eng = Engine(model_dir, provider=provider, max_length=max_length, threads=threads, **kw)
        # decode exactly n tokens on every engine: EOS must not end a timed run early
        self.eng.eos_token_ids = frozenset()
        self.threads = self.eng.threads

    def run(self, ids: np.ndarray, n: int) -> Sample:
        res = self.eng.generate(ids, max_new_tokens=n)
        s = res.stats
        return Sample(
            s.prompt_tokens,
            s.new_tokens,
            s.ttft_s,
            s.prefill_s,
            s.decode_tokens_per_s,
            res.token_ids,
            extra={"tokenize_s": s.tokenize_s},
        )

    def run_instrumented(self, ids: np.ndarray, n: int) -> Sample:
        """generate() with the step's ORT run (``StepState.bind.run``) wrapped by a perf_counter stamper."""
        bind = self.eng._state.bind
        original = bind.run
        stamper = _Stamper(original)
        bind.run = stamper  # the step calls bind.run(); swap in the stamper for this request
        try:
            sample = self.run(ids, n)
        finally:
            bind.run = original
        sample.step_s, sample.in_run_s = stamper.steps()
        return sample

    def kv_bytes(self, spec: ModelSpec, prompt: int, n: int) -> int:
        return self.eng.kv_cache_bytes

    def close(self) -> None:
        del self.eng


class PlainRunner(Runner):
    """The plain ``session.run`` loop of engine.testing.plain_loop (numpy KV fed back every step)."""

    name = "plain"

    def __init__(self, model_dir: Path, provider: str, threads: int) -> None:
        import onnxruntime as ort

        from engine.testing.plain_loop import PlainLoop

        self.pl = PlainLoop(model_dir, threads=threads)
        self.threads = threads
        if provider == "cuda":  # PlainLoop makes a CPU session; swap in a CUDA one over the same file
            old = self.pl.session
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.log_severity_level = 3
            self.pl.session = ort.InferenceSession(
                old._model_path, so, providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
            )

    def run(self, ids: np.ndarray, n: int) -> Sample:
        r = self.pl.greedy(ids.tolist(), n, stop_at_eos=False)
        # the plain loop's first step is the prompt's forward pass plus one argmax
        return Sample(len(ids), len(r.token_ids), r.ttft_s, r.ttft_s, r.decode_tokens_per_s, r.token_ids)

    def run_instrumented(self, ids: np.ndarray, n: int) -> Sample:
        sess = self.pl.session
        stamper = _Stamper(sess.run)
        sess.run = stamper
        try:
            sample = self.run(ids, n)
        finally:
            del sess.run
        sample.step_s, sample.in_run_s = stamper.steps()
        return sample

    def close(self) -> None:
        del self.pl


def genai_available() -> bool:
    """Whether onnxruntime-genai imports."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return False
    return True


class GenaiRunner(Runner):
    """onnxruntime-genai on the same folder, same intra-op threads, greedy.

    genai_config.json is copied into a temp folder that symlinks every other file, with
    ``model.decoder.session_options.intra_op_num_threads`` set (genai's default here is one
    thread). TTFT = ``append_tokens`` (the prompt's forward pass) + the first
    ``generate_next_token`` (which only picks from the logits append_tokens computed); creating
    the Generator (its KV buffers) is recorded apart as ``extra['generator_s']``. ``provider_options``:
    the CUDA EP options genai hands to ORT (e.g. ``{"enable_cuda_graph": "1"}``).
    """

    name = "genai"

    def __init__(
        self, model_dir: Path, provider: str, threads: int, provider_options: dict[str, str] | None = None
    ) -> None:
        import onnxruntime_genai as og

        self.og = og
        self.threads = threads
        self.tmp = Path(tempfile.mkdtemp(prefix="perf-genai-"))
        for f in Path(model_dir).iterdir():
            if f.name != "genai_config.json":
                (self.tmp / f.name).symlink_to(f.resolve())
        cfg = json.loads((Path(model_dir) / "genai_config.json").read_text(encoding="utf-8"))
        so = cfg["model"]["decoder"].setdefault("session_options", {})
        so["intra_op_num_threads"] = threads
        so["inter_op_num_threads"] = 1
        so["provider_options"] = [{"cuda": dict(provider_options or {})}] if provider == "cuda" else []
        (self.tmp / "genai_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
        self.model = og.Model(str(self.tmp))

    def _generator(self, prompt: int, n: int):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=prompt + n, min_length=prompt + n, do_sample=False)
        return self.og.Generator(self.model, params)

    def run(self, ids: np.ndarray, n: int) -> Sample:
        p = len(ids)
        ids32 = ids.astype(np.int32)
        tg = time.perf_counter()
        gen = self._generator(p, n)
        t0 = time.perf_counter()
        gen.append_tokens(ids32)
        t1 = time.perf_counter()
        gen.generate_next_token()
        t2 = time.perf_counter()
        while not gen.is_done():
            gen.generate_next_token()
        t3 = time.perf_counter()
        tokens = [int(t) for t in gen.get_sequence(0)[p:]]
        del gen
        k = len(tokens)
        tps = (k - 1) / (t3 - t2) if k > 1 and t3 > t2 else 0.0
        return Sample(p, k, t2 - t0, t1 - t0, tps, tokens, extra={"generator_s": t0 - tg})

    def run_instrumented(self, ids: np.ndarray, n: int) -> Sample:
        """Each ``generate_next_token`` after the first timed on its own (it runs the model inside)."""
        p = len(ids)
        gen = self._generator(p, n)
        t0 = time.perf_counter()
        gen.append_tokens(ids.astype(np.int32))
        t1 = time.perf_counter()
        gen.generate_next_token()
        t2 = time.perf_counter()
        stamps = [t2]
        while not gen.is_done():
            gen.generate_next_token()
            stamps.append(time.perf_counter())
        tokens = [int(t) for t in gen.get_sequence(0)[p:]]
        del gen
        steps = [b - a for a, b in itertools.pairwise(stamps)]
        tps = len(steps) / (stamps[-1] - t2) if steps else 0.0
        return Sample(p, len(tokens), t2 - t0, t1 - t0, tps, tokens, step_s=steps)

    def close(self) -> None:
        del self.model
        shutil.rmtree(self.tmp, ignore_errors=True)


def prompt_ids(length: int, vocab: int, seed: int = 0) -> np.ndarray:
    """A fixed pseudo-random prompt of ``length`` token ids (ids 3.. avoid the special tokens)."""
    rng = np.random.default_rng(seed + length)
    return rng.integers(3, vocab, size=length, dtype=np.int64)


def host_name() -> str:
    """Short host name for result file names."""
    return os.uname().nodename.split(".")[0] or "host"


# ------------------------------------------------------------------------------------------------
# markdown tables


def table_header(header: list[str]) -> str:
    """The header line and the rule line of a markdown table."""
    return "| " + " | ".join(header) + " |\n|" + "|".join("---" for _ in header) + "|"


def table_row(cells: list[object]) -> str:
    """One markdown table row."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    """A whole markdown table."""
    return "\n".join([table_header(header), *(table_row(r) for r in rows)])
