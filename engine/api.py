"""The public API: load a model once, then generate, stream or plan.

    from engine import LLM, Plan
    llm = LLM()                                   # the shipped SmolLM2-135M-Instruct, on CUDA if present
    out = llm.generate("text", max_new_tokens=32, policy="hybrid", kv_budget=0.2)
    out.text, out.token_ids, out.decode_ms_per_token, out.kv_bytes
    for piece in llm.stream("text", policy="offload:budget=256"): print(piece, end="")
    plan = llm.plan("text", kv_budget=0.2); plan.save("plan.json"); llm.generate("text", policy=Plan.load("plan.json"))

A policy is "full", "name:key=value,..." (quant, evict, offload; keys are the policy's constructor
parameters), "hybrid" (profile this prompt, plan for kv_budget), "plan:PATH", a Plan, or one spec
per layer (strings or {"policy": ..., ...} dicts). Bad input raises ValueError with one line, before
any expensive work: the CLIs print that line as it is.
"""
from __future__ import annotations

import time
from numbers import Real
from typing import Callable

import torch

from engine.cli import fmt_bytes, resolve_device
from engine.fit import check_kv_fits, kv_tiers, profile_limit
from engine.plan import Plan, policy_specs
from engine.planner import FLOOR, check_kv_budget, make_plan, plan_kinds
from engine.layer_stats import LayerStats, average
from engine.profile import ProfileConfig, profile_prompt
from engine.outputs import Output, Stream, is_batch
from engine.runner import GenerationResult, encode_prompt, fit_prompt, prompt_room, stream_batch
from engine.sampling import SamplingParams


PLAN_OPTIONS = frozenset({"mode", "kinds", "floor", "tau", "profile_tokens"})  # stream() passes them to plan()


class LLM:
    def __init__(self, model: str | None = None, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, log: Callable[[str], None] | None = None):
        """model: an HF directory, a .gguf file, "random:<preset>" (random weights at real shapes), or
        None for the shipped default. device/dtype: None = CUDA and bfloat16 if present, else CPU and
        float32. `log` receives progress lines (loading, profiling); silent by default."""
        from weights.load import load_model  # the engine core does not need weights/ to import
        self.log = log or (lambda _: None)
        dtype_name = str(dtype).removeprefix("torch.") if dtype is not None else "auto"
        if dtype_name not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"unsupported dtype {dtype_name!r}: float32, bfloat16 or float16")
        self.device, self.dtype = resolve_device(str(device) if device is not None else "auto", dtype_name)
        if self.device.type == "cuda":  # streams, graphs and Triton launches use the current device
            torch.cuda.set_device(self.device)
        t = time.perf_counter()
        loaded = load_model(model, self.device, self.dtype, log=self.log)
        self.name, self.args, self.model, self.tokenizer = loaded.name, loaded.args, loaded.model, loaded.tokenizer
        self.log(f"loaded {self.name} ({self.args.n_layers} layers, dim {self.args.dim}) on {self.device} as "
                 f"{dtype_name if dtype_name != 'auto' else str(self.dtype).removeprefix('torch.')} "
                 f"in {time.perf_counter() - t:.1f} s")

    # ---- prompts ---------------------------------------------------------------------------------------
    def encode(self, prompt: str | list[int], chat: bool = False, allow_special: bool = False) -> list[int]:
        """Text (wrapped in the chat template if chat) or token ids -> token ids, checked. Text a user
        wrote stays text: "<|im_end|>" in it is not a control token unless allow_special (raw prompts
        only; in a chat the template alone writes control tokens)."""
        return encode_prompt(self.tokenizer, self.args.vocab_size, prompt, chat, allow_special)

    def room(self, max_new_tokens: int, ctx: int | None = None) -> int:
        """The most prompt tokens that fit `ctx` and the model's context with max_new_tokens after them."""
        return prompt_room(self.args, self.name, max_new_tokens, ctx)

    def fit(self, ids: list[int], max_new_tokens: int, ctx: int | None = None) -> tuple[list[int], int]:
        """Cut the prompt's middle so it and the new tokens fit -> (ids, tokens cut)."""
        return fit_prompt(ids, self.room(max_new_tokens, ctx))

    def full_kv_bytes(self, tokens: int) -> int:
        return self.args.kv_bytes_per_token(self.model.head.element_size()) * tokens

    # ---- policies ---------------------------------------------------------------------------------------
    def policy_specs(self, policy, ids: list[int] | None = None, new_tokens: int = 32, kv_budget=0.2,
                     **plan_options) -> list[dict]:
        """Any accepted form of `policy` -> one spec per layer, validated (cheap: policies allocate
        nothing until prefill). "hybrid" profiles `ids` and plans; see LLM.plan for plan_options."""
        if isinstance(policy, str) and policy.strip() == "hybrid":
            if ids is None:
                raise ValueError("policy 'hybrid' needs a prompt to profile")
            policy = self.plan(ids, kv_budget=kv_budget, new_tokens=new_tokens, context=len(ids), **plan_options)
        return policy_specs(policy, self.name, self.args)

    def kv_footprint(self, specs: list[dict], prompt: int, new: int) -> int:
        """Bytes one sequence's cache takes from the memory it must fit in (engine/fit.py)."""
        return kv_tiers(self.args, self.device, self.model.head.element_size(), [(specs, prompt, new)])["device"]

    def check_kv_fits(self, runs: list[tuple[list[dict], int, int]], prefill_chunk: int = 2048) -> None:
        """Refuse, in one line and before any work, caches that cannot fit together, or beside
        which a prompt's prefill cannot run: runs are (specs, prompt tokens, new tokens), one per
        sequence (engine/fit.py)."""
        check_kv_fits(self.args, self.device, self.model.head.element_size(), runs, prefill_chunk)

    def profile_limit(self) -> int:
        """The longest prompt a profiling pass profiles whole (engine/fit.py)."""
        return profile_limit(self.args, self.device, self.model.head.element_size())

    def profile(self, prompts: list[str | list[int]], profile_tokens: int | str | None = "auto",
                cfg: ProfileConfig | None = None, kinds: str | tuple[str, ...] = "auto",
                on_layer: Callable[[int], None] | None = None) -> list[LayerStats]:
        """Per-layer attention statistics, averaged over the prompts (each cut to profile_tokens:
        "auto" = profile_limit(), None = never cut). When the policies a plan may use (`kinds`, as in
        plan()) include quant, the profile also calibrates QuantKV's errors against the token-selecting
        policies' (one batched rerun of the probe's decode steps; engine/calibrate.py). on_layer(1)
        is called after each layer of each prompt's profiling prefill (a progress bar's update)."""
        kinds = self._kinds(kinds)
        cfg = cfg or ProfileConfig(calibrate=tuple(kinds) if "quant" in kinds else ())
        stats = []
        if profile_tokens == "auto":
            profile_tokens = self.profile_limit()
        for p in prompts:
            ids = self.encode(p)
            if profile_tokens:
                ids, _ = fit_prompt(ids, profile_tokens)
            t = time.perf_counter()
            stats.append(profile_prompt(self.model, ids, cfg, progress=on_layer))
            self.log(f"profiled {len(ids)} prompt tokens in {time.perf_counter() - t:.1f} s")
        return average(stats)

    def _kinds(self, kinds: str | tuple[str, ...]) -> tuple[str, ...]:
        return plan_kinds(kinds, self.device)

    def check_budget(self, kv_budget, context: int, new_tokens: int = 32, mode: str = "hybrid",
                     kinds: str | tuple[str, ...] = "auto", floor: int = FLOOR) -> int:
        """kv_budget in bytes for a plan of `context` + new_tokens tokens; a ValueError when no `mode`
        plan can meet it (xkv-tau has no budget: not checked). Needs no profile: run it before profiling."""
        return check_kv_budget(self.args, kv_budget, context, new_tokens, self.model.head.element_size(), mode,
                               self._kinds(kinds), floor)

    def plan(self, prompt: str | list[int] | list[str] | None = None, kv_budget=0.2, new_tokens: int = 32,
             context: int | None = None, mode: str = "hybrid", kinds: str | tuple[str, ...] = "auto",
             floor: int = FLOOR, tau: float | None = None, profile_tokens: int | str | None = "auto",
             stats: list[LayerStats] | None = None, on_layer: Callable[[int], None] | None = None) -> Plan:
        """Profile the prompt(s) (or use `stats`) and plan every layer's policy for a `context`-token
        prompt (default: the prompt's length) plus `new_tokens`, under `kv_budget` device bytes: an
        int or '512MiB' (bytes), or a fraction of FullKV (0.2, '20%'). mode: hybrid (every policy,
        greedy per byte), xkv (eviction, XKV's allocation), xkv-tau (fewest tokens reaching mean
        retention tau), uniform. kinds: the policies a hybrid plan may use besides full ("auto":
        quant, evict, offload on CUDA; evict, offload on CPU, where unpacking codes costs time).
        on_layer: the profiling pass's progress, as in profile()."""
        kinds = self._kinds(kinds)
        if mode == "xkv-tau" and not (isinstance(tau, Real) and not isinstance(tau, bool) and 0 < tau <= 1):
            raise ValueError(f"mode xkv-tau needs tau, the mean retention it reaches, in (0, 1]; got {tau!r}")
        prompts = None
        if stats is None:
            if prompt is None:
                raise ValueError("plan() needs a prompt or stats")
            prompts = prompt if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) else [prompt]
            context = context or len(self.encode(prompts[0]))
        if not context:
            raise ValueError("plan() needs the context it plans for")
        full = self.full_kv_bytes(context + new_tokens)
        budget = self.check_budget(kv_budget, context, new_tokens, mode, kinds, floor)
        elem = self.model.head.element_size()
        if prompts is not None:
            stats = self.profile(prompts, profile_tokens, kinds=kinds, on_layer=on_layer)
        layers = make_plan(self.args, stats, context, new_tokens, elem, budget, mode, ProfileConfig(), floor,
                           tau, tuple(kinds))
        used = sum(o.device_bytes for o in layers)
        header = {"model": self.name, "n_layers": self.args.n_layers, "context": context, "new_tokens": new_tokens,
                  "dtype": str(self.dtype).removeprefix("torch."), "mode": mode, "kv_budget_bytes": budget,
                  "full_kv_bytes": full, "device_bytes": used,
                  "mean_quality": round(sum(o.quality for o in layers) / len(layers), 4)}
        plan = Plan(layers, header, stats)
        target = f"mean retention {tau}" if mode == "xkv-tau" else fmt_bytes(budget)  # xkv-tau has no budget
        self.log(f"plan for {target}: {fmt_bytes(used)} ({used / full:.1%} of FullKV), {plan.summary()}")
        return plan

    # ---- generation ---------------------------------------------------------------------------------------
    def stream(self, prompt, max_new_tokens: int | list[int] = 32, policy="full", kv_budget=0.2, *,
               temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
               chat: bool = False, allow_special: bool = False, ctx: int | None = None, cuda_graphs: bool = True,
               prefill_chunk: int = 2048, on_layer: Callable[[int], None] | None = None,
               on_profile_layer: Callable[[int], None] | None = None,
               on_token: Callable[[int], None] | None = None, **plan_options) -> Stream:
        """Like generate(), but returns a Stream: iterate it for text pieces as tokens come (a batch:
        (index, piece) pairs); `.output` (`.outputs`) is filled when the iteration ends. Everything
        is checked, and a hybrid's prompts profiled and planned, before this returns. Progress:
        on_profile_layer(1) after each layer of a profiling prefill, on_layer(1) after each layer
        of the prefill itself, on_token(i) after each token generated for prompt i (a piece of text
        may wait for the next token: a character split across two)."""
        batch = is_batch(prompt)
        prompts = list(prompt) if batch else [prompt]
        news = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * len(prompts)
        if len(news) != len(prompts):
            raise ValueError(f"{len(news)} max_new_tokens values for {len(prompts)} prompts")
        if any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in news):
            raise ValueError(f"max_new_tokens must be ints >= 0, got {max_new_tokens}")
        if not (isinstance(prefill_chunk, int) and not isinstance(prefill_chunk, bool) and prefill_chunk >= 1):
            raise ValueError(f"prefill_chunk must be an int >= 1, got {prefill_chunk!r}")
        sampling = SamplingParams(temperature, top_k, top_p, seed)
        unknown = sorted(set(plan_options) - PLAN_OPTIONS)  # a misspelt option would be ignored
        if unknown:
            raise ValueError(f"unknown option {', '.join(map(repr, unknown))} (the plan's options besides generate()'s "
                             f"own: {', '.join(sorted(PLAN_OPTIONS))})")
        fitted = []  # (ids, tokens cut, max_new_tokens) per prompt: all checked before any profiling
        for i, (p, new) in enumerate(zip(prompts, news)):
            try:
                ids, cut = self.fit(self.encode(p, chat, allow_special), new, ctx)
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}" if batch else str(e)) from None
            if cut:
                self.log(f"warning: prompt{f' {i}' if batch else ''} is {len(ids) + cut} tokens, over the limit "
                         f"of {len(ids)}; cut {cut} tokens from its middle")
            fitted.append((ids, cut, new))
        hybrid = isinstance(policy, str) and policy.strip() == "hybrid"  # profile and plan each prompt
        for i, (ids, _, new) in enumerate(fitted if hybrid else []):  # every budget before any profiling
            try:
                self.check_budget(kv_budget, len(ids), new, **{k: v for k, v in plan_options.items()
                                                               if k in ("mode", "kinds", "floor")})
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}" if batch else str(e)) from None
        plans = [self.plan(ids, kv_budget=kv_budget, new_tokens=new, context=len(ids), on_layer=on_profile_layer,
                           **plan_options) if hybrid else None for ids, _, new in fitted]
        specs = [self.policy_specs(plan or policy, ids, new, kv_budget) for (ids, _, new), plan in zip(fitted, plans)]
        self.check_kv_fits([(s, len(ids), new) for s, (ids, _, new) in zip(specs, fitted)], prefill_chunk)
        run = dict(on_layer=on_layer, prefill_chunk=prefill_chunk, cuda_graphs=cuda_graphs)
        return Stream(lambda s: self._pieces(s, fitted, specs, plans, batch, sampling, run, on_token))

    def generate(self, prompt, max_new_tokens: int | list[int] = 32, policy="full", kv_budget=0.2,
                 **options) -> Output | list[Output]:
        """Generate after `prompt` (text or token ids), or after each prompt of a list (a batch: one
        Output per prompt; max_new_tokens may be one value per prompt). Greedy unless temperature >
        0 (then top_p, top_k, seed apply; a batch draws from one generator, so its samples differ
        from the same prompts run alone); chat wraps text in the model's chat template;
        allow_special lets a raw prompt's "<|...|>" text be control tokens (off: user text is text);
        ctx caps the prompt (its middle is cut). See the module docstring for `policy`; kv_budget
        is hybrid's device budget (per sequence)."""
        s = self.stream(prompt, max_new_tokens, policy, kv_budget, **options)
        for _ in s:
            pass
        return s.outputs if is_batch(prompt) else s.output

    def _pieces(self, stream: Stream, fitted, specs, plans, batch: bool, sampling, run_options, on_token=None):
        from weights.stream_decoder import StreamDecoder
        eos = self.tokenizer.eos_ids
        results = [GenerationResult(len(ids)) for ids, _, _ in fitted]
        texts = [StreamDecoder(self.tokenizer) for _ in fitted]
        for b, tid in stream_batch(self.model, [f[0] for f in fitted], [f[2] for f in fitted], sampling, specs,
                                   results, eos, **run_options):
            if on_token is not None:
                on_token(b)
            piece = texts[b].push(tid) if tid not in eos else ""  # the end-of-turn token itself is not shown
            if piece:
                yield (b, piece) if batch else piece
        for b, text in enumerate(texts):
            tail = text.flush()
            if tail:
                yield (b, tail) if batch else tail
        for (ids, cut, new), plan, r in zip(fitted, plans, results):
            stream.outputs.append(Output(
                text=self.tokenizer.decode([t for t in r.generated_ids if t not in eos]),
                token_ids=r.generated_ids, prompt_tokens=len(ids), prefill_s=r.prefill_s,
                decode_ms_per_token=r.decode_ms_per_token, kv_bytes=r.kv_bytes(),
                full_kv_bytes=self.full_kv_bytes(len(ids) + new),  # caches hold room for every new token
                layers=[p.describe() for p in r.policies], stop_reason=r.stop_reason,
                cuda_graphs=r.cuda_graphs, decode_steps=len(r.decode_times_s),
                h2d_bytes=sum(p.transfer_bytes() for p in r.policies), prompt_cut=cut, plan=plan))
        stream.output = stream.outputs[0]
