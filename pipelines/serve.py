"""Online serving: an OpenAI-compatible chat API over CLI adapters on Ray Serve (``crosslayer serve``).

One Serve application, two deployments:
  HTTP ──> OpenAIIngress (pipelines.serve_ingress: auth, limits, parsing, images, SSE, /metrics)
              │ DeploymentHandle, one streamed call per request
              ▼
           VLMModel (pipelines.serve_model: one base, loaded once, + every adapter over it; a continuously
                     batching engine, pipelines.serve_engine; autoscaled)
The parts: ``serve_api`` (ServeConfig, ApiError, ChatJob, the stream's events), ``serve_request`` (a request body
-> ChatJob), ``serve_images`` (image URLs -> images), ``serve_metrics`` (Prometheus), ``serve_scheduler`` (the
engine driven from asyncio). This file builds the application (``app_builder`` is the ``import_path`` target of
``cluster/serve/config.yaml``, for ``serve run`` / ``serve deploy``) and holds the command.
"""

import argparse
import dataclasses
import sys
from typing import Any

from ray import serve

from .serve_api import ServeConfig
from .serve_ingress import OpenAIIngress
from .serve_model import VLMModel

__all__ = ["ServeConfig", "app_builder", "build_app", "cmd_serve", "register"]


def build_app(cfg: ServeConfig) -> serve.Application:
    """The Serve application: OpenAIIngress -> VLMModel, options from the config (a Serve config's
    ``deployments[]`` entries override them)."""
    cfg = cfg.resolved()
    cfg.check_served()
    actor: dict[str, Any] = {"num_cpus": cfg.num_cpus}
    gpus = cfg.gpus()
    if gpus > 0:
        actor["num_gpus"] = gpus
    model = VLMModel.options(
        max_ongoing_requests=cfg.max_ongoing_requests, ray_actor_options=actor,
        autoscaling_config={"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                            "target_ongoing_requests": cfg.target_ongoing_requests},
    ).bind(cfg)
    ingress = OpenAIIngress.options(num_replicas=cfg.ingress_replicas,
                                    max_ongoing_requests=max(100, cfg.max_ongoing_requests),
                                    ray_actor_options={"num_cpus": cfg.ingress_num_cpus})
    return ingress.bind(cfg, model)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """``import_path`` target for Serve configs: ``args`` are ServeConfig fields."""
    return build_app(ServeConfig.from_dict(dict(args or {})))


def cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    import ray

    cfg = ServeConfig.from_yaml(args.config) if args.config else ServeConfig()
    overrides = {"adapters": args.adapter or cfg.adapters, "base": args.base or cfg.base,
                 "include_base": args.include_base or cfg.include_base}
    cfg = dataclasses.replace(cfg, **overrides).resolved()
    if cfg.read_api_key() is not None:  # the replicas must find it too (env inherited locally, or api_key_file)
        cfg = dataclasses.replace(cfg, require_api_key=True)
    elif args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"crosslayer serve: warning: no API key (set ${cfg.api_key_env} or api_key_file); anyone who can "
              f"reach {args.host}:{args.port} can use the API", file=sys.stderr)
    app = build_app(cfg)
    if not ray.is_initialized():
        ray.init()
    stop = threading.Event()
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(app, name="crosslayer", route_prefix="/")
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        print(f"crosslayer serve: http://{args.host}:{args.port}/v1 models {cfg.model_ids}, "
              f"API key {'required' if cfg.require_api_key else 'off'} (Ctrl-C to stop)", flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        print("crosslayer serve: shutting down", flush=True)
        stop_within(SHUTDOWN_S)
    return 0


SHUTDOWN_S = 5.0  # a stop signal ends the command within this (plus about a second to kill), whatever Ray does


def stop_within(seconds: float) -> None:
    """Shut Serve and Ray down, in order, for at most ``seconds``; then kill what is left of the processes this
    command started and leave at once.

    Why the bound: a SIGTERM sent to the command's process group also reaches the local Ray cluster's GCS and
    raylet (``ray.init`` starts them in the command's group); after streaming traffic the GCS stops answering
    while it drains, so ``serve.shutdown`` waited 30 s for the controller and ``ray.shutdown`` then hung. Requests
    still running are finished by Serve's graceful shutdown when it completes in time, else cancelled with it."""
    import os
    import threading

    import psutil
    import ray

    done = threading.Event()

    def orderly() -> None:
        try:
            serve.shutdown()
            ray.shutdown()
        except Exception as err:  # noqa: BLE001 (the bound below ends the command either way)
            print(f"crosslayer serve: shutdown error: {err}", file=sys.stderr, flush=True)
        finally:
            done.set()

    threading.Thread(target=orderly, name="crosslayer-shutdown", daemon=True).start()
    if done.wait(seconds):
        return
    print(f"crosslayer serve: Ray did not stop within {seconds:.0f} s; stopping its local processes",
          file=sys.stderr, flush=True)
    children = psutil.Process().children(recursive=True)  # only the processes this command started
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(children, timeout=1.0)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve adapters over an OpenAI-compatible API on Ray Serve")
    p.add_argument("--adapter", action="append", metavar="[ID=]DIR",
                   help="adapter folder, repeatable; the model id is the folder name unless ID= is given")
    p.add_argument("--base", help="base preset, hub id, folder or s3:// prefix (default: the adapters' base)")
    p.add_argument("--include-base", action="store_true", help="also serve the bare base under its name")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (0.0.0.0 to listen on every interface)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--config", help="YAML of ServeConfig fields, or a Serve config (first application's args)")
    p.set_defaults(func=cmd_serve)
