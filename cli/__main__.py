"""`python -m moeconv.cli`: the same as the `moeconv` command."""

from moeconv.cli.app import main

main()
