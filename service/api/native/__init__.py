"""The native protocol: /generate, sessions and /score, in this project's own shapes."""
