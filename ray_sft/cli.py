"""`ray-sft`: the only place that parses argv. Each verb maps onto one module; exit 2 is a bad spec or input."""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


DESCRIPTION = """QLoRA supervised fine-tuning, hyperparameter search and adapter serving on Ray.

A YAML job spec (see jobs/) describes a run; `section.field=value` after it overrides any field.
Exit codes: 0 done, 1 the run failed, 2 bad input (spec, data, flags, address), found before any work starts."""

FIRST_STEPS = """examples:
  ray-sft run jobs/quickstart-tune.yaml   the whole pipeline on the bundled tiny job: search, serve, sample
  ray-sft validate jobs/quickstart.yaml   the resolved spec and a check of its data
  ray-sft VERB --help                     what a verb does, with an example"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' layout and shows a flag's default where it has one and its help does not say it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS) \
                and "default" not in text:
            text += " (default: %(default)s)"
        return text


def _verb(verbs, name: str, summary: str, description: str, example: str) -> argparse.ArgumentParser:
    return verbs.add_parser(name, help=summary, description=f"{summary}.\n\n{textwrap.fill(description, 100)}",
                            epilog=f"example:\n  {example}", formatter_class=_Formatter)


def _spec_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="job spec YAML (see jobs/)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="override spec fields")


def _verbose_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show library and Ray output on the console (default: in <run>/logs/console.log)")


def _address_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join ('auto', 'ray://host:10001'); default: a private local cluster")


def _dashboard(address: str) -> str:
    """argparse type of the Jobs API's --address: refused at once when it is not an http(s) URL."""
    from ray_sft import jobs

    try:
        return jobs.dashboard_url(address)
    except jobs.JobsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _dashboard_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", required=True, type=_dashboard,
                        help="the head's dashboard URL, e.g. http://HEAD:8265")


def _prompt(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("the prompt is empty")
    return text


def _generation_flags(parser: argparse.ArgumentParser) -> None:
    from ray_sft.spec import GenerationSpec

    recipe = GenerationSpec()  # the spec's defaults, named in the help; the adapter's run spec may differ

    def run_default(name: str) -> str:
        return f"default: the adapter's run spec, generation.{name} (spec default {getattr(recipe, name)})"

    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="tokens to generate at most; " + run_default("max_new_tokens"))
    parser.add_argument("--repetition-penalty", type=float, default=None,
                        help="> 1 discourages repeats; " + run_default("repetition_penalty"))
    parser.add_argument("--temperature", type=float, default=None, help="> 0 samples; default: greedy")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling with --temperature; "
                                                                  + run_default("top_p"))


def _remote_code_arg(parser: argparse.ArgumentParser) -> None:
    # A flag, never a value read from the adapter's folder: the folder may come from someone else.
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the base model repo's own code (never taken from the adapter's run spec)")


def _serving_verbs(verbs) -> None:
    generate = _verb(verbs, "generate", "the recipe's inference with an adapter, locally (no Ray)",
                     "Loads the base as trained (4-bit) with the adapter and answers one instruction, rendered with "
                     "the run's inference template.",
                     'ray-sft generate --adapter runs/quickstart/adapter "時間管理能力をあげるには?"')
    generate.add_argument("prompt", type=_prompt,
                          help="the instruction; it is rendered with the run's inference template")
    generate.add_argument("--adapter", required=True, help="adapter folder (e.g. runs/NAME/adapter)")
    generate.add_argument("--base", default=None, help="base model; default: the one recorded in the adapter")
    generate.add_argument("--merge", action="store_true", help="fold the adapter into a dense copy of the base")
    _generation_flags(generate)
    _remote_code_arg(generate)

    serve = _verb(verbs, "serve", "OpenAI-compatible adapter serving on Ray Serve",
                  "Serves a job's best (or final) adapter, or adapters named with --adapter, at /v1 (models, "
                  "completions, chat completions); Ctrl-C stops.",
                  "ray-sft serve --adapter quickstart=runs/quickstart/adapter")
    serve.add_argument("spec", nargs="?", help="job spec: serve its run's best (or final) adapter")
    serve.add_argument("overrides", nargs="*", metavar="key.path=value",
                       help="override spec fields (with --adapter: the adapter's run spec)")
    serve.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                       help="serve the adapter folder PATH as model NAME (repeatable)")
    serve.add_argument("--base", default=None, help="base model; default: the one recorded in the adapters")
    serve.add_argument("--host", default=None, help="default: serve.host (127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="default: serve.port (8000)")
    _address_arg(serve)
    serve.add_argument("--detach", action="store_true", help="leave the app running on the --address cluster")
    serve.add_argument("--stop", action="store_true", help="remove the app from the --address cluster")


def _pipeline_verbs(verbs) -> None:
    run = _verb(verbs, "run", "the whole pipeline: tune or train, serve the winner, print one sample",
                "Tunes when the spec has tune.search_space (else trains), serves the best adapter, prints its URL "
                "and the served completion of generation.sample_prompts[0], then removes the app and ends.",
                "ray-sft run jobs/quickstart-tune.yaml")
    _spec_args(run)
    _address_arg(run)
    _verbose_arg(run)
    serving = run.add_mutually_exclusive_group()
    serving.add_argument("--no-serve", action="store_true", help="stop after training/tuning")
    serving.add_argument("--keep-serving", action="store_true",
                         help="keep the app up after the sample until Ctrl-C (default: remove it and end)")

    submit = _verb(verbs, "submit", "submit `ray-sft train|tune|run` to a cluster via the Ray Jobs API",
                   "Validates the spec here, uploads this project as the job's working dir and runs the verb "
                   "there; prints the job id.",
                   "ray-sft submit jobs/quickstart.yaml --address http://HEAD:8265 run --follow")
    submit.add_argument("spec", help="job spec YAML inside this project (the project is the job's working dir)")
    submit.add_argument("overrides", nargs="*", metavar="[train|tune|run] key.path=value",
                        help="the verb to run (default: train), then spec overrides")
    _dashboard_arg(submit)
    submit.add_argument("--env", action="append", default=[], metavar="NAME",
                        help="pass this environment variable's value to the job by name (repeatable)")
    submit.add_argument("--pip", action="append", default=[], metavar="REQ",
                        help="pip requirement installed for the job (repeatable); default: the cluster's image")
    submit.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")

    jobs = _verb(verbs, "jobs", "list, status, logs, stop jobs on a cluster",
                 "Talks to the head's dashboard with Ray's auth token (RAY_AUTH_TOKEN or ~/.ray/auth_token).",
                 "ray-sft jobs logs raysubmit_XXXX --address http://HEAD:8265 --follow")
    jobs.add_argument("action", choices=["list", "status", "logs", "stop"], help="what to do")
    jobs.add_argument("job_id", nargs="?", help="the id `submit` printed (all but list)")
    _dashboard_arg(jobs)
    jobs.add_argument("--follow", action="store_true", help="logs: stream until the job ends")


def _publish_verbs(verbs) -> None:
    push = _verb(verbs, "push", "adapter + tokenizer + model card to the Hugging Face Hub",
                 "The token is read from the HF_TOKEN environment variable only (missing: exit 2).",
                 "HF_TOKEN=... ray-sft push --adapter runs/quickstart/adapter --repo me/tiny-ja --private")
    push.add_argument("--adapter", required=True, help="adapter folder (e.g. runs/NAME/adapter)")
    push.add_argument("--repo", default=None, help="OWNER/NAME (default: the run's output.hub_repo)")
    visibility = push.add_mutually_exclusive_group()
    visibility.add_argument("--private", dest="private", action="store_true", default=None,
                            help="a private repo (default: the run's output.hub_private, private unless set)")
    visibility.add_argument("--public", dest="private", action="store_false", help="a public repo")
    push.add_argument("--dry-run", metavar="OUT", default=None,
                      help="write exactly the files that would be uploaded to OUT and list them; upload nothing")

    export = _verb(verbs, "export", "merge the adapter into the unquantized base; check server support",
                   "Always checks for adapter features other LoRA servers reject; --merge OUT saves a model plain "
                   "transformers loads.",
                   "ray-sft export --adapter runs/quickstart/adapter --merge merged/")
    export.add_argument("--adapter", required=True, help="adapter folder")
    export.add_argument("--merge", metavar="OUT", default=None, help="save base + merged adapter to OUT")
    export.add_argument("--base", default=None, help="base model; default: the one recorded in the adapter")
    export.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                        help="dtype of the merged weights")
    export.add_argument("--max-rank", type=int, default=None, help="the target server's max LoRA rank (default 16)")
    _remote_code_arg(export)


def build_parser() -> argparse.ArgumentParser:
    from ray_sft import __version__

    parser = argparse.ArgumentParser(prog="ray-sft", description=DESCRIPTION, epilog=FIRST_STEPS,
                                     formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"ray-sft {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    validate = _verb(verbs, "validate", "check a job spec and its data, print the spec resolved",
                     "Prints every spec error at once with its dotted path, then opens the data: usable rows and "
                     "token lengths, or the problem (exit 2). Starts no cluster.",
                     "ray-sft validate jobs/quickstart.yaml training.learning_rate=1e-3")
    _spec_args(validate)

    train = _verb(verbs, "train", "distributed QLoRA SFT on Ray Train",
                  "Checks the data, then trains scaling.num_workers workers; the adapter goes to <run>/adapter.",
                  "ray-sft train jobs/quickstart.yaml training.max_steps=4")
    _spec_args(train)
    _address_arg(train)
    _verbose_arg(train)
    train.add_argument("--resume", action="store_true", help="continue the run's latest checkpoint")

    tune = _verb(verbs, "tune", "hyperparameter search on Ray Tune (the spec's tune section)",
                 "Runs the spec's tune.search_space as trials (ASHA by default); writes trials.csv, trials.png, "
                 "best.json and best/adapter under the run folder.",
                 "ray-sft tune jobs/quickstart-tune.yaml tune.num_samples=2")
    _spec_args(tune)
    _address_arg(tune)
    _verbose_arg(tune)
    tune.add_argument("--resume", action="store_true", help="continue an interrupted search; finished trials stay")
    _serving_verbs(verbs)
    _pipeline_verbs(verbs)
    _publish_verbs(verbs)
    return parser


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """argparse stops filling a positional list at the first flag: `VERB spec --address X k=v` leaves k=v over.
    Leftover positionals join the verb's overrides; anything else is still an error."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides") or any(e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*(args.overrides or []), *extra]
    # `serve --adapter NAME=PATH k=v`: serve's spec file is optional, so argparse puts the first override there.
    if args.verb == "serve" and args.spec and "=" in args.spec and not Path(args.spec).is_file():
        args.spec, args.overrides = None, [args.spec, *args.overrides]
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from ray_sft.spec import SpecError

    try:
        return VERBS[args.verb](args)
    except SpecError as exc:
        print(exc, file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if not _bad_input(exc):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _bad_input(exc: Exception) -> bool:
    # Imported only once something failed: `generate` brings torch, which most verbs never need.
    from ray_sft.data import DataError
    from ray_sft.generate import AdapterError

    return isinstance(exc, (DataError, AdapterError, FileNotFoundError))


def check_data(job, file=None) -> None:
    """The input checks that need no cluster, before any starts: the base's tokenizer and the rows, from files or the
    Hub (a Hub dataset is downloaded here, into the cache the run reads again). A bad file, model id, dataset id,
    split or revision is exit 2 within seconds, naming it."""
    from ray_sft import data, modeling
    from ray_sft.console import say

    rows = data.check_source(job.data)
    if rows is None:
        rows = data.read_rows(job.data)
    tokenizer = modeling.load_tokenizer(modeling.resolve_model_path(job), job.model)
    examples = data.format_rows(rows, job.data, job.prompt, tokenizer, job.training.max_length)
    say(f"data: {job.data.source}: {data.describe(examples, job.training.max_length)}", file)


def cmd_validate(args) -> int:
    from ray_sft import spec

    job = spec.load(args.spec, args.overrides)
    print(spec.to_yaml(job), end="", flush=True)
    check_data(job, sys.stderr)  # stdout stays the resolved spec, YAML a later command can read
    return 0


def cmd_train(args) -> int:
    from ray_sft import spec

    job = spec.load(args.spec, args.overrides)
    check_data(job)
    from ray_sft import cluster, console, train  # imports Ray: only once the input is known to be good

    try:
        with console.quiet(job.run_dir, args.verbose), cluster.connect(args.address):
            outcome = train.fit(job, resume=args.resume)
    except train.TrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"adapter: {outcome.adapter_dir}")
    print("final: " + ", ".join(f"{k}={v:.4g}" for k, v in outcome.metrics.items()
                                if k in ("loss", "eval_loss", "step")))
    return 0


def cmd_tune(args) -> int:
    from ray_sft import cluster, console, spec, train, tune

    job = spec.load(args.spec, args.overrides)
    tune.check(job)  # spec errors (exit 2) before connecting to Ray or starting any trial
    check_data(job)
    try:
        with console.quiet(job.run_dir, args.verbose), cluster.connect(args.address):
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

    loaded = generate.load(args.adapter, base=args.base, merge=args.merge, trust_remote_code=args.trust_remote_code)
    settings = generate.with_overrides(
        loaded.spec.generation, max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty,
        do_sample=None if args.temperature is None else args.temperature > 0,
        temperature=args.temperature or None, top_p=args.top_p)
    print(generate.generate(loaded, args.prompt, settings).text)
    return 0


def cmd_serve(args) -> int:
    from ray_sft import cluster, serve, targets

    if (args.detach or args.stop) and not args.address:
        print("error: --detach and --stop need --address (an embedded cluster ends with this process)", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        if args.stop:
            with cluster.connect(args.address):
                serve.stop()
            return 0
        job, base, adapters = targets.load(args.spec, args.overrides, args.adapter, args.base)
        host, port = args.host or job.serve.host, args.port or job.serve.port
        key = targets.api_key(job, host)
        with cluster.connect(args.address):
            url = serve.start(host, port, job.serve.request_timeout_s)
            serve.deploy(job, base, adapters, key)
            print(f"serving {', '.join(adapters)} on {url}/v1" + ("" if args.detach else " (Ctrl-C stops)"),
                  flush=True)
            if not args.detach:
                serve.run_until_interrupted()
    except targets.ServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def cmd_run(args) -> int:
    from ray_sft import console, pipeline, spec, train, tune

    job = spec.load(args.spec, args.overrides)
    serving = "none" if args.no_serve else "keep" if args.keep_serving else "sample"
    pipeline.check(job, serving)
    check_data(job)
    try:
        with console.quiet(job.run_dir, args.verbose):
            pipeline.run(job, args.address, serving, say=console.show)
    except (pipeline.PipelineError, tune.TuneError, train.TrainError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def cmd_submit(args) -> int:
    from ray_sft import jobs

    try:
        verb, overrides = jobs.split_verb(args.overrides)
        job_id = jobs.submit(args.address, args.spec, verb, overrides, args.env, args.pip)
        print(job_id, flush=True)
        if args.follow:
            return _job_exit(jobs.follow(args.address, job_id, _write))
    except jobs.JobsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def cmd_jobs(args) -> int:
    from ray_sft import jobs

    if args.action != "list" and not args.job_id:
        print(f"error: jobs {args.action} needs a job id", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        if args.action == "list":
            for row in jobs.list_jobs(args.address):
                print(jobs.describe(row))
        elif args.action == "status":
            row = jobs.status(args.address, args.job_id)
            print(jobs.describe(row) + (f"\n{row.message}" if row.message else ""))
        elif args.action == "logs" and args.follow:
            return _job_exit(jobs.follow(args.address, args.job_id, _write))
        elif args.action == "logs":
            _write(jobs.logs(args.address, args.job_id))
        else:
            print(jobs.describe(jobs.stop(args.address, args.job_id)))
    except jobs.JobsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _job_exit(row) -> int:
    print(f"job {row.job_id}: {row.status}", file=sys.stderr)
    return 0 if row.status == "SUCCEEDED" else EXIT_FAILED


def cmd_push(args) -> int:
    from ray_sft import generate, publish

    try:
        if args.dry_run:
            files = publish.stage(args.adapter, args.dry_run, args.repo)
            print(f"dry run: would upload to {args.repo or '(output.hub_repo)'}: {len(files)} files in {args.dry_run}")
            print("\n".join(files))
            return 0
        repo = args.repo or generate.run_spec(args.adapter).output.hub_repo
        if not repo:
            raise publish.PublishError("push: give --repo OWNER/NAME (or set output.hub_repo in the spec)")
        private = publish.default_private(args.adapter) if args.private is None else args.private
        url, files = publish.push(args.adapter, repo, private)
    except publish.PublishError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"pushed {len(files)} files to {url} ({'private' if private else 'public'})")
    return 0


def cmd_export(args) -> int:
    from ray_sft import publish

    try:
        problems = publish.check(args.adapter, args.max_rank or publish.DEFAULT_MAX_RANK)
        for problem in problems:
            print(f"check: {problem.feature}: {problem.why}")
        if not args.merge:
            print("check: no problems" if not problems else "check: merge with --merge OUT to serve elsewhere")
            return EXIT_FAILED if problems else 0
        out = publish.export_merged(args.adapter, args.merge, args.base, args.dtype, args.trust_remote_code)
    except publish.PublishError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"merged model: {out} ({args.dtype}; loads with AutoModelForCausalLM.from_pretrained)")
    return 0


VERBS = {"validate": cmd_validate, "train": cmd_train, "tune": cmd_tune, "generate": cmd_generate,
         "serve": cmd_serve, "run": cmd_run, "submit": cmd_submit, "jobs": cmd_jobs, "push": cmd_push,
         "export": cmd_export}

if __name__ == "__main__":
    sys.exit(main())
