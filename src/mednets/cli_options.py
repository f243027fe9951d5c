"""Command-line options that take several numbers (`--input-size 3 256 256`), for `mednets.cli`."""

from __future__ import annotations

from mednets.errors import ConfigError

__all__ = ["MULTI_VALUE_OPTIONS", "join_multi_value_options", "parse_numbers"]

# Options that take several numbers (`--input-size 3 256 256`). Click options have a fixed arity,
# so `main` joins the numbers after such an option into one comma-separated value.
MULTI_VALUE_OPTIONS = {"--input-size": 4, "--shape": 3, "--spacing": 3, "--window": 2}  # option: most words joined


def join_multi_value_options(argv: list[str]) -> list[str]:
    """Rewrite `--input-size 3 256 256` as `--input-size 3,256,256`: the numbers after such an option,
    or, when the first value is not a number, up to the option's count of words."""
    joined: list[str] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        joined.append(token)
        index += 1
        if token in MULTI_VALUE_OPTIONS:
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
