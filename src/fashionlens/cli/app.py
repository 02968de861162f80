"""The ``fashionlens`` typer application: every command group's module registered in one place,
and :func:`main`, which turns a :class:`~fashionlens.errors.UserError` into one line on stderr and
exit code 2."""

from __future__ import annotations

import importlib
import sys

import typer

from fashionlens.cli import attributes, catalog, evaluate, serve, train
from fashionlens.cli.console import console
from fashionlens.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Find clothes by photo in a catalog, and measure how well it works.")

# the order of `fashionlens --help`
app.command("index")(catalog.index)
app.command("remove")(catalog.remove)
app.command("search")(catalog.search)
app.command("info")(catalog.info)
app.add_typer(evaluate.evaluate_app, name="evaluate")
app.command("demo")(evaluate.demo)
app.command("train")(train.train_command)
app.command("attention")(train.attention_command)
app.command("adapt")(train.adapt_command)
app.command("train-attributes")(attributes.train_attributes_command)
app.command("evaluate-attributes")(attributes.evaluate_attributes_command)
app.command("explain")(attributes.explain_command)
app.command("index-attributes")(attributes.index_attributes_command)
app.command("recommend")(attributes.recommend_command)
app.command("serve")(serve.serve_command)


def _click_errors() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(usage-error classes, exit classes): click's own, and the copy of click that typer
    >= 0.26 vendors as ``typer._click`` (its exceptions are not click's)."""
    errors, exits = [], [typer.Exit]
    for name in ("click.exceptions", "typer._click.exceptions"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        errors += [getattr(module, "ClickException", None)]
        exits += [getattr(module, "Exit", None)]
    return tuple(c for c in errors if c), tuple(c for c in exits if c)


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    usage_errors, exits = _click_errors()
    try:
        rc = app(standalone_mode=False)
    except UserError as exc:
        sys.stderr.write(f"error: {' '.join(str(exc).split())}\n")  # one line, never wrapped
        sys.exit(2)
    except typer.Abort:
        console.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        console.print("interrupted; run the same command again to resume")
        sys.exit(130)
    except usage_errors as exc:
        exc.show()
        sys.exit(2)
    except exits as exc:
        code = getattr(exc, "exit_code", 1)
        if code == 130 and isinstance(exc.__cause__, KeyboardInterrupt):  # typer turns Ctrl-C into Exit(130)
            console.print("interrupted; run the same command again to resume")
        sys.exit(code)
    if isinstance(rc, int) and rc:  # typer.Exit(n) with standalone_mode=False returns n
        sys.exit(rc)
