"""OpenAI-compatible HTTP server around `proxy.demo.simulator`: a stand-in LLM with a known truth.

Endpoints:
  POST /v1/chat/completions, POST /v1/completions   (non-streaming and SSE streaming)
  POST /v1/responses (OpenAI Responses), POST /v1/messages (Anthropic Messages), both
       streamed and not, in the shapes of proxy/demo/wire.py
  GET  /v1/models
  GET  /sim/truth?temperature=0.7&max_tokens=512     ground truth around that baseline
  GET/POST /sim/faults  {"error_rate": 0.1, "error_status": 500, "extra_latency_s": 0.2}

Judge mode: a model whose name starts with `sim-judge` answers judge prompts (built by
`proxy.learning.judge.build_prompt`) with `{"score": s, "reason": ...}`, where
s = round(1 + 9 * clip(q + N(0, judge_noise²), 0, 1)) and q is the hidden (true) quality of
the judged answer: the simulator remembers the true quality of its recent answers by a
hash of their text (bounded; every answer's first word is its serial number, so two answers
of the same length still differ). An answer it does not remember is scored from q = 0.5.
So a judge configured against the simulator behaves like a real, imperfect judge.
`sim-judge-length` is the same judge with the length bias of real LLM judges: it adds
`LENGTH_BIAS` quality per doubling of the answer's length (in words, around `LENGTH_PIVOT`) before
rounding, so within one arm it scores longer answers higher (`policies/judge_bias.py` detects it).
Pairwise judge prompts (`proxy.learning.judge.build_pairwise_prompt`) get
`{"preference": "A" | "B" | "tie"}`: each answer's hidden quality plus its own N(0, judge_noise²),
"tie" when the two noisy values differ by less than `PAIRWISE_TIE`, else the higher one.

The task type comes from the `x-task-type` header, else from keywords in the system
prompt (code / creative / summarise), else "default".  The natural answer length is a
deterministic function of the prompt text and the seed, so the same prompt always wants
the same length.  Responses sleep for the simulated latency times `time_scale`
(0 = instant; streaming spreads it: TTFT before the first chunk, the rest across chunks).

Reasoning effort (chat `reasoning_effort`, Responses `reasoning.effort`, Messages
`output_config.effort`) moves the outcome as `SimulatorTruth` describes: more effort, more
output tokens and latency, and quality up on hard tasks with diminishing returns. An
effort the format does not accept is a 400, as the real APIs answer.

Every response carries the truth in headers so a demo can post explicit feedback:
`x-sim-task-type`, `x-sim-quality` (observed), `x-sim-true-quality`, `x-sim-natural-tokens`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import secrets
import socket
import time
from collections import OrderedDict
from statistics import NormalDist
from typing import Any

import msgspec
import numpy as np
from aiohttp import web

from policies.arms import candidate_arms
from policies.context import estimate_prompt_tokens
from policies.effort import ANTHROPIC_EFFORTS, OPENAI_EFFORTS
from policies.records import Arm
from policies.settings import ArmGridSettings
from proxy.demo.simulator import SimOutcome, SimulatorTruth
from proxy.demo.wire import anthropic_body, anthropic_error, anthropic_events, responses_body, responses_events
from proxy.learning import extract_answer, extract_pair

DEFAULT_MODELS: tuple[str, ...] = ("sim-1", "sim-1-mini")
DEFAULT_MAX_TOKENS = 4096
JUDGE_PREFIX = "sim-judge"
JUDGE_NOISE = 0.1  # standard deviation of the simulated judge's error, in quality units
LENGTH_JUDGE = "sim-judge-length"  # the length-biased judge (module docstring)
LENGTH_BIAS = 0.25  # quality added per doubling of the answer's length by `sim-judge-length`
LENGTH_PIVOT = 256  # words at which the length-biased judge adds nothing
PAIRWISE_TIE = 0.02  # noisy qualities closer than this are a tie for the simulated pairwise judge
MAX_REMEMBERED_ANSWERS = 50_000
STREAM_CHUNKS = 8
WORDS = (
    "the", "model", "returns", "a", "plausible", "answer", "with", "enough", "detail", "to",
    "be", "useful", "and", "each", "word", "counts", "as", "one", "token", "here",
)  # fmt: skip
_KEYWORDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("code", ("code", "program", "python", "function", "developer", "bug")),
    ("summarise", ("summar", "tl;dr", "condense")),
    ("creative", ("story", "poem", "creative", "fiction", "lyrics")),
)
_STD_NORMAL = NormalDist()


class Faults(msgspec.Struct):
    """Fault injection, settable at start and through POST /sim/faults."""

    error_rate: float = 0.0
    error_status: int = 500
    extra_latency_s: float = 0.0


class SimulatorHandle:
    """A running simulator: `.port`, `.url` (ending in /v1), `await close()`."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, faults: Faults, truth: SimulatorTruth) -> None:
        self._runner = runner
        self.host = host
        self.port = port
        self.faults = faults
        self.truth = truth

    @property
    def url(self) -> str:
        """Base URL for OpenAI clients."""
        return f"http://{self.host}:{self.port}/v1"

    async def close(self) -> None:
        """Stop serving."""
        await self._runner.cleanup()


def _text_of(body: dict[str, Any]) -> tuple[str, str]:
    """(system prompt, all prompt text) of a chat, completions, Responses or Messages body."""
    system_parts: list[str] = []
    parts: list[str] = []
    for key in ("system", "instructions"):  # Messages' `system`, Responses' `instructions`
        extra = body.get(key)
        if extra is not None:
            text = extra if isinstance(extra, str) else json.dumps(extra, default=str)
            system_parts.append(text)
            parts.append(text)
    if isinstance(body.get("input"), str):
        parts.append(body["input"])
    messages = body.get("messages", body.get("input"))
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, dict):
                continue
            content = message.get("content")
            text = content if isinstance(content, str) else json.dumps(content, default=str)
            parts.append(text)
            if message.get("role") in ("system", "developer"):
                system_parts.append(text)
    prompt = body.get("prompt")
    if prompt is not None:
        parts.append(prompt if isinstance(prompt, str) else json.dumps(prompt))
    return "\n".join(system_parts), "\n".join(parts)


def infer_task_type(header: str | None, system_prompt: str, truth: SimulatorTruth) -> str:
    """Task type from the header, else system-prompt keywords, else "default"."""
    if header:
        return header.strip().lower()
    lowered = system_prompt.lower()
    for task, words in _KEYWORDS:
        if task in truth.tasks and any(word in lowered for word in words):
            return task
    return "default"


def _prompt_score(text: str, seed: int) -> float:
    """Deterministic standard-normal score of a prompt (drives its natural length)."""
    digest = hashlib.blake2b(f"{seed}:{text}".encode(), digest_size=8).digest()
    u = (int.from_bytes(digest, "big") + 0.5) / 2**64
    return _STD_NORMAL.inv_cdf(u)


def _number(value: Any, default: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return default
    return float(value)


def requested_effort(body: dict[str, Any], fmt: str) -> tuple[str | None, str | None]:
    """(effort level or None when absent, error message or None) from the format's own field."""
    if fmt == "anthropic":
        holder, field, levels = body.get("output_config"), "output_config.effort", ANTHROPIC_EFFORTS
    elif fmt == "responses":
        holder, field, levels = body.get("reasoning"), "reasoning.effort", OPENAI_EFFORTS
    else:
        holder, field, levels = {"effort": body.get("reasoning_effort")}, "reasoning_effort", OPENAI_EFFORTS
    value = holder.get("effort") if isinstance(holder, dict) else None
    if value is None:
        return None, None
    if value not in levels:
        return None, f"{field} must be one of {', '.join(levels)}"
    return str(value), None


def _words(n: int, serial: int = 0) -> list[str]:
    """`n` words; the first is the answer's serial number, so two answers of the same length differ
    (the judge mode recognises answers by their text, and a pairwise prompt holds two answers to one prompt)."""
    words = [WORDS[i % len(WORDS)] for i in range(n)]
    if words:
        words[0] = f"a{serial}"
    return words


def _content(outcome: SimOutcome, natural: int, json_mode: bool, serial: int = 0) -> str:
    """Answer text with exactly `completion_tokens` words; JSON mode is valid JSON unless cut."""
    if not json_mode:
        return " ".join(_words(outcome.completion_tokens, serial))
    full = json.dumps({"answer": " ".join(_words(natural, serial))})
    if outcome.finish_reason != "length":
        return full
    return full[: max(1, len(full) * outcome.completion_tokens // natural)]


def _error(status: int, message: str, kind: str = "invalid_request_error") -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "param": None, "code": None}}, status=status)


def _shape_problem(body: Any, *, chat: bool, fmt: str) -> str | None:
    """What a real API would refuse in the request's shape (the simulator's 400 message), None when it is fine."""
    if not isinstance(body, dict):
        return "request body must be a JSON object"
    if fmt == "responses" and body.get("input") is None:
        return "'input' is required"
    if chat and not isinstance(body.get("messages"), list):
        return "'messages' is required"
    if not chat and fmt == "openai" and body.get("prompt") is None:
        return "'prompt' is required"
    if fmt == "anthropic" and not isinstance(body.get("max_tokens"), int):
        return "max_tokens: Field required"
    return None


def _openai_payload(*, chat: bool, ident: str, created: int, model: str, content: str, outcome: SimOutcome,
                    usage: dict[str, int]) -> dict[str, Any]:
    """A whole (not streamed) chat or legacy completion, shaped as OpenAI sends it."""
    if chat:
        payload = {
            "id": ident,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "refusal": None},
                    "logprobs": None,
                    "finish_reason": outcome.finish_reason,
                }
            ],
            "usage": usage,
            "system_fingerprint": "fp_thermostat_sim",
        }
    else:
        payload = {
            "id": ident,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "text": content, "logprobs": None, "finish_reason": outcome.finish_reason}],
            "usage": usage,
        }
    return payload


class _Simulator:
    """Request handlers and their state (seeded RNG, faults, truth)."""

    def __init__(self, *, seed: int, time_scale: float, truth: SimulatorTruth, faults: Faults) -> None:
        self.seed = seed
        self.time_scale = time_scale
        self.truth = truth
        self.faults = faults
        self.rng = np.random.default_rng(seed)
        self.judge_rng = np.random.default_rng(seed + 1)  # its own stream: judging does not shift the answers' noise
        self.answers: OrderedDict[bytes, float] = OrderedDict()  # answer digest -> true quality
        self.served = 0  # answers given so far: each one's serial number is its first word

    def remember_answer(self, content: str, true_quality: float) -> None:
        key = hashlib.blake2b(content.encode(), digest_size=16).digest()
        self.answers[key] = true_quality
        self.answers.move_to_end(key)
        while len(self.answers) > MAX_REMEMBERED_ANSWERS:
            self.answers.popitem(last=False)

    def judge_score(self, body: dict[str, Any], length_bias: float = 0.0) -> tuple[int, float | None]:
        """(score 1-10, the hidden quality it came from or None when the answer is unknown).

        `length_bias`: quality added per doubling of the answer's length around `LENGTH_PIVOT` words."""
        _, text = _text_of(body)
        answer = extract_answer(text)
        q = None if answer is None else self.answers.get(hashlib.blake2b(answer.encode(), digest_size=16).digest())
        bias = length_bias * math.log2(max(1, len(answer.split())) / LENGTH_PIVOT) if answer is not None and length_bias else 0.0
        noisy = min(1.0, max(0.0, (0.5 if q is None else q) + bias + JUDGE_NOISE * float(self.judge_rng.standard_normal())))
        return int(round(1 + 9 * noisy)), q

    def _true_quality(self, answer: str) -> float | None:
        return self.answers.get(hashlib.blake2b(answer.encode(), digest_size=16).digest())

    def judge_preference(self, body: dict[str, Any]) -> tuple[str, float | None, float | None] | None:
        """("A" | "B" | "tie", hidden quality of A, of B) for a pairwise prompt; None for any other prompt."""
        _, text = _text_of(body)
        pair = extract_pair(text)
        if pair is None:
            return None
        qa, qb = (self._true_quality(answer) for answer in pair)
        noisy = [(0.5 if q is None else q) + JUDGE_NOISE * float(self.judge_rng.standard_normal()) for q in (qa, qb)]
        diff = noisy[0] - noisy[1]
        return ("tie" if abs(diff) < PAIRWISE_TIE else "A" if diff > 0 else "B"), qa, qb

    def _judge_reply(self, body: dict[str, Any], model: str) -> web.Response:
        pairwise = self.judge_preference(body)
        if pairwise is not None:
            preference, qa, qb = pairwise
            content = json.dumps({"preference": preference, "reason": "simulated pairwise judge"})
            q = None  # two hidden qualities, not one: the header stays empty
        else:
            score, q = self.judge_score(body, LENGTH_BIAS if model.startswith(LENGTH_JUDGE) else 0.0)
            content = json.dumps({"score": score, "reason": "simulated judge" if q is not None else "simulated judge: unknown answer"})
        prompt_tokens = estimate_prompt_tokens(body)
        payload = {
            "id": "chatcmpl-judge" + secrets.token_hex(8),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": None}, "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 12, "total_tokens": prompt_tokens + 12},
        }
        return web.json_response(payload, headers={"x-sim-true-quality": "" if q is None else f"{q:.6f}"})

    async def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            await asyncio.sleep(seconds)

    async def models(self, request: web.Request) -> web.Response:
        created = int(time.time())
        return web.json_response(
            {
                "object": "list",
                "data": [{"id": m, "object": "model", "created": created, "owned_by": "thermostat-sim"} for m in DEFAULT_MODELS],
            }
        )

    async def truth_view(self, request: web.Request) -> web.Response:
        try:
            baseline = Arm(
                temperature=float(request.query.get("temperature", 0.7)),
                max_tokens=int(request.query.get("max_tokens", 512)),
            )
            delta_t = float(request.query.get("max_delta_temperature", 0.2))
            delta_m = int(request.query.get("max_delta_max_tokens", 500))
        except ValueError:
            return _error(400, "temperature, max_tokens and the deltas must be numbers")
        arms = candidate_arms(baseline, max_delta_temperature=delta_t, max_delta_max_tokens=delta_m, grid=ArmGridSettings())
        return web.json_response(self.truth.describe(baseline, arms))

    async def faults_view(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            try:
                update = await request.json()
                if not isinstance(update, dict):
                    raise TypeError("expected a JSON object")
                merged = {**msgspec.to_builtins(self.faults), **update}
                new = msgspec.convert(merged, Faults)
            except (ValueError, TypeError, msgspec.ValidationError) as exc:
                return _error(400, f"bad faults: {exc}")
            if not 0 <= new.error_rate <= 1 or new.extra_latency_s < 0 or not 400 <= new.error_status <= 599:
                return _error(400, "error_rate in [0,1], extra_latency_s >= 0, error_status in 400..599")
            self.faults.error_rate = new.error_rate
            self.faults.error_status = new.error_status
            self.faults.extra_latency_s = new.extra_latency_s
        return web.json_response(msgspec.to_builtins(self.faults))

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=False)

    async def responses(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=False, fmt="responses")

    async def messages(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=True, fmt="anthropic")

    async def _complete(self, request: web.Request, *, chat: bool, fmt: str = "openai") -> web.StreamResponse:
        anthropic = fmt == "anthropic"

        def error(status: int, message: str, kind: str = "invalid_request_error") -> web.Response:
            return web.json_response(anthropic_error(status, message), status=status) if anthropic else _error(status, message, kind)

        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return error(400, "request body is not valid JSON")
        problem = _shape_problem(body, chat=chat, fmt=fmt)
        if problem is not None:
            return error(400, problem)
        requested = body.get("model")
        model: str = requested if isinstance(requested, str) else DEFAULT_MODELS[0]
        if chat and model.startswith(JUDGE_PREFIX):
            return self._judge_reply(body, model)
        faults = self.faults
        await self._sleep(faults.extra_latency_s)
        if faults.error_rate > 0 and self.rng.random() < faults.error_rate:
            return error(faults.error_status, "simulated upstream failure", "server_error")

        system_prompt, text = _text_of(body)
        task = infer_task_type(request.headers.get("x-task-type"), system_prompt, self.truth)
        temperature = _number(body.get("temperature"), 1.0)
        tokens = body.get("max_output_tokens") if fmt == "responses" else body.get("max_completion_tokens", body.get("max_tokens"))
        max_tokens = int(_number(tokens, DEFAULT_MAX_TOKENS))
        if max_tokens < 1 or not 0 <= temperature <= (1 if anthropic else 2):
            return error(400, f"max_tokens must be >= 1 and temperature in [0, {1 if anthropic else 2}]")
        effort, effort_error = requested_effort(body, fmt)
        if effort_error is not None:
            return error(400, effort_error)
        prompt_tokens = estimate_prompt_tokens(body)
        base_natural = self.truth.natural_length(task, _prompt_score(text, self.seed))
        natural = self.truth.effort_length(base_natural, effort)  # what the answer wants at this effort
        quality_z, latency_z = self.rng.standard_normal(2)
        outcome = self.truth.respond(
            task,
            Arm(temperature=temperature, max_tokens=max_tokens, effort=effort, model=model),
            natural_tokens=base_natural,
            prompt_tokens=prompt_tokens,
            quality_z=float(quality_z),
            latency_z=float(latency_z),
        )
        response_format = body.get("response_format")
        json_mode = isinstance(response_format, dict) and response_format.get("type") in ("json_object", "json_schema")
        self.served += 1
        content = _content(outcome, natural, json_mode, self.served)
        self.remember_answer(content, outcome.true_quality)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": outcome.completion_tokens,
            "total_tokens": prompt_tokens + outcome.completion_tokens,
        }
        headers = {
            "x-sim-task-type": task,
            "x-sim-quality": f"{outcome.quality:.6f}",
            "x-sim-true-quality": f"{outcome.true_quality:.6f}",
            "x-sim-natural-tokens": str(natural),
        }
        ident = ("chatcmpl-" if chat else "cmpl-") + secrets.token_urlsafe(18).replace("-", "a").replace("_", "b")
        created = int(time.time())
        if fmt != "openai":
            return await self._other_format(request, body, fmt=fmt, ident=ident.split("-", 1)[1], created=created, model=model,
                                            content=content, outcome=outcome, headers=headers)  # fmt: skip
        if body.get("stream") is True:
            stream_options = body.get("stream_options")
            include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
            return await self._stream(
                request, chat=chat, ident=ident, created=created, model=model, content=content,
                outcome=outcome, usage=usage if include_usage else None, headers=headers,
            )  # fmt: skip
        await self._sleep(outcome.latency_s * self.time_scale)
        payload = _openai_payload(chat=chat, ident=ident, created=created, model=model, content=content, outcome=outcome, usage=usage)
        return web.json_response(payload, headers=headers)

    async def _other_format(
        self,
        request: web.Request,
        body: dict[str, Any],
        *,
        fmt: str,
        ident: str,
        created: int,
        model: str,
        content: str,
        outcome: SimOutcome,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        """A Responses or Messages answer to the same simulated outcome (the chat path's truth)."""
        truncated = outcome.finish_reason == "length"
        given = body.get("input")  # Responses: a string or a list of messages
        prompt_tokens = estimate_prompt_tokens({"prompt": given} if isinstance(given, str) else {"messages": given} if isinstance(given, list) else body)
        if fmt == "anthropic":
            final = anthropic_body(ident="msg_" + ident, model=model, text=content, input_tokens=prompt_tokens,
                                   output_tokens=outcome.completion_tokens, truncated=truncated)  # fmt: skip
            events = anthropic_events
        else:
            final = responses_body(ident="resp_" + ident, model=model, text=content, input_tokens=prompt_tokens,
                                   output_tokens=outcome.completion_tokens, truncated=truncated, created=created, request=body)  # fmt: skip
            events = responses_events
        if body.get("stream") is not True:
            await self._sleep(outcome.latency_s * self.time_scale)
            return web.json_response(final, headers=headers)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **headers})
        await response.prepare(request)
        await self._sleep(outcome.ttft_s * self.time_scale)
        pieces = _split(content, STREAM_CHUNKS)
        per_piece = max(0.0, outcome.latency_s - outcome.ttft_s) * self.time_scale / max(1, len(pieces))
        for i, event in enumerate(events(final, pieces)):
            if i and b"_delta" in event[:40]:
                await self._sleep(per_piece)
            await response.write(event)
        await response.write_eof()
        return response

    async def _stream(
        self,
        request: web.Request,
        *,
        chat: bool,
        ident: str,
        created: int,
        model: str,
        content: str,
        outcome: SimOutcome,
        usage: dict[str, int] | None,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **headers})
        await response.prepare(request)
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta_text: str | None, finish: str | None, *, role: bool = False) -> bytes:
            if chat:
                delta: dict[str, Any] = {}
                if role:
                    delta["role"] = "assistant"
                if delta_text is not None:
                    delta["content"] = delta_text
                choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta_text or "", "logprobs": None, "finish_reason": finish}
            event = {"id": ident, "object": kind, "created": created, "model": model, "choices": [choice]}
            if usage is not None:
                event["usage"] = None
            return b"data: " + json.dumps(event).encode() + b"\n\n"

        await self._sleep(outcome.ttft_s * self.time_scale)
        pieces = _split(content, STREAM_CHUNKS)
        await response.write(chunk("" if chat else None, None, role=True) if chat else chunk(pieces[0] if pieces else "", None))
        rest = pieces if chat else pieces[1:]
        per_piece = max(0.0, outcome.latency_s - outcome.ttft_s) * self.time_scale / max(1, len(rest))
        for piece in rest:
            await self._sleep(per_piece)
            await response.write(chunk(piece, None))
        await response.write(chunk(None if chat else "", outcome.finish_reason))
        if usage is not None:
            final = {"id": ident, "object": kind, "created": created, "model": model, "choices": [], "usage": usage}
            await response.write(b"data: " + json.dumps(final).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


SIMULATOR_KEY: web.AppKey[_Simulator] = web.AppKey("simulator", _Simulator)


def _split(text: str, parts: int) -> list[str]:
    """`text` in up to `parts` contiguous pieces (concatenation gives back `text`)."""
    if not text:
        return []
    size = max(1, -(-len(text) // parts))
    return [text[i : i + size] for i in range(0, len(text), size)]


def create_app(
    *, seed: int = 0, time_scale: float = 1.0, truth: SimulatorTruth | None = None, faults: Faults | None = None
) -> web.Application:
    """The aiohttp application (for embedding; `start_simulator` runs it)."""
    sim = _Simulator(seed=seed, time_scale=time_scale, truth=truth or SimulatorTruth(), faults=faults or Faults())
    app = web.Application(client_max_size=32 * 1024 * 1024)
    app.router.add_post("/v1/chat/completions", sim.chat)
    app.router.add_post("/v1/completions", sim.completions)
    app.router.add_post("/v1/responses", sim.responses)
    app.router.add_post("/v1/messages", sim.messages)
    app.router.add_get("/v1/models", sim.models)
    app.router.add_get("/sim/truth", sim.truth_view)
    app.router.add_get("/sim/faults", sim.faults_view)
    app.router.add_post("/sim/faults", sim.faults_view)
    app[SIMULATOR_KEY] = sim
    return app


async def start_simulator(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    seed: int = 0,
    time_scale: float = 1.0,
    truth: SimulatorTruth | None = None,
    error_rate: float = 0.0,
    error_status: int = 500,
    extra_latency_s: float = 0.0,
    sock: socket.socket | None = None,
) -> SimulatorHandle:
    """Start the simulator on `host:port` (0 = any free port), or on an already bound `sock`, in the running event loop."""
    faults = Faults(error_rate=error_rate, error_status=error_status, extra_latency_s=extra_latency_s)
    app = create_app(seed=seed, time_scale=time_scale, truth=truth, faults=faults)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site: web.BaseSite
    if sock is not None:
        host = sock.getsockname()[0]
        site = web.SockSite(runner, sock)
    else:
        site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server  # aiohttp exposes the bound port only through the server sockets
    sockets = getattr(server, "sockets", None) or []
    bound = sockets[0].getsockname()[1] if sockets else port
    return SimulatorHandle(runner, host, int(bound), faults, app[SIMULATOR_KEY].truth)


def run(*, sock: socket.socket, seed: int = 0, time_scale: float = 1.0) -> None:
    """Serve on the bound `sock` until interrupted (`thermostat simulate --port P`)."""
    web.run_app(create_app(seed=seed, time_scale=time_scale), sock=sock, access_log=None)
