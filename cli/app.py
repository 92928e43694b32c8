"""The `moeconv` Typer app: one thin command per verb; the library does the work."""

from __future__ import annotations

import typer

from moeconv.cli.convert_cmd import convert_command
from moeconv.cli.dag_cmd import dag_command
from moeconv.cli.eval_cmd import eval_command
from moeconv.cli.export_cmd import export_command
from moeconv.cli.heal_cmd import heal_command
from moeconv.cli.info_cmds import env_command, inspect_command
from moeconv.cli.quantize_cmd import quantize_command

app = typer.Typer(
    name="moeconv",
    help="Turn a dense Hugging Face causal LM into a sparse Mixture-of-Experts model, compress it, and measure the trade.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("convert")(convert_command)
app.command("quantize")(quantize_command)
app.command("eval")(eval_command)
app.command("dag")(dag_command)
app.command("heal")(heal_command)
app.command("export")(export_command)
app.command("inspect")(inspect_command)
app.command("env")(env_command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
