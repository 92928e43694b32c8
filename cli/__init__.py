"""The moeconv command line (installed as moeconv.cli): thin wrappers that parse, call the library and render."""
