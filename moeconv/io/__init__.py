"""moeconv."""
