"""The `raymoe` command line: `raymoe serve | generate | status | plan | replay`."""

from __future__ import annotations

import argparse
import os
import sys

from raymoe import __version__, logs
from raymoe.cli_format import DefaultsHelpFormatter
from raymoe.engine.spec import SPECULATIVE_NAMES
from raymoe.errors import RaymoeError
from raymoe.extras import missing_extra_message

LOG_LEVELS = ("debug", "info", "warning", "error")

API_KEY_ENV = "RAYMOE_API_KEY"


def _generate(args: argparse.Namespace) -> int:
    from raymoe.engine.llm import LLM
    from raymoe.engine.sampling_params import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed
    )
    llm = LLM(model=args.model, dtype=args.dtype, threads=args.threads, device=args.device,
              speculative=args.speculative, num_speculative_tokens=args.num_speculative_tokens)
    for delta in llm.generate_stream(args.prompt, params):
        sys.stdout.write(delta.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from raymoe.config import load_config, parse_config
    from raymoe.serve.app import serve_forever

    data = load_config(args.config).model_dump()
    if args.model is not None:
        data["model"] = args.model
    flags = {"host": args.host, "port": args.port, "api_key": api_key(args)}
    data["serve"].update({k: v for k, v in flags.items() if v is not None})
    if args.threads is not None:
        data["engine"]["threads"] = args.threads
    if args.device is not None:
        data["engine"]["device"] = args.device
    serve_forever(parse_config(data, "command line and config"), address=args.address)
    return 0


def api_key(args: argparse.Namespace) -> str | None:
    """The key from --api-key, else --api-key-file (its first line), else RAYMOE_API_KEY; None:
    the config's. A file or the environment keeps the key out of `ps`."""
    import os

    from raymoe.errors import ConfigError

    if args.api_key is not None:
        return args.api_key
    if getattr(args, "api_key_file", None) is not None:
        try:
            lines = open(args.api_key_file, encoding="utf-8").read().splitlines()
        except OSError as e:
            raise ConfigError(f"cannot read --api-key-file {args.api_key_file}: {e.strerror}") from None
        return lines[0] if lines else ""
    return os.environ.get(API_KEY_ENV)


def _status(args: argparse.Namespace) -> int:
    import json

    from raymoe.client import Client
    from raymoe.client.status import format_status

    with Client(args.url, api_key=api_key(args), timeout=30) as client:
        status = client.cluster().model_dump()
    print(json.dumps(status, indent=1) if args.json else format_status(status))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from raymoe.policies.cli import plan_main

    return plan_main(args.rest) or 0


def _replay(args: argparse.Namespace) -> int:
    from raymoe.replay_run import replay_main

    return replay_main(args.rest) or 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", choices=LOG_LEVELS, default=argparse.SUPPRESS,
                        help="what raymoe logs to stderr (default: info)")
    parser = argparse.ArgumentParser(prog="raymoe", description="Elastic Mixture-of-Experts serving on Ray.",
                                     formatter_class=DefaultsHelpFormatter, parents=[common])  # fmt: skip
    parser.set_defaults(log_level="info")
    parser.add_argument("--version", action="version", version=f"raymoe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, formatter_class=DefaultsHelpFormatter, parents=[common], **kwargs)

    srv = add("serve", help="serve the model over OpenAI-compatible HTTP on Ray Serve")
    srv.add_argument("--model", default=None, help="Hugging Face MoE checkpoint folder (default: built-in model)")
    srv.add_argument("--config", default=None, help="raymoe YAML config (the same file the manifests embed)")
    srv.add_argument("--host", default=None, help="address to bind (default 127.0.0.1, or the config's)")
    srv.add_argument("--port", type=int, default=None, help="HTTP port (default 8000, or the config's)")
    srv.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1 and /admin "
                     f"(visible in `ps`: prefer --api-key-file or {API_KEY_ENV})")  # fmt: skip
    srv.add_argument("--api-key-file", default=None, help="read the API key from this file's first line")
    srv.add_argument("--address", default=None, help="join this Ray cluster (e.g. auto) instead of starting one")
    srv.add_argument("--threads", type=int, default=None,
                     help="torch threads per engine (default: the CPUs its replica reserves, decode.num_cpus)")
    srv.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None,
                     help="engine.device (default: the config's, auto: CUDA where a replica sees a GPU)")
    srv.set_defaults(func=_serve)

    gen = add("generate", help="generate text from a prompt, streamed to stdout (greedy unless --temperature > 0)",
              description="Generate text from a prompt, streamed to stdout. The command line decodes greedily "
                          "by default (--temperature 0); raymoe.SamplingParams and the HTTP API default to "
                          "temperature 1.0, as OpenAI's.")  # fmt: skip
    gen.add_argument("prompt")
    gen.add_argument("--model", default=None, help="Hugging Face MoE checkpoint folder (default: built-in model)")
    gen.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep this share of probability")
    gen.add_argument("--top-k", type=int, default=-1, help="sample among the k likeliest tokens; -1 = all")
    gen.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    gen.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                     help="weights' dtype (auto: float32 on CPU, bfloat16 on CUDA)")
    gen.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to compute (auto: "
                     "CUDA when this torch sees a GPU)")  # fmt: skip
    gen.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    gen.add_argument("--speculative", choices=list(SPECULATIVE_NAMES), default="none",
                     help="draft tokens from the request itself and verify them in the decode step (same output)")
    gen.add_argument("--num-speculative-tokens", type=int, default=None,
                     help="draft tokens per step at most (default: the drafter's)")
    gen.set_defaults(func=_generate)

    st = add("status", help="a running server's nodes, workers, shards, epoch and scaling decisions")
    st.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    st.add_argument("--api-key", default=None, help=f"the server's API key, if it has one (default: ${API_KEY_ENV})")
    st.add_argument("--json", action="store_true", help="print the raw /admin/cluster document")
    st.set_defaults(func=_status)

    plan = sub.add_parser("plan", help="plan expert placement on a routing trace (see `raymoe plan --help`)",
                          add_help=False)  # fmt: skip
    plan.add_argument("rest", nargs=argparse.REMAINDER)
    plan.set_defaults(func=_plan)

    rep = sub.add_parser("replay", help="replay a routing trace through a live local cluster and measure placement "
                         "(see `raymoe replay --help`)", add_help=False)  # fmt: skip
    rep.add_argument("rest", nargs=argparse.REMAINDER)
    rep.set_defaults(func=_replay)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["plan"], ["replay"]):  # their own parsers read every flag after them, but --log-level
        level = argparse.ArgumentParser(add_help=False)
        level.add_argument("--log-level", choices=LOG_LEVELS, default="warning" if argv[0] == "plan" else "info")
        known, rest = level.parse_known_args(argv[1:])
        func = _plan if argv[0] == "plan" else _replay
        args = argparse.Namespace(command=argv[0], rest=rest, func=func, log_level=known.log_level)
    else:
        args = build_parser().parse_args(argv)
    logs.configure(args.log_level)
    os.environ[logs.LEVEL_ENV] = args.log_level  # Ray actors started from here log at it too
    try:
        return args.func(args)
    except RaymoeError as e:
        print(f"raymoe {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        message = missing_extra_message(e)
        if message is None:
            raise
        print(f"raymoe {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
