"""Runtime modules copied verbatim into every moeconv checkpoint (torch + transformers only)."""
