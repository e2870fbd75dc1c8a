"""`ray-sft`: the only place that parses argv. Each verb maps onto one module; exit 2 is a bad spec or input."""

from __future__ import annotations

import argparse
import logging
import sys

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


def _spec_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="job spec YAML (see jobs/)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="override spec fields")


def _address_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join ('auto', 'ray://host:10001'); default: a private local cluster")



def _serving_verbs(verbs) -> None:
    generate = verbs.add_parser("generate", help="the recipe's inference with an adapter, locally (no Ray)")
    generate.add_argument("prompt", help="the instruction; it is rendered with the run's inference template")
    generate.add_argument("--adapter", required=True, help="adapter folder (e.g. runs/NAME/adapter)")
    generate.add_argument("--base", default=None, help="base model; default: the one recorded in the adapter")
    generate.add_argument("--merge", action="store_true", help="fold the adapter into a dense copy of the base")
    generate.add_argument("--max-new-tokens", type=int, default=None)
    generate.add_argument("--repetition-penalty", type=float, default=None)
    generate.add_argument("--temperature", type=float, default=None, help="> 0 samples; default: greedy")
    generate.add_argument("--top-p", type=float, default=None)

    serve = verbs.add_parser("serve", help="OpenAI-compatible adapter serving on Ray Serve")
    serve.add_argument("spec", nargs="?", help="job spec: serve its run's best (or final) adapter")
    serve.add_argument("overrides", nargs="*", metavar="key.path=value", help="override spec fields")
    serve.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", help="repeatable")
    serve.add_argument("--base", default=None, help="base model; default: the one recorded in the adapters")
    serve.add_argument("--host", default=None, help="default: serve.host (127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="default: serve.port (8000)")
    _address_arg(serve)
    serve.add_argument("--detach", action="store_true", help="leave the app running on the --address cluster")
    serve.add_argument("--stop", action="store_true", help="remove the app from the --address cluster")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ray-sft", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)

    validate = verbs.add_parser("validate", help="check a job spec and print it resolved")
    _spec_args(validate)

    train = verbs.add_parser("train", help="distributed QLoRA SFT on Ray Train")
    _spec_args(train)
    _address_arg(train)
    train.add_argument("--resume", action="store_true", help="continue the run's latest checkpoint")

    tune = verbs.add_parser("tune", help="hyperparameter search on Ray Tune (the spec's tune section)")
    _spec_args(tune)
    _address_arg(tune)
    tune.add_argument("--resume", action="store_true", help="continue an interrupted search; finished trials stay")
    _serving_verbs(verbs)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from ray_sft.data import DataError
    from ray_sft.spec import SpecError

    try:
        return VERBS[args.verb](args)
    except SpecError as exc:
        print(exc, file=sys.stderr)
        return EXIT_BAD_INPUT
    except (DataError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def cmd_validate(args) -> int:
    from ray_sft import spec

    print(spec.to_yaml(spec.load(args.spec, args.overrides)), end="")
    return 0


def cmd_train(args) -> int:
    from ray_sft import cluster, spec, train

    job = spec.load(args.spec, args.overrides)
    try:
        with cluster.connect(args.address):
            outcome = train.fit(job, resume=args.resume)
    except train.TrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"adapter: {outcome.adapter_dir}")
    print("final: " + ", ".join(f"{k}={v:.4g}" for k, v in outcome.metrics.items()
                                if k in ("loss", "eval_loss", "step")))
    return 0


def cmd_tune(args) -> int:
    from ray_sft import cluster, spec, train, tune

    job = spec.load(args.spec, args.overrides)
    tune.check(job)  # spec errors (exit 2) before connecting to Ray or starting any trial
    try:
        with cluster.connect(args.address):
            outcome = tune.search(job, resume=args.resume)
    except (tune.TuneError, train.TrainError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if outcome.best:
        print(f"best: trial {outcome.best['trial_id']} {outcome.best['metric']}={outcome.best['value']:.4g} "
              f"params {outcome.best['params']}")
        print(f"adapter: {outcome.best['adapter']}")
    if outcome.failed or not outcome.best:
        print(f"error: {len(outcome.failed)} trial(s) failed ({', '.join(outcome.failed)}), "
              f"{'no' if not outcome.best else 'a'} best adapter; continue with --resume", file=sys.stderr)
        return EXIT_FAILED
    return 0


def cmd_generate(args) -> int:
    from ray_sft import generate

    loaded = generate.load(args.adapter, base=args.base, merge=args.merge)
    settings = generate.with_overrides(
        loaded.spec.generation, max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty,
        do_sample=None if args.temperature is None else args.temperature > 0,
        temperature=args.temperature or None, top_p=args.top_p)
    print(generate.generate(loaded, args.prompt, settings).text)
    return 0


def cmd_serve(args) -> int:
    from ray_sft import cluster, serve

    if (args.detach or args.stop) and not args.address:
        print("error: --detach and --stop need --address (an embedded cluster ends with this process)", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        if args.stop:
            with cluster.connect(args.address):
                serve.stop()
            return 0
        job, base, adapters = serve.targets(args.spec, args.overrides, args.adapter, args.base)
        host, port = args.host or job.serve.host, args.port or job.serve.port
        key = serve.api_key(job, host)
        with cluster.connect(args.address):
            url = serve.start(host, port)
            serve.deploy(job, base, adapters, key)
            print(f"serving {', '.join(adapters)} on {url}/v1" + ("" if args.detach else " (Ctrl-C stops)"),
                  flush=True)
            if not args.detach:
                serve.run_until_interrupted()
    except serve.ServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


VERBS = {"validate": cmd_validate, "train": cmd_train, "tune": cmd_tune, "generate": cmd_generate,
         "serve": cmd_serve}

if __name__ == "__main__":
    sys.exit(main())
