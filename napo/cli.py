"""The `napo` command: one entry point, one subcommand per user job.

This module is a thin layer over functions that can be imported; nothing imports it. Each subcommand
has a `_<name>_parser(subparsers)` that declares its options (each with a default and a help line) and
binds a `run` function that calls into the library and prints where it wrote its outputs.
"""

from __future__ import annotations

import argparse
import logging
import sys


def _add_dataset_options(p: argparse.ArgumentParser) -> None:
    """One flag per `napo.data.DatasetOptions` field (how the dataset is read), spelled --dataset-split or
    --dataset_split alike."""
    import dataclasses

    from napo.data import DatasetOptions

    group = p.add_argument_group("reading the dataset")
    for f in dataclasses.fields(DatasetOptions):
        flags = dict.fromkeys([f"--{f.name.replace('_', '-')}", f"--{f.name}"])
        if f.type == "bool":
            group.add_argument(*flags, dest=f"data_{f.name}", action="store_true",
                               help=f"{f.metadata['help']} (default: off)")
        else:
            kind = int if f.type == "int" else str
            group.add_argument(*flags, dest=f"data_{f.name}", type=kind, default=f.default, metavar=f.name.upper(),
                               choices=f.metadata.get("choices"), help=f"{f.metadata['help']} (default: {f.default})")


def _dataset_options(args: argparse.Namespace):
    import dataclasses

    from napo.data import DatasetOptions

    return DatasetOptions(**{f.name: getattr(args, f"data_{f.name}") for f in dataclasses.fields(DatasetOptions)})


def _pairs_parser(subparsers: argparse._SubParsersAction) -> None:
    import dataclasses

    from napo.pairs import PairsConfig, build_pairs, parse_negatives

    p = subparsers.add_parser(
        "pairs",
        help="generate language-/vision-biased negatives -> preference dataset",
        description="Answer degraded copies of every source row with a generator model and write the answers as "
        "rejected_* columns beside the original prompt, images and chosen. Rerun the same command to resume.",
    )
    # Options come from PairsConfig's fields, so the CLI and the Python API share defaults and help lines.
    types = {"int": int, "float": float, "str | None": str}
    for f in dataclasses.fields(PairsConfig):
        help_line = f.metadata["help"]
        if f.name == "data":  # DatasetOptions: flags of their own (_add_dataset_options)
            continue
        if f.default is dataclasses.MISSING:  # --source, --model, --output-dir: named like `napo train`'s
            p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, required=True, help=help_line)
        elif f.name == "negatives":
            p.add_argument(
                "--negative", dest="negatives", action="append", metavar="COLUMN=SPEC", default=None,
                help=f"repeatable; {help_line}",
            )
        elif f.type == "bool":
            off = "" if "default" in help_line else " (default: off)"
            p.add_argument(f"--{f.name.replace('_', '-')}", action="store_true", help=help_line + off)
        else:
            p.add_argument(
                f"--{f.name.replace('_', '-')}", type=types[f.type], default=f.default,
                help=f"{help_line} (default: {f.default})",
            )
    p.add_argument("--overwrite", action="store_true", help="delete this output folder's previous job and start over (default: resume)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar, e.g. in logs (default: show it)")
    _add_dataset_options(p)

    def run(args: argparse.Namespace) -> None:
        job = {f.name: getattr(args, f.name) for f in dataclasses.fields(PairsConfig) if f.name != "data"}
        job["data"] = _dataset_options(args)
        try:
            job["negatives"] = parse_negatives(args.negatives) if args.negatives else None
            stats = build_pairs(PairsConfig(**job), overwrite=args.overwrite, progress=not args.no_progress)
        except ValueError as error:  # bad arguments or a job mismatch: a message, not a traceback
            sys.exit(f"napo pairs: {error}")
        print(f"{stats['rows_written']} of {stats['source_rows']} rows written, {stats['rejects']} rejected, "
              f"{stats['dropped_no_negative']} dropped (no negative left)")
        for name, path in stats["outputs"].items():
            print(f"{name}: {path}")

    p.set_defaults(run=run)


def _train_parser(subparsers: argparse._SubParsersAction) -> None:
    import dataclasses

    from napo.config import NaPOConfig

    # napo's own NaPOConfig fields, listed in --help with their defaults; every other TRL / transformers field
    # passes through too.
    own = [f for f in dataclasses.fields(NaPOConfig) if f.name in NaPOConfig.__annotations__]
    epilog = "napo options (any NaPOConfig field, and every TRL DPOConfig / transformers TrainingArguments field, " \
        "passes through as --name VALUE, e.g. --learning_rate 5e-7 --num_train_epochs 4 --beta 0.1 --bf16 true):\n"
    epilog += "\n".join(f"  --{f.name} (default: {f.default})\n      {f.metadata['help']}" for f in own)
    p = subparsers.add_parser(
        "train",
        help="train NaPO or a DPO-family baseline on a preference dataset",
        description="Preference training with NaPOTrainer (a TRL DPOTrainer) on rows with 'chosen' and any of "
        "'rejected', 'rejected_language_bias', 'rejected_vision_bias', 'rejected_audio_bias'.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset", required=True,
                   help="preference rows in any layout of README 'Your data': JSONL, .json, parquet, a save_to_disk "
                   "folder or a hub id")
    p.add_argument("--model", required=True, help="model folder or Hugging Face id to start from")
    p.add_argument("--output-dir", default="outputs/napo-train", help="where checkpoints and the model go (default: %(default)s)")
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA rank; 0 = full fine-tune (default: %(default)s)")
    p.add_argument("--lora-alpha", type=int, default=None, help="LoRA α (default: 2 × rank)")
    p.add_argument("--lora-target-modules", default="all-linear", help="'all-linear' or comma-separated module names (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir (default: off)")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickled (.bin) weights; safetensors only by default")
    p.add_argument("--trust-remote-code", action="store_true", help="run code shipped with the model (default: off)")
    p.add_argument("--attn-implementation", default=None,
                   choices=["sdpa", "eager", "flash_attention_2", "flash_attention_3", "xformers"],
                   help="attention kernels; xformers needs CUDA and `pip install napo[gpu]` (default: transformers' sdpa)")
    _add_dataset_options(p)

    def run(args: argparse.Namespace) -> None:
        from transformers import HfArgumentParser

        from napo.train import train_from_paths

        try:
            # No abbreviations: a mistyped TRL argument must fail, not silently match a longer one.
            (config,) = HfArgumentParser(NaPOConfig, allow_abbrev=False).parse_args_into_dataclasses(
                args=[*args.passthrough, "--output_dir", args.output_dir]
            )
            outputs = train_from_paths(
                args.dataset, args.model, config, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                lora_target_modules=args.lora_target_modules, resume=args.resume, allow_pickle=args.allow_pickle,
                trust_remote_code=args.trust_remote_code, attn_implementation=args.attn_implementation,
                dataset_options=_dataset_options(args),
            )
        # A bad row, column, path or argument, or non-finite log-probs (on_nonfinite="stop"): a message naming the
        # rows, not a traceback.
        except (ValueError, OSError, FloatingPointError, ImportError) as error:
            sys.exit(f"napo train: {error}")
        for name, path in outputs.items():
            print(f"{name}: {path}")

    p.set_defaults(run=run, accepts_passthrough=True)


def _eval_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="bias and hallucination metrics of a model on an evaluation set or a standard benchmark",
        description="Without --dataset: the bias lab's evaluation splits (counterfactual and prior-consistent "
        "accuracy, prior following, blind and question-blind agreement, image share, POPE, CHAIR). With --dataset "
        "(prompt, images, answer columns): accuracy, blind and question-blind agreement and image share. With "
        "--benchmark pope|chair|amber|vlind: that benchmark scored as its reference script scores it, on answers the "
        "model generates (--model; resumable answer file beside --out) or on any model's answer file (--predictions).",
    )
    p.add_argument("--model", default=None,
                   help="a save_pretrained folder or a Hugging Face id (needed unless --predictions)")
    p.add_argument("--recipe", default=None, help="lab recipe YAML for the lab splits (default: the packaged colors.yaml)")
    p.add_argument("--dataset", default=None, help="your eval set instead of the lab: save_to_disk folder, parquet or JSONL")
    p.add_argument("--n", type=int, default=None,
                   help="rows per lab split, or the first N rows of --dataset (default: 200)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per forward / generate call (default: 64)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="longest generated answer, in tokens (default: 16 with --dataset, 128 with --benchmark)")
    p.add_argument("--out", default=None,
                   help="write the metrics as JSON here (default: print only; required with --benchmark)")
    # Standard benchmarks (napo.benchmarks).
    p.add_argument("--benchmark", default=None, choices=["pope", "chair", "amber", "vlind"],
                   help="a standard hallucination benchmark instead of the lab or --dataset (default: none)")
    p.add_argument("--data", nargs="+", default=[], help="benchmark files: pope: one question file per split; chair: "
                   "an optional question file (default: the images of the instances file, or those --predictions "
                   "names); amber: query JSON(s); vlind: VLind-Bench's data.json")
    p.add_argument("--annotations", nargs="+", default=[], help="chair: a COCO instances JSON, then optional COCO "
                   "captions JSONs; amber: AMBER's annotations.json (default: none)")
    p.add_argument("--image-dir", default=None, help="folder the benchmark's image names are relative to (vlind: the "
                   "one holding counterfactual/ and factual/; default: the current folder)")
    p.add_argument("--predictions", nargs="+", default=None, help="score these answer files instead of generating: "
                   "LLaVA layout {question_id, text}, {image_id, caption} or AMBER's [{id, response}]; one file, or "
                   "one per --data file (default: generate with --model)")
    p.add_argument("--allow-partial", action="store_true", help="score an answer file that misses some questions; the "
                   "JSON records the coverage (default: missing answers are an error)")
    p.add_argument("--prompt", default=None, help="chair: the question asked about each image (default: "
                   "'Please describe this image in detail.')")
    p.add_argument("--prompt-suffix", default="", help="appended to every benchmark question when generating, e.g. "
                   "' Answer the question using a single word or phrase.' as LLaVA's POPE files do (default: none)")
    p.add_argument("--amber-yes-no", default="exact", choices=["exact", "pope"], help="amber: read discriminative "
                   "answers as the reference does (exactly 'Yes' / 'No') or by LLaVA's POPE rule (default: exact)")
    p.add_argument("--vlind-prompts", default="instructblip", choices=["instructblip", "gpt4o"], help="vlind: the "
                   "prompt set of the reference's eval/instructblip_eval.py or eval/gpt4o_eval.py "
                   "(default: instructblip)")
    p.add_argument("--no-progress", action="store_true",
                   help="with --benchmark: no progress bar while answering, e.g. in logs (default: show it)")

    def run_benchmark(args: argparse.Namespace) -> None:
        from napo.benchmarks import DEFAULT_CAPTION_PROMPT, BenchmarkSpec, evaluate

        lab_options = (("--dataset", args.dataset), ("--recipe", args.recipe), ("--n", args.n))
        given = [flag for flag, value in lab_options if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} do not apply to --benchmark")
        if not args.out:
            raise ValueError("--benchmark needs --out (the metrics JSON; generated answers go beside it)")
        if args.prompt is not None and args.benchmark != "chair":
            raise ValueError("--prompt is chair's caption question; other benchmarks' questions are in --data")
        if args.amber_yes_no != "exact" and args.benchmark != "amber":
            raise ValueError("--amber-yes-no applies to --benchmark amber only")
        if args.vlind_prompts != "instructblip" and args.benchmark != "vlind":
            raise ValueError("--vlind-prompts applies to --benchmark vlind only")
        spec = BenchmarkSpec(args.benchmark, data=args.data, annotations=args.annotations, image_dir=args.image_dir,
                             prompt=args.prompt or DEFAULT_CAPTION_PROMPT, amber_yes_no=args.amber_yes_no,
                             vlind_prompts=args.vlind_prompts)
        model = processor = None
        if args.predictions is None:
            if args.model is None:
                raise ValueError("pass --model (to generate answers) or --predictions (answer files to score)")
            from napo.models import load_model

            model, processor = load_model(args.model)
        elif args.model is not None or args.prompt_suffix or args.max_new_tokens is not None:
            raise ValueError("--model, --prompt-suffix and --max-new-tokens generate answers; --predictions scores "
                             "given ones")
        record = evaluate(spec, out=args.out, predictions=args.predictions, model=model, processing_class=processor,
                          model_id=args.model, allow_partial=args.allow_partial, batch_size=args.batch_size,
                          max_new_tokens=args.max_new_tokens or 128, prompt_suffix=args.prompt_suffix,
                          progress=not args.no_progress)
        from napo.benchmarks import flat_metrics

        for name, value in flat_metrics(args.benchmark, record).items():
            print(f"{name}: {value:.4f}")
        print(f"coverage: {record['coverage']['answered']}/{record['coverage']['questions']}")
        print(f"answers: {', '.join(record['answers'])}")
        print(f"metrics: {args.out}")

    def run(args: argparse.Namespace) -> None:
        import json

        if args.benchmark is not None:
            try:
                run_benchmark(args)
            except (ValueError, OSError) as error:  # bad files or arguments: a message naming them, not a traceback
                sys.exit(f"napo eval: {error}")
            return
        benchmark_only = [flag for flag, value in (
            ("--data", args.data), ("--annotations", args.annotations), ("--image-dir", args.image_dir),
            ("--predictions", args.predictions), ("--allow-partial", args.allow_partial), ("--prompt", args.prompt),
            ("--prompt-suffix", args.prompt_suffix), ("--amber-yes-no", args.amber_yes_no != "exact"),
            ("--vlind-prompts", args.vlind_prompts != "instructblip"), ("--no-progress", args.no_progress)) if value]
        if benchmark_only:
            sys.exit(f"napo eval: {', '.join(benchmark_only)} need --benchmark")
        if args.model is None:
            sys.exit("napo eval: pass --model")
        from napo.models import load_model

        n = 200 if args.n is None else args.n
        model, processor = load_model(args.model)
        if args.dataset is None:
            from napo.lab.pipeline import evaluate_lab_model, lab_spec

            metrics = evaluate_lab_model((model, processor), lab_spec(args.recipe), n=n)
        else:
            from napo.data import read_dataset
            from napo.evaluate import modality_metrics

            dataset, _ = read_dataset(args.dataset, kind="rows")  # prompt + answer rows: no preference layout
            if "answer" not in dataset.column_names:
                sys.exit(f"napo eval: {args.dataset} has no 'answer' column (columns: {dataset.column_names})")
            rows = list(dataset.select(range(min(n, len(dataset)))))
            result = modality_metrics(model, processor, rows, batch_size=args.batch_size,
                                      max_new_tokens=args.max_new_tokens or 16)
            metrics = {k: v for k, v in result.items() if isinstance(v, float)}
        for name, value in metrics.items():
            print(f"{name}: {value:.4f}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(metrics, f, indent=2)
            print(f"metrics: {args.out}")

    p.set_defaults(run=run)


def _compare_parser(subparsers: argparse._SubParsersAction) -> None:
    import dataclasses

    p = subparsers.add_parser(
        "compare",
        help="objectives x label-noise rates x seeds -> report",
        description="Train every (objective, label-noise rate, seed) cell from the same SFT model and pairs (the bias "
        "lab, or --dataset/--model), evaluate it and write results.jsonl, a markdown report, a CSV and plots. Rerun "
        "the same command to resume: finished cells are skipped, failed ones retried.",
    )
    p.add_argument("--recipe", default=None, help="YAML of any of the options below by field name, e.g. data/recipes/compare.yaml; flags given override it (default: none)")
    # Options come from CompareConfig's fields, so the CLI and the Python API share defaults and help lines. Every
    # flag defaults to None ("not given") so that a recipe value is only overridden by a flag actually passed.
    from napo.compare import CompareConfig

    defaults = CompareConfig(workers=1)
    types = {"int | None": int, "float": float, "int": int, "str": str, "str | None": str}
    lists = {"list[str]": str, "list[float]": float, "list[int]": int}
    for f in dataclasses.fields(CompareConfig):
        if f.name == "data":  # DatasetOptions: flags of their own (_add_dataset_options)
            continue
        flag, help_line = f"--{f.name.replace('_', '-')}", f.metadata["help"]
        default = "half the CPU cores" if f.name == "workers" else getattr(defaults, f.name)
        if f.type == "bool":
            off = "" if "default" in help_line else " (default: off)"
            p.add_argument(flag, action="store_true", default=None, help=help_line + off)
        elif f.type in lists:
            p.add_argument(flag, nargs="+", type=lists[f.type], default=None, help=f"{help_line} (default: {' '.join(map(str, default))})")
        elif f.name == "train":
            p.add_argument(
                "--set", dest="train", action="append", metavar="FIELD=VALUE", default=None,
                help=f"repeatable; {help_line}, as --set learning_rate=1e-4 (value read as YAML; default: none)",
            )
        else:
            p.add_argument(flag, type=types[f.type], default=None, help=f"{help_line} (default: {default})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar, e.g. in logs (default: show it)")
    _add_dataset_options(p)

    def run(args: argparse.Namespace) -> None:
        import yaml

        from napo.compare import load_recipe, run_compare
        from napo.data import DatasetOptions

        try:
            job = load_recipe(args.recipe) if args.recipe else {}
            given = dataclasses.asdict(_dataset_options(args))  # flags given override the recipe's `data`
            defaults = dataclasses.asdict(DatasetOptions())
            job["data"] = {**job.get("data", {}), **{k: v for k, v in given.items() if v != defaults[k]}}
            for f in dataclasses.fields(CompareConfig):
                if f.name == "data":
                    continue
                value = getattr(args, f.name)
                if f.name == "train" and value is not None:
                    pairs = [item.partition("=") for item in value]
                    if any(not sep for _, sep, _ in pairs):
                        raise ValueError(f"--set {value}: expected FIELD=VALUE, e.g. --set learning_rate=1e-4")
                    value = {**job.get("train", {}), **{k.strip(): yaml.safe_load(v) for k, _, v in pairs}}
                if value is not None:
                    job[f.name] = value
            stats = run_compare(CompareConfig(**job), command=" ".join(["napo", *sys.argv[1:]]), progress=not args.no_progress)
        except ValueError as error:  # bad arguments: a message, not a traceback
            sys.exit(f"napo compare: {error}")
        print(f"{stats['cells_run']} cells run, {stats['cells_failed']} failed (see errors.jsonl; rerun to retry), "
              f"{stats['cells_total']} in the grid")
        for name, path in stats["outputs"].items():
            print(f"{name}: {path}")

    p.set_defaults(run=run)


def _lab_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "lab",
        help="the whole pipeline end to end on the built-in bias lab",
        description="SFT a tiny LLaVA on synthetic scenes with a strong colour prior, build language-/vision-biased "
        "pairs with it, train DPO and NaPO from the same checkpoint for every seed, and write report.md, "
        "report.json and PNG plots. The SFT checkpoint and pairs are cached under OUT/cache/.",
    )
    p.add_argument("--quick", action="store_true", help="a tiny variant (about a minute) for tests and CI (default: off)")
    p.add_argument("--out", default=None, help="output folder (default: benchmarks/lab, or benchmarks/lab/quick with --quick)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="preference-training seeds (default: 0 1 2)")
    p.add_argument("--recipe", default=None, help="lab recipe YAML (default: the packaged colors.yaml)")
    p.add_argument("--audio", action="store_true", help="the audio lab instead: a tiny Qwen2-Audio on synthetic notes with a "
                   "note prior (recipe default: the packaged sounds.yaml); writes audio_report.md / .json (default: off)")

    def run(args: argparse.Namespace) -> None:
        from napo.lab.audio import run_audio_lab
        from napo.lab.pipeline import run_lab

        out = args.out or ("benchmarks/lab/quick" if args.quick else "benchmarks/lab")
        command = "napo " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["lab"] else None
        lab = run_audio_lab if args.audio else run_lab
        report = lab(out, seeds=tuple(args.seeds), recipe=args.recipe, quick=args.quick, command=command)
        print(f"wall time: {report['wall_time_s']:.0f} s")
        for name, path in report["outputs"].items():
            print(f"{name}: {path}")

    p.set_defaults(run=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napo",
        description="Noise-aware preference optimization against modality bias in multimodal models.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_pairs_parser, _train_parser, _eval_parser, _compare_parser, _lab_parser):
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> None:
    napo_logger = logging.getLogger("napo")  # napo's own INFO lines (e.g. the layout read and its row count)
    if not napo_logger.handlers:
        napo_logger.addHandler(logging.StreamHandler(sys.stderr))
        napo_logger.setLevel(logging.INFO)
    parser = build_parser()
    # Unknown options are TRL / transformers arguments for `napo train`; any other command rejects them.
    args, passthrough = parser.parse_known_args(argv)
    if passthrough and not getattr(args, "accepts_passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(passthrough)}")
    args.passthrough = passthrough
    args.run(args)


if __name__ == "__main__":
    main()
