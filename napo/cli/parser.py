"""What every `napo` subcommand shares: its options parsed from dataclasses, `--config`, and the command records.

A subcommand's parser is transformers' `HfArgumentParser` through TRL's `TrlParser` (`NapoParser`), so:

- every dataclass field is an option, spelled `--field_name` or `--field-name`, with its help line and default;
- `--config run.yaml` sets any of them by field name, and options given on the command line override the file;
- a dict-valued field (`PairsConfig.negatives`, `CompareConfig.train`) is a repeatable `--flag KEY=VALUE` option whose
  values are added to (or override keys of) the file's mapping (`MappingOption`).

A subcommand is a `Command` record (its parser, its `run` function, what to tell a user who stopped it); `run`
receives the parsed `Invocation` and returns the lines and written paths that `napo.cli.main` prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class UsageError(ValueError):
    """A bad option value or --config file: exit code 2."""


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


@dataclass
class Progress:
    no_progress: bool = field(default=False, metadata={"help": "no progress bar, e.g. in logs"})


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
    earlier_spellings: tuple[tuple[str, str], ...] = ()  # (old flag, today's flag): rewritten before parsing
