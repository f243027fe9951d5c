"""Command-line details for `mednets.cli`: options that take several values (`--input-size 3 256 256`,
`--roi-subset liver spleen`) and readable value names in every help text (`--out PATH`, not `<path>`)."""

from __future__ import annotations

from typing import Any

from mednets.errors import ConfigError

__all__ = ["MULTI_VALUE_OPTIONS", "MULTI_WORD_OPTIONS", "join_multi_value_options", "parse_numbers",
           "readable_metavars"]  # fmt: skip

# Options that take several numbers (`--input-size 3 256 256`). Click options have a fixed arity,
# so `main` joins the numbers after such an option into one comma-separated value.
MULTI_VALUE_OPTIONS = {"--input-size": 4, "--shape": 3, "--spacing": 3, "--window": 2}  # option: most words joined
# Options that take several names (`--roi-subset liver spleen`): the words up to the next option are joined.
MULTI_WORD_OPTIONS = {"--roi-subset"}


def join_multi_value_options(argv: list[str]) -> list[str]:
    """Rewrite `--input-size 3 256 256` as `--input-size 3,256,256`: the numbers after such an option,
    or, when the first value is not a number, up to the option's count of words."""
    joined: list[str] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        joined.append(token)
        index += 1
        if token in MULTI_WORD_OPTIONS:
            values = []
            while index < len(argv) and _is_word(argv[index]):
                values.append(argv[index])
                index += 1
            if values:
                joined.append(",".join(values))
        elif token in MULTI_VALUE_OPTIONS:
            # Numbers are joined; if the first value is not one, the option's words are (so that
            # `--shape a b c` is one value that `parse_numbers` refuses, naming the option).
            numbers = index < len(argv) and _is_number(argv[index])
            takes, most = (_is_number, len(argv)) if numbers else (_is_word, MULTI_VALUE_OPTIONS[token])
            values = []
            while index < len(argv) and len(values) < most and takes(argv[index]):
                values.append(argv[index])
                index += 1
            if values:
                joined.append(",".join(values))
    return joined


def _is_word(token: str) -> bool:
    return not token.startswith("-")


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def parse_numbers(text: str, option: str, *, kind: type = int, counts: tuple[int, ...] = (2, 3, 4)) -> tuple:
    """Parse `"3,256,256"` into numbers of `kind`, checking how many there are."""
    try:
        values = tuple(kind(v) for v in text.replace(",", " ").split())
    except ValueError as error:
        raise ConfigError("must be numbers", source=option, expected=f"{kind.__name__}s", got=text) from error
    if len(values) not in counts:
        raise ConfigError(
            "wrong number of values", source=option, expected=f"{' or '.join(map(str, counts))} values", got=text
        )
    return values


def readable_metavars(command: Any) -> None:
    """Name every value in the help of `command` and its subcommands as click did (`--out PATH`, `INT`,
    `CONFIG`, flags bare), in place: typer 0.2x labels them with Python types (`<list[Path]>`, `<bool>`
    on a flag, `{config}`). Instance attributes override typer's display methods for these objects only."""
    import typing
    from pathlib import Path

    from typer.core import TyperArgument

    names = {int: "INT", float: "NUMBER", bool: "", str: "TEXT", Path: "PATH"}
    for param in command.params:
        if param.metavar is not None:
            continue
        described = param.type_descriptor
        kinds = [t for t in typing.get_args(described.annotation) or (described.annotation,) if t is not type(None)]
        if isinstance(param, TyperArgument):
            usage = param.name.upper() + ("..." if param.nargs != 1 else "")
            param.metavar = usage
            param.display_type_rich = lambda ctx=None: None  # the name says it; no type column
            param._usage_display_name = lambda usage=usage, required=param.required: usage if required else f"[{usage}]"
        elif getattr(param, "is_flag", False):
            param.metavar = ""
        elif described.is_path:
            param.metavar = "PATH"
        elif not described.is_choice:
            param.metavar = names.get(kinds[0] if kinds else str, "TEXT")
    if hasattr(command, "get_help_option"):
        original = command.get_help_option

        def help_option(ctx: Any, original: Any = original) -> Any:
            option = original(ctx)
            if option is not None:
                option.metavar = ""
            return option

        command.get_help_option = help_option
    for sub in getattr(command, "commands", {}).values():
        readable_metavars(sub)
