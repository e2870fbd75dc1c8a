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


VERBS = {"validate": cmd_validate, "train": cmd_train, "tune": cmd_tune}

if __name__ == "__main__":
    sys.exit(main())
