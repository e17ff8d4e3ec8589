"""What pricing a request costs on the request path.

Per request the edge asks `PriceBook.cost(upstream, model, usage)`: a dict lookup of the cached
rates plus `policies.pricing.cost_usd`. Compared here with the uncached path (the genai-prices
table's own `calc_price` for the same usage, which is what a naive per-request lookup would pay)
and with the first lookup of a model (table match, done once per model).

    .venv/bin/python bench/pricing_cost.py            # writes bench/results/pricing_cost.md
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genai_prices import Usage, calc_price  # noqa: E402

from policies.pricing import TokenUsage  # noqa: E402
from proxy.config import build_config, find_model_settings  # noqa: E402
from proxy.decision.prices import PriceBook, load_table  # noqa: E402

ITERATIONS = 50_000
USAGE = TokenUsage(input_tokens=1834, output_tokens=412, cache_read_tokens=1024, reasoning_tokens=128)


def _per_call_us(fn: object, n: int) -> list[float]:
    """Median of 5 rounds of n calls, in µs per call (and the rounds)."""
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()  # type: ignore[operator]
        rounds.append((time.perf_counter() - t0) / n * 1e6)
    return rounds


def main() -> None:
    t0 = time.perf_counter()
    load_table()
    load_s = time.perf_counter() - t0
    cfg = build_config({"upstreams": [{"name": "openai", "base_url": "https://api.openai.com/v1",
                                        "models_config": [{"pattern": "ft:*", "input_price_per_mtok": 3.0, "output_price_per_mtok": 12.0}]}]},
                       environ={})
    up = cfg.upstreams[0]
    book = PriceBook(cfg.upstreams, lambda _u, m: find_model_settings(up, m))
    t0 = time.perf_counter()
    book.rates("openai", "gpt-4o-mini")
    first_ms = (time.perf_counter() - t0) * 1e3
    cached = _per_call_us(lambda: book.cost("openai", "gpt-4o-mini", USAGE), ITERATIONS)
    override = _per_call_us(lambda: book.cost("openai", "ft:gpt-4o:acme", USAGE), ITERATIONS)
    table_usage = Usage(input_tokens=USAGE.input_tokens, output_tokens=USAGE.output_tokens, cache_read_tokens=USAGE.cache_read_tokens)
    naive = _per_call_us(lambda: calc_price(table_usage, "gpt-4o-mini", provider_id="openai"), 2_000)
    lines = [
        "# Pricing a request (bench/pricing_cost.py)",
        "",
        f"Python {platform.python_version()} on {platform.machine()}; median of 5 rounds (all rounds in brackets).",
        "",
        "| what | cost |",
        "|---|---|",
        f"| `PriceBook.cost` per request, table-priced model (cached rates) | {statistics.median(cached):.2f} µs {[round(x, 2) for x in cached]} |",
        f"| `PriceBook.cost` per request, configured price (cached) | {statistics.median(override):.2f} µs {[round(x, 2) for x in override]} |",
        f"| genai-prices `calc_price` per call (no cache: what a per-request lookup would pay) | {statistics.median(naive):.1f} µs {[round(x, 1) for x in naive]} |",
        f"| first lookup of a model (table match, once per model) | {first_ms:.2f} ms |",
        f"| loading the table (once per process, in `Runtime.start`, off the event loop) | {load_s * 1e3:.0f} ms |",
        "",
    ]
    out = Path(__file__).parent / "results" / "pricing_cost.md"
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
