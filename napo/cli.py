"""The `napo` command: one entry point, one subcommand per user job, one error boundary.

This module is a thin layer over functions that can be imported; nothing imports it. A subcommand is a `Command`
record: the dataclasses its options come from (the library's own config classes — `PairsConfig`, `NaPOConfig`,
`TrainArguments`, `CompareConfig` — plus small CLI-only ones), and a `run` function that calls into the library and
returns what to print. The parser of a command is transformers' `HfArgumentParser` through TRL's `TrlParser`, so:

- every dataclass field is an option, spelled `--field_name` or `--field-name`, with its help line and default;
- `--config run.yaml` sets any of them by field name, and options given on the command line override the file;
- a dict-valued field (`PairsConfig.negatives`, `CompareConfig.train`) is a repeatable `--flag KEY=VALUE` option whose
  values are added to (or override keys of) the file's mapping.

Adding options to a command is adding a dataclass to its `arguments` (e.g. a dataset-reading options class shared
by pairs, train and compare) and reading `invocation[ThatClass]` in its `run`.

Errors end as one paragraph on stderr and an exit code (`EXIT_CODES`); `--debug`, anywhere on the command line,
prints the traceback first.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import errno
import json
import logging
import os
import sys
import traceback
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

EXIT_CODES = {
    0: "done",
    1: "unexpected error (a bug, or a case napo does not handle: rerun with --debug and report it)",
    2: "bad command line or --config file",
    3: "bad data or settings (the message names the row, file or option)",
    4: "file system error: a folder that cannot be made or written, a full disk, a missing file",
    5: "the output folder is in use by another napo job",
    6: "out of memory",
    130: "interrupted (Ctrl-C)",
}
DEBUG_FLAG = "--debug"


class CommandFailed(SystemExit):
    """How `main` ends a failed command: `code` is the exit status (`EXIT_CODES`), str() the printed message."""

    def __init__(self, code: int, message: str):
        super().__init__(code)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(ValueError):
    """A bad option value or --config file: exit code 2."""


# ------------------------------------------------------------------------------------------------------- parsing
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" unless the help line already speaks of its default, or the option is required."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required:
            return text if "required" in text else f"{text} (required)"
        if "default" in text or "None:" in text:
            return text
        return super()._get_help_string(action)


class KeyValueOption(argparse.Action):
    """A repeatable `--flag KEY=VALUE` option that fills a dict: the --config file's mapping, then each flag's pair.

    `parse_value` turns the text after "=" into the value (e.g. `yaml.safe_load`); the same key twice on the command
    line is an error.
    """

    def __init__(self, *args, parse_value: Callable[[str], Any] = str, example: str = "KEY=VALUE", **kwargs):
        self.parse_value, self.example = parse_value, example
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, value, option_string=None):
        key, sep, text = value.partition("=")
        if not sep or not key.strip() or not text.strip():
            parser.error(f"{option_string} {value!r}: expected KEY=VALUE, e.g. {option_string} {self.example}")
        seen = namespace.__dict__.setdefault(f"_seen_{self.dest}", set())
        if key.strip() in seen:
            parser.error(f"{option_string}: {key.strip()!r} is given twice")
        seen.add(key.strip())
        current = getattr(namespace, self.dest)
        mapping = dict(current) if isinstance(current, dict) else {}
        mapping[key.strip()] = self.parse_value(text.strip())
        setattr(namespace, self.dest, mapping)


@dataclass(frozen=True)
class MappingOption:
    """A dict field of a config class given as repeatable `--flag KEY=VALUE` (see `KeyValueOption`)."""

    dest: str
    flags: tuple[str, ...]
    help: str
    example: str
    parse_value: Callable[[str], Any] = str


class NapoParser:
    """One command's options: `TrlParser` (an `HfArgumentParser`) over views of the command's dataclasses.

    A view is the dataclass without its mapping fields (those become `MappingOption`s) and with extra option
    aliases (e.g. TRL's `--model_name_or_path` for `PairsConfig.model`). Parsing builds the real dataclasses.
    """

    def __init__(
        self,
        prog: str,
        description: str,
        arguments: tuple[type, ...],
        *,
        mappings: tuple[MappingOption, ...] = (),
        nested: dict[str, type] | None = None,
        aliases: dict[str, list[str]] | None = None,
        defaults: dict[str, Any] | None = None,
        epilog: str = "",
    ):
        from trl import TrlParser

        # `nested`: a field whose value is another of `arguments` (e.g. PairsConfig.data = the DatasetOptions): its
        # options are that class's own, and a --config file may give them as a mapping under the field's name.
        self.arguments, self.mappings, self.nested = arguments, mappings, nested or {}
        dropped = {m.dest for m in mappings} | set(self.nested)
        views = [_view(cls, dropped, aliases or {}) for cls in arguments]
        self.parser = TrlParser(
            views,
            prog=prog,
            description=description,
            allow_abbrev=False,  # a typo must fail, not match
            epilog=epilog,
            formatter_class=_HelpFormatter,
        )
        self.parser.add_argument(
            "--config",
            metavar="YAML",
            default=None,
            help="YAML file setting any option of this command by field name; options given on the command line "
            "override it (default: no file)",
        )
        for m in mappings:
            self.parser.add_argument(
                *m.flags,
                dest=m.dest,
                action=KeyValueOption,
                parse_value=m.parse_value,
                example=m.example,
                metavar="KEY=VALUE",
                default=None,
                help=f"repeatable; {m.help} (default: none)",
            )
        if defaults:
            self.parser.set_defaults(**defaults)

    def parse(self, argv: list[str]) -> dict[type, Any]:
        """The command's dataclasses built from `--config` (if any) and `argv`; UsageError on a bad value."""
        config_path, argv = _pop_config(argv)
        if config_path is not None:
            self._apply_config_file(config_path)
        namespace = self.parser.parse_args(argv)
        values = {key: value for key, value in vars(namespace).items() if not key.startswith("_seen_")}
        values.pop("config", None)
        for m in self.mappings:  # a repeatable KEY=VALUE option never given: its field keeps the dataclass default
            if values.get(m.dest) is None:
                values.pop(m.dest, None)
        built = {}
        inner = set(self.nested.values())
        for cls in sorted(self.arguments, key=lambda c: c not in inner):  # nested classes first
            names = [f.name for f in dataclasses.fields(cls) if f.init]
            kwargs = {name: values.pop(name) for name in names if name in values}
            kwargs.update({name: built[inner_cls] for name, inner_cls in self.nested.items() if name in names})
            try:
                built[cls] = cls(**kwargs)
            except (ValueError, TypeError) as error:
                raise UsageError(str(error)) from error
        assert not values, f"options without a dataclass: {sorted(values)}"
        return built

    def _apply_config_file(self, path: str) -> None:
        """Set this parser's option defaults from a YAML mapping of field names, converting and checking them."""
        import yaml

        try:
            with open(path) as f:
                content = yaml.safe_load(f)
        except FileNotFoundError:
            raise UsageError(f"--config {path}: no such file") from None
        except yaml.YAMLError as error:
            raise UsageError(f"--config {path}: not valid YAML ({' '.join(str(error).split())})") from None
        content = {} if content is None else content
        if not isinstance(content, dict):
            raise UsageError(
                f"--config {path}: expected a mapping of option names to values, got {type(content).__name__}"
            )
        for key, value in dict(content.pop("env", None) or {}).items():  # as TrlParser: environment variables
            os.environ[str(key)] = str(value)
        for name in self.nested:  # `data: {dataset_split: test}` sets the nested class's options
            inner = content.pop(name, None) or {}
            if not isinstance(inner, dict):
                raise UsageError(f"--config {path}: {name}: expected a mapping of option names to values")
            content = {**inner, **content}
        actions = {}
        for action in self.parser._actions:
            if action.dest not in ("help", "config") and not isinstance(action, argparse._StoreFalseAction):
                actions.setdefault(action.dest, action)
        unknown = [key for key in content if key not in actions]
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, actions, 1)
                hints.append(f"{key} (did you mean {close[0]}?)" if close else key)
            raise UsageError(f"--config {path}: unknown option(s) for {self.parser.prog}: {', '.join(hints)}")
        for key, value in content.items():
            try:
                converted = _convert(actions[key], value)
            except (ValueError, TypeError) as error:
                raise UsageError(f"--config {path}: {key}: {error}") from None
            for action in self.parser._actions:
                if action.dest == key:
                    action.default, action.required = converted, False

    def format_help(self) -> str:
        return self.parser.format_help()


def _view(cls: type, dropped: set[str], aliases: dict[str, list[str]]) -> type:
    """`cls`'s init fields minus `dropped`, with `aliases` added to their options, as a new dataclass for the parser.

    HfArgumentParser resolves (and rewrites) the field types of the classes it is given: a view keeps the library's
    own classes untouched.
    """
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name in dropped:
            continue
        metadata = dict(f.metadata)
        if f.name in aliases:
            metadata["aliases"] = [*metadata.get("aliases", []), *aliases[f.name]]
        fields.append(
            (
                f.name,
                hints[f.name],
                dataclasses.field(default=f.default, default_factory=f.default_factory, metadata=metadata),
            )
        )
    view = dataclasses.make_dataclass(cls.__name__, fields, kw_only=True)
    view._argument_group_name = f"{cls.__name__} options"
    return view


def _convert(action: argparse.Action, value: Any) -> Any:
    """A --config value as the option would have parsed it from text, type-checked."""
    if value is None:
        return None
    if isinstance(action, KeyValueOption):
        if isinstance(value, dict):
            return value
        raise TypeError(f"expected a mapping (KEY: VALUE lines), got {value!r}")
    if action.nargs == "+":
        items = value if isinstance(value, list) else [value]
        return [_convert_one(action, item) for item in items]
    return _convert_one(action, value)


def _convert_one(action: argparse.Action, value: Any) -> Any:
    if isinstance(value, (dict, list)):
        if action.type is str:  # TrainingArguments' dict-or-JSON-string fields (lr_scheduler_kwargs, ...)
            return json.dumps(value)
        raise TypeError(f"expected one value, got {value!r}")
    converted = action.type(value if isinstance(value, bool) else str(value)) if action.type else value
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"{converted!r} is not one of {list(action.choices)}")
    return converted


def _pop_config(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the --config path or None, argv without it); `--config=PATH` works too."""
    rest, path = [], None
    i = 0
    while i < len(argv):
        item = argv[i]
        if item == "--config" or item.startswith("--config="):
            if path is not None:
                raise UsageError("--config is given twice: merge the files into one")
            if "=" in item:
                path = item.partition("=")[2]
            elif i + 1 < len(argv):
                path, i = argv[i + 1], i + 1
            else:
                raise UsageError("--config needs a YAML file path")
        else:
            rest.append(item)
        i += 1
    return path, rest


# ------------------------------------------------------------------------------------------------------ commands
@dataclass
class Progress:
    no_progress: bool = field(default=False, metadata={"help": "no progress bar, e.g. in logs"})


@dataclass
class PairsJob:
    overwrite: bool = field(
        default=False,
        metadata={"help": "delete this output folder's previous pairs job and start over (default: resume)"},
    )
    allow_pickle: bool = field(
        default=False, metadata={"help": "allow pickled (.bin) generator weights, which can run code when loaded"}
    )


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


@dataclass
class LabArguments:
    """`napo lab`: the whole pipeline on the built-in bias lab."""

    quick: bool = field(default=False, metadata={"help": "a tiny variant (about a minute) for tests and CI"})
    out: str | None = field(
        default=None,
        metadata={
            "aliases": ["--output_dir", "--output-dir"],
            "help": "output folder (None: benchmarks/lab, or benchmarks/lab/quick with --quick)",
        },
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "preference-training seeds"})
    recipe: str | None = field(default=None, metadata={"help": "lab recipe YAML (None: the packaged colors.yaml)"})
    audio: bool = field(
        default=False,
        metadata={
            "help": "the audio lab instead: a tiny Qwen2-Audio on synthetic notes with a note prior (recipe "
            "default: the packaged sounds.yaml); writes audio_report.md / .json"
        },
    )
    drop_identical: bool = field(
        default=False,
        metadata={
            "help": "vision lab: drop negatives identical to chosen instead of keeping them as the paper does (a "
            "kept one has margin 0 and no gradient but pulls its type's ψ, hence q, and its dynamic weight "
            "towards 0)"
        },
    )


@dataclass
class Invocation:
    """A parsed command line: the built dataclasses by class, and the arguments as given (recorded in reports)."""

    command: str
    argv: list[str]
    values: dict[type, Any]

    def __getitem__(self, cls: type) -> Any:
        return self.values[cls]

    @property
    def command_line(self) -> str:
        return " ".join(["napo", self.command, *self.argv])


@dataclass(frozen=True)
class Command:
    """A subcommand: its options' dataclasses, how to run it, and what to tell a user who stopped it."""

    name: str
    help: str
    build_parser: Callable[[], NapoParser]
    run: Callable[[Invocation], tuple[list[str], dict[str, str]]]  # -> (summary lines, written paths by name)
    resume_hint: str


def _pairs_parser() -> NapoParser:
    from napo.data import DatasetOptions
    from napo.pairs import PairsConfig

    return NapoParser(
        "napo pairs",
        "Answer degraded copies of every source row with a generator model and write the answers as rejected_* "
        "columns beside the original prompt, images and chosen. Rerun the same command to resume.",
        (PairsConfig, DatasetOptions, PairsJob, Progress),
        nested={"data": DatasetOptions},
        mappings=(
            MappingOption(
                "negatives",
                ("--negative", "--negatives"),
                "negative column=perturbation spec (None: image.drop -> rejected_language_bias, "
                "text.drop_question -> rejected_vision_bias; audio data: audio.drop / "
                "text.drop_question)",
                "rejected_language_bias='image.diffusion(t=500)'",
            ),
        ),
        aliases={"source": ["--dataset_name", "--dataset"], "model": ["--model_name_or_path"]},
    )


def _run_pairs(invocation: Invocation) -> tuple[list[str], dict[str, str]]:
    from napo.pairs import PairsConfig, build_pairs

    job = invocation[PairsJob]
    stats = build_pairs(
        invocation[PairsConfig],
        overwrite=job.overwrite,
        progress=not invocation[Progress].no_progress,
        allow_pickle=job.allow_pickle,
    )
    summary = [
        f"{stats['rows_written']} of {stats['source_rows']} rows written, {stats['rejects']} rejected, "
        f"{stats['dropped_no_negative']} dropped (no negative left)"
    ]
    return summary, stats["outputs"]


def _train_parser() -> NapoParser:
    from napo.config import NaPOConfig
    from napo.data import DatasetOptions
    from napo.train import TrainArguments

    return NapoParser(
        "napo train",
        "Preference training with NaPOTrainer (a TRL DPOTrainer) on rows with 'chosen' and any of 'rejected', "
        "'rejected_language_bias', 'rejected_vision_bias', 'rejected_audio_bias'. Every TRL DPOConfig / transformers "
        "TrainingArguments option is accepted under its TRL name, as are TRL's model and LoRA options.",
        (TrainArguments, DatasetOptions, NaPOConfig),
        defaults={"output_dir": "outputs/napo-train"},
        epilog="TrainingArguments' own `debug` setting can only be given in --config: --debug is napo's.",
    )


def _run_train(invocation: Invocation) -> tuple[list[str], dict[str, str]]:
    from napo.config import NaPOConfig
    from napo.data import DatasetOptions
    from napo.train import TrainArguments, run_training

    return [], run_training(invocation[TrainArguments], invocation[NaPOConfig], invocation[DatasetOptions])


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
        from napo.lab.pipeline import evaluate_lab_model, lab_spec

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


def _compare_parser() -> NapoParser:
    from napo.compare import CompareConfig
    from napo.data import DatasetOptions

    return NapoParser(
        "napo compare",
        "Train every (objective, label-noise rate, seed) cell from the same SFT model and pairs (the bias lab, or "
        "--dataset/--model), evaluate it and write results.jsonl, a markdown report, a CSV and plots. Rerun the same "
        "command to resume: finished cells are skipped, failed ones retried. --recipe is --config.",
        (CompareConfig, DatasetOptions, Progress),
        nested={"data": DatasetOptions},
        mappings=(
            MappingOption(
                "train",
                ("--set",),
                "a NaPOConfig field for every cell, value read as YAML",
                "learning_rate=1e-4",
                parse_value=_yaml_value,
            ),
        ),
        aliases={"dataset": ["--dataset_name"], "model": ["--model_name_or_path"]},
    )


def _yaml_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def _run_compare(invocation: Invocation) -> tuple[list[str], dict[str, str]]:
    from napo.compare import CompareConfig, run_compare

    stats = run_compare(
        invocation[CompareConfig], command=invocation.command_line, progress=not invocation[Progress].no_progress
    )
    summary = [
        f"{stats['cells_run']} cells run, {stats['cells_failed']} failed (see errors.jsonl; rerun to retry), "
        f"{stats['cells_total']} in the grid"
    ]
    return summary, stats["outputs"]


def _lab_parser() -> NapoParser:
    return NapoParser(
        "napo lab",
        "SFT a tiny LLaVA on synthetic scenes with a strong colour prior, build language-/vision-biased pairs with it, "
        "train DPO and NaPO from the same checkpoint for every seed, and write report.md, report.json and PNG plots. "
        "The SFT checkpoint and pairs are cached under OUT/cache/.",
        (LabArguments,),
    )


def _run_lab(invocation: Invocation) -> tuple[list[str], dict[str, str]]:
    from napo.lab.audio import run_audio_lab
    from napo.lab.pipeline import run_lab

    args = invocation[LabArguments]
    out = args.out or ("benchmarks/lab/quick" if args.quick else "benchmarks/lab")
    if args.audio and args.drop_identical:
        raise ValueError("--drop-identical applies to the vision lab only (the audio lab has its own pairs)")
    options = {} if args.audio else {"keep_identical": not args.drop_identical}
    lab = run_audio_lab if args.audio else run_lab
    report = lab(
        out, seeds=tuple(args.seeds), recipe=args.recipe, quick=args.quick, command=invocation.command_line, **options
    )
    return [f"wall time: {report['wall_time_s']:.0f} s"], report["outputs"]


COMMANDS = {
    command.name: command
    for command in (
        Command(
            "pairs",
            "generate language-/vision-biased negatives -> preference dataset",
            _pairs_parser,
            _run_pairs,
            "Finished shards are kept: rerun the same command to resume.",
        ),
        Command(
            "train",
            "train NaPO or a DPO-family baseline on a preference dataset",
            _train_parser,
            _run_train,
            "Checkpoints written so far are kept (see --save_steps): rerun the same command with --resume to "
            "resume from the last one.",
        ),
        Command(
            "eval",
            "bias and hallucination metrics of a model on an evaluation set",
            _eval_parser,
            _run_eval,
            "Nothing was written: rerun the same command to start again.",
        ),
        Command(
            "compare",
            "objectives x label-noise rates x seeds -> report",
            _compare_parser,
            _run_compare,
            "Finished cells are kept in results.jsonl: rerun the same command to resume.",
        ),
        Command(
            "lab",
            "the whole pipeline end to end on the built-in bias lab",
            _lab_parser,
            _run_lab,
            "The cached SFT model and pairs are kept: rerun the same command to resume.",
        ),
    )
}


def top_level_help() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: napo COMMAND [options] [--config run.yaml] [--debug]",
        "",
        "Noise-aware preference optimization against modality bias in multimodal models.",
        "",
        "commands:",
        *(f"  {name.ljust(width)}  {command.help}" for name, command in COMMANDS.items()),
        "",
        "`napo COMMAND --help` lists a command's options. --config YAML sets any of them by field name (options on",
        "the command line override it). --debug prints the traceback of an error.",
        "",
        "exit codes:",
        *(f"  {code:>3}  {meaning}" for code, meaning in EXIT_CODES.items()),
    ]
    return "\n".join(lines) + "\n"


def parse_command(argv: list[str]) -> Invocation:
    """The `Invocation` of `napo ARGV` (argv[0] is the command); argparse exits 2 on a bad option, 0 after --help."""
    command = COMMANDS[argv[0]]
    rest = list(argv[1:])
    if command.name == "compare":  # --recipe, the option's earlier name, is --config
        rest = ["--config" if item == "--recipe" else item for item in rest]
    return Invocation(command.name, list(argv[1:]), command.build_parser().parse(rest))


# ------------------------------------------------------------------------------------------------ error boundary
class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted (main() may run many times in one process, as in
    tests, each with its own stderr)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def main(argv: list[str] | None = None) -> None:
    """Run `napo ARGV`; on failure print one paragraph and raise `CommandFailed` (a SystemExit) with its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    napo_logger = logging.getLogger("napo")  # napo's own INFO lines (e.g. the layout read and its row count)
    if not napo_logger.handlers:
        napo_logger.addHandler(_StderrHandler())
        napo_logger.setLevel(logging.INFO)
    debug = DEBUG_FLAG in argv
    argv = [item for item in argv if item != DEBUG_FLAG]
    if not argv or argv[0] in ("-h", "--help"):
        print(top_level_help(), end="", file=sys.stdout if argv else sys.stderr)
        if not argv:
            raise CommandFailed(2, "napo: no command given")
        return
    if argv[0] not in COMMANDS:
        close = difflib.get_close_matches(argv[0], COMMANDS, 1)
        message = (
            f"napo: unknown command {argv[0]!r}"
            + (f" (did you mean {close[0]}?)" if close else "")
            + f"; commands: {', '.join(COMMANDS)}"
        )
        print(message, file=sys.stderr)
        raise CommandFailed(2, message)
    command = COMMANDS[argv[0]]
    try:
        summary, outputs = command.run(parse_command(argv))
    except SystemExit:  # argparse's own exits (usage errors: 2, --help: 0) and nested napo ones
        raise
    except BaseException as error:  # noqa: BLE001 - the boundary: every failure ends as a message and a code
        code, message = describe_failure(command, error)
        if debug:
            traceback.print_exc()
        print(message, file=sys.stderr)
        raise CommandFailed(code, message) from None
    for line in summary:
        print(line)
    for name, path in outputs.items():
        print(f"{name}: {path}")


def describe_failure(command: Command, error: BaseException) -> tuple[int, str]:
    """(exit code, one-paragraph message) for an exception that ended `command` (see EXIT_CODES)."""
    import torch

    from napo.jobs import OutputFolderBusy

    prefix = f"napo {command.name}:"
    text = " ".join(str(error).split())
    if isinstance(error, KeyboardInterrupt):
        return 130, f"{prefix} interrupted (Ctrl-C). {command.resume_hint}"
    if isinstance(error, UsageError):
        return 2, f"{prefix} {text}"
    if isinstance(error, OutputFolderBusy):
        return 5, f"{prefix} {text}"
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return 6, (
            f"{prefix} out of memory ({text or type(error).__name__}): lower the batch size (or max_length), "
            f"or use a machine with more memory. {command.resume_hint}"
        )
    if isinstance(error, OSError):
        return 4, f"{prefix} {_describe_os_error(error)} {command.resume_hint}"
    if isinstance(error, (ValueError, FloatingPointError, ImportError)):
        return 3, f"{prefix} {text}"
    return 1, (
        f"{prefix} unexpected error {type(error).__name__}: {text}. This is a bug in napo or a case it does not "
        "handle yet: rerun with --debug for the traceback and report it."
    )


def _describe_os_error(error: OSError) -> str:
    """What went wrong on disk and what to do, in one sentence or two."""
    where = f" ({error.filename})" if error.filename else ""
    if error.errno == errno.ENOSPC:
        return f"the disk is full{where}: free some space or choose a folder on another disk, then rerun."
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write{where}: {error.strerror}. Choose a folder you can write to."
    if error.errno in (errno.ENOTDIR, errno.EEXIST) and error.filename:
        return f"cannot make the folder{where}: a file of that name is in the way ({error.strerror})."
    if error.strerror and error.filename:
        return f"{error.strerror}{where}."
    return " ".join(str(error).split()) + "."


if __name__ == "__main__":
    main()
