"""`napo eval`: a model's bias and hallucination metrics on the lab's splits, the user's rows or a benchmark."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from napo.cli.parser import Command, Invocation, NapoParser, Progress


@dataclass
class EvalArguments:
    """`napo eval`: the model, and the lab's splits, the user's evaluation rows or a standard benchmark."""

    model: str | None = field(
        default=None,
        metadata={
            "aliases": ["--model_name_or_path"],
            "help": "a save_pretrained folder or a Hugging Face id (None: only with --predictions)",
        },
    )
    recipe: str | None = field(
        default=None, metadata={"help": "lab recipe YAML for the lab splits (None: the packaged colors.yaml)"}
    )
    dataset: str | None = field(
        default=None,
        metadata={
            "aliases": ["--dataset_name"],
            "help": "your eval set (prompt, images, answer) instead of the lab: save_to_disk folder, parquet or JSONL",
        },
    )
    n: int | None = field(
        default=None, metadata={"help": "rows per lab split, or the first N rows of --dataset (None: 200)"}
    )
    batch_size: int = field(default=64, metadata={"help": "samples per forward / generate call"})
    max_new_tokens: int | None = field(
        default=None,
        metadata={"help": "longest generated answer, in tokens (None: 16 with --dataset, 128 with --benchmark)"},
    )
    out: str | None = field(
        default=None,
        metadata={"aliases": ["--output_file"], "help": "write the metrics as JSON here (None: print only)"},
    )
    allow_pickle: bool = field(
        default=False, metadata={"help": "allow pickled (.bin) weights, which can run code when loaded"}
    )
    # Standard benchmarks (napo.benchmarks).
    benchmark: str | None = field(
        default=None,
        metadata={
            "choices": ["pope", "chair", "amber", "vlind"],
            "help": "a standard hallucination benchmark instead of the lab or --dataset (None: none)",
        },
    )
    data: list[str] = field(
        default_factory=list,
        metadata={
            "help": "benchmark files: pope: one question file per split; chair: an optional question file "
            "(default: the images of the instances file, or those --predictions names); amber: query JSON(s); "
            "vlind: VLind-Bench's data.json"
        },
    )
    annotations: list[str] = field(
        default_factory=list,
        metadata={
            "help": "chair: a COCO instances JSON, then optional COCO captions JSONs; amber: AMBER's annotations.json"
        },
    )
    image_dir: str | None = field(
        default=None,
        metadata={
            "help": "folder the benchmark's image names are relative to (vlind: the one holding "
            "counterfactual/ and factual/; None: the current folder)"
        },
    )
    predictions: list[str] | None = field(
        default=None,
        metadata={
            "help": "score these answer files instead of generating: LLaVA layout "
            "{question_id, text}, {image_id, caption} or AMBER's [{id, response}]; one file, or "
            "one per --data file (None: generate with --model)"
        },
    )
    allow_partial: bool = field(
        default=False,
        metadata={
            "help": "score an answer file that misses some questions; the JSON records the "
            "coverage (default: missing answers are an error)"
        },
    )
    prompt: str | None = field(
        default=None,
        metadata={"help": "chair: the question asked about each image (None: 'Please describe this image in detail.')"},
    )
    prompt_suffix: str = field(
        default="",
        metadata={
            "help": "appended to every benchmark question when generating, e.g. ' Answer the "
            "question using a single word or phrase.' as LLaVA's POPE files do (default: none)"
        },
    )
    amber_yes_no: str = field(
        default="exact",
        metadata={
            "choices": ["exact", "pope"],
            "help": "amber: read discriminative answers as the "
            "reference does (exactly 'Yes' / 'No') or by LLaVA's POPE rule",
        },
    )
    vlind_prompts: str = field(
        default="instructblip",
        metadata={
            "choices": ["instructblip", "gpt4o"],
            "help": "vlind: the prompt set of the reference's eval/instructblip_eval.py or eval/gpt4o_eval.py",
        },
    )

    def __post_init__(self) -> None:
        for name in ("n", "batch_size", "max_new_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} {getattr(self, name)}: expected at least 1")
        if self.benchmark is None:
            benchmark_only = [
                flag
                for flag, value in (
                    ("--data", self.data),
                    ("--annotations", self.annotations),
                    ("--image_dir", self.image_dir),
                    ("--predictions", self.predictions),
                    ("--allow_partial", self.allow_partial),
                    ("--prompt", self.prompt),
                    ("--prompt_suffix", self.prompt_suffix),
                    ("--amber_yes_no", self.amber_yes_no != "exact"),
                    ("--vlind_prompts", self.vlind_prompts != "instructblip"),
                )
                if value
            ]
            if benchmark_only:
                raise ValueError(f"{', '.join(benchmark_only)} need --benchmark")
            if self.model is None:
                raise ValueError("pass --model")
            return
        given = [
            flag
            for flag, value in (("--dataset", self.dataset), ("--recipe", self.recipe), ("--n", self.n))
            if value is not None
        ]
        if given:
            raise ValueError(f"{', '.join(given)} do not apply to --benchmark")
        if not self.out:
            raise ValueError("--benchmark needs --out (the metrics JSON; generated answers go beside it)")
        if self.prompt is not None and self.benchmark != "chair":
            raise ValueError("--prompt is chair's caption question; other benchmarks' questions are in --data")
        if self.amber_yes_no != "exact" and self.benchmark != "amber":
            raise ValueError("--amber_yes_no applies to --benchmark amber only")
        if self.vlind_prompts != "instructblip" and self.benchmark != "vlind":
            raise ValueError("--vlind_prompts applies to --benchmark vlind only")
        if self.predictions is None and self.model is None:
            raise ValueError("pass --model (to generate answers) or --predictions (answer files to score)")
        if self.predictions is not None and (
            self.model is not None or self.prompt_suffix or self.max_new_tokens is not None
        ):
            raise ValueError(
                "--model, --prompt_suffix and --max_new_tokens generate answers; --predictions scores given ones"
            )


def _eval_parser() -> NapoParser:
    return NapoParser(
        "napo eval",
        "Without --dataset: the bias lab's evaluation splits (counterfactual and prior-consistent accuracy, prior "
        "following, blind and question-blind agreement, image share, POPE, CHAIR). With --dataset (prompt, images, "
        "answer columns): accuracy, blind and question-blind agreement and image share. With --benchmark "
        "pope|chair|amber|vlind: that benchmark scored as its reference script scores it, on answers the model "
        "generates (--model; resumable answer file beside --out) or on any model's answer file (--predictions).",
        (EvalArguments, Progress),
    )


def _run_eval(invocation: Invocation) -> tuple[list[str], dict[str, str]]:
    from tqdm.auto import tqdm

    from napo.models import load_model

    args, progress = invocation[EvalArguments], not invocation[Progress].no_progress
    if args.benchmark is not None:
        return _run_benchmark(args, progress)
    n = 200 if args.n is None else args.n
    if args.dataset is not None:  # read (and check) the rows before the model: a bad file fails in seconds
        from napo.data import read_dataset

        dataset, _ = read_dataset(args.dataset, kind="rows")  # prompt + answer rows: no preference layout
        missing = [c for c in ("prompt", "answer") if c not in dataset.column_names]
        if missing:
            raise ValueError(
                f"{args.dataset} has no {' or '.join(map(repr, missing))} column (columns: "
                f"{dataset.column_names}); napo eval --dataset needs prompt, answer and optional images"
            )
        rows = list(dataset.select(range(min(n, len(dataset)))))
    model, processor = load_model(args.model, allow_pickle=args.allow_pickle)
    if args.dataset is None:
        from napo.lab.engine import evaluate_lab_model, lab_spec

        with tqdm(total=1, desc="napo eval (lab splits)", unit="model", disable=not progress) as bar:
            metrics = evaluate_lab_model((model, processor), lab_spec(args.recipe), n=n)
            bar.update(1)
    else:
        from napo.evaluate import MODALITY_PASSES, modality_metrics

        with tqdm(total=MODALITY_PASSES * len(rows), desc="napo eval", unit="sample", disable=not progress) as bar:
            result = modality_metrics(
                model,
                processor,
                rows,
                batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens or 16,
                on_batch=bar.update,
            )
        metrics = {k: v for k, v in result.items() if isinstance(v, float)}
    summary = [f"{name}: {value:.4f}" for name, value in metrics.items()]
    outputs = {}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        tmp = f"{args.out}.tmp-{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                json.dump(metrics, f, indent=2)
            os.replace(tmp, args.out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        outputs["metrics"] = args.out
    return summary, outputs


def _run_benchmark(args: EvalArguments, progress: bool) -> tuple[list[str], dict[str, str]]:
    """`napo eval --benchmark`: generate (or read) the answers and score them by the benchmark's reference rules."""
    from napo.benchmarks import DEFAULT_CAPTION_PROMPT, BenchmarkSpec, evaluate, flat_metrics

    spec = BenchmarkSpec(
        args.benchmark,
        data=args.data,
        annotations=args.annotations,
        image_dir=args.image_dir,
        prompt=args.prompt or DEFAULT_CAPTION_PROMPT,
        amber_yes_no=args.amber_yes_no,
        vlind_prompts=args.vlind_prompts,
    )
    model = processor = None
    if args.predictions is None:
        from napo.models import load_model

        model, processor = load_model(args.model, allow_pickle=args.allow_pickle)
    record = evaluate(
        spec,
        out=args.out,
        predictions=args.predictions,
        model=model,
        processing_class=processor,
        model_id=args.model,
        allow_partial=args.allow_partial,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens or 128,
        prompt_suffix=args.prompt_suffix,
        progress=progress,
    )
    summary = [f"{name}: {value:.4f}" for name, value in flat_metrics(args.benchmark, record).items()]
    summary.append(f"coverage: {record['coverage']['answered']}/{record['coverage']['questions']}")
    return summary, {"answers": ", ".join(record["answers"]), "metrics": args.out}


EVAL = Command(
    "eval",
    "bias and hallucination metrics of a model on an evaluation set",
    _eval_parser,
    _run_eval,
    "Nothing was written: rerun the same command to start again.",
)
